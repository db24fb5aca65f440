"""What an evaluation leaves behind: eval.json, samples.jsonl, plots.json, and a table on stdout."""

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhf_cli.evaluation.sampling import Samples
from rlhf_cli.online.alarms import describe


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def sample_rows(label: str, samples: Samples, rewards: dict, combined, samples_per_prompt: int) -> list[dict]:
    """One row per response: the model, the prompt, the response, each reward and the combined one."""
    rows = []
    for i, (prompt, response) in enumerate(zip(samples.prompts, samples.responses, strict=True)):
        rows.append({
            "model": label,
            "prompt_index": i // samples_per_prompt,
            "sample": i % samples_per_prompt,
            "prompt": prompt,
            "response": response,
            "rewards": {name: float(values[i]) for name, values in rewards.items()},
            "reward": float(combined[i]),
            "length": int(samples.lengths[i]),
            "stopped": bool(samples.stopped[i]),
            "kl": None if samples.kls is None else float(samples.kls[i]),
        })
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(report: dict) -> list[tuple[str, list[str]]]:
    """(figure, one cell per model) in the order the table prints them."""
    settings, models = report["settings"], list(report["models"].values())
    sources = settings["reward_sources"]
    rows = [(f"reward: {s}", [f"{m['rewards'][s]['mean']:.3f} ± {m['rewards'][s]['std']:.3f}" for m in models])
            for s in sources]
    if len(sources) > 1:
        rows.append(("reward (weighted sum)", [f"{m['reward']['mean']:.3f} ± {m['reward']['std']:.3f}" for m in models]))
    if settings["baseline_model"] is not None:
        rows.append(("win rate", [_fmt(m["win_rate"]) for m in models]))
    if settings["reference_model"] is not None:
        rows.append(("KL to reference", [_fmt(m["kl_to_reference"]) for m in models]))
    rows += [
        ("response tokens", [_fmt(m["response_length"], 1) for m in models]),
        ("stop rate", [_fmt(m["stop_rate"]) for m in models]),
        ("distinct-1", [_fmt(m["distinct_1"]) for m in models]),
        ("distinct-2", [_fmt(m["distinct_2"]) for m in models]),
    ]
    if settings["perplexity_dataset"] is not None:
        rows.append(("perplexity", [_fmt(m["perplexity"], 2) for m in models]))
    if any(m.get("environment") for m in models):  # a text environment: how each model used its tools
        for figure, key, digits in (("turns per episode", "env/turns", 2), ("tool-call rate", "env/tool_call_rate", 3),
                                    ("tool calls per episode", "env/tool_calls", 2),
                                    ("tool error rate", "env/tool_error_rate", 3)):
            rows.append((figure, [_fmt((m.get("environment") or {}).get(key), digits) for m in models]))
    if any(m.get("training_alarms") for m in models):
        rows.append(("training alarms", [_alarm_cell(m.get("training_alarms")) for m in models]))
    return rows


def _alarm_cell(record: dict | None) -> str:
    """The reward-hacking alarms of a model's training run, short: `kl@12, length_collapse@7`; `-`: no record."""
    if record is None:
        return "-"
    cells = [f"{e['alarm']}@{e['step']}" for e in record["events"] if e["event"] == "fired"]
    if record.get("stopped"):
        cells.append(f"stopped@{record['stopped']['step']}")
    return ", ".join(cells) or "none"


def alarm_lines(report: dict) -> list[str]:
    """One line per model whose training run raised a reward-hacking alarm or was stopped by a rule."""
    return [f"{label}: reward-hacking alarms during training: {describe(m['training_alarms'])}"
            for label, m in report["models"].items()
            if m.get("training_alarms") and (m["training_alarms"]["events"] or m["training_alarms"].get("stopped"))]


def print_table(report: dict, console: Console | None = None) -> None:
    """Figures as rows and models as columns (a few models, many figures: fits a narrow terminal)."""
    settings = report["settings"]
    title = (f"rlhf eval: {settings['num_prompts']} prompts x {settings['samples_per_prompt']} samples, "
             f"seed {settings['seed']}")
    notes = []
    if settings["baseline_model"] is not None:
        notes.append(f"win rate: against {settings['baseline_label']} under {settings['win_rate_source']}, ties half")
    if settings["reference_model"] is not None:
        notes.append(f"KL: to {settings['reference_label']}, nats per response")
    if settings["perplexity_dataset"] is not None:
        notes.append(f"perplexity: {settings['perplexity_dataset']} ({settings['perplexity_split']})")
    table = Table(title=title, caption="; ".join(notes) or None)
    table.add_column("figure", no_wrap=True)
    for label in report["models"]:
        table.add_column(label, justify="right", overflow="fold")
    for figure, cells in table_rows(report):
        table.add_row(figure, *cells)
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: no screen to wrap at 80 columns
            console = Console(width=160)
    console.print(table)
    for line in alarm_lines(report):
        console.print(line, markup=False, highlight=False)
