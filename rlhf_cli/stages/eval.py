"""`rlhf eval`: sample every model on the same held-out prompts with the same seeds, score, compare, plot.

The figures are defined in docs/eval.md (and computed in rlhf_cli/evaluation/metrics.py).
"""

import dataclasses
import logging
import re
import time
from pathlib import Path

import torch

from rlhf_cli.config.schema import EvalConfig
from rlhf_cli.data.loading import load_dataset_dict, require_columns
from rlhf_cli.environments.rollout import environment_tools, episode_stats, prompt_tools
from rlhf_cli.errors import UserError
from rlhf_cli.evaluation import plots
from rlhf_cli.evaluation.metrics import summarise, win_rate
from rlhf_cli.evaluation.perplexity import held_out_perplexity, load_texts
from rlhf_cli.evaluation.report import append_jsonl, print_table, sample_rows, write_json
from rlhf_cli.evaluation.sampling import (
    EvalModel,
    check_reference_vocabulary,
    load_eval_tokenizer,
    sample_model,
)
from rlhf_cli.lm.generation import encode_prompt_set
from rlhf_cli.online.alarms import read_alarms
from rlhf_cli.rewards.combined import CombinedReward
from rlhf_cli.training.metrics import read_metrics
from rlhf_cli.training.output import prepare_output_dir, write_run_files
from rlhf_cli.training.progress import setup_logging

log = logging.getLogger(__name__)


def start_eval(config: EvalConfig, resume: bool, overwrite: bool) -> Path:
    """The output folder: an earlier evaluation there is refused unless --overwrite (or --resume, which
    evaluates again into it: an evaluation has no checkpoints to continue from). Nothing that marks a
    run is written yet, so a config error found while setting up leaves no run behind."""
    setup_logging(True)
    output_dir = prepare_output_dir(config.eval.output_dir, resume=resume, overwrite=overwrite)
    if resume:
        log.info("--resume: rlhf eval keeps no checkpoints; evaluating again into %s", output_dir)
    for stale in ("eval.json", "samples.jsonl", "plots.json"):
        (output_dir / stale).unlink(missing_ok=True)
    return output_dir


def evaluated_models(config: EvalConfig) -> list[tuple[str, str]]:
    """(name, config key) of every model to sample: eval.models, and the baseline first when it is not among them."""
    models = [(name, f"eval.models[{i}]") for i, name in enumerate(config.eval.models)]
    baseline = config.eval.baseline_model
    if baseline is not None and baseline not in config.eval.models:
        log.info("the baseline %s is not in eval.models: it is evaluated too", baseline)
        models.insert(0, (baseline, "eval.baseline_model"))
    return models


def short_labels(names: list[str]) -> dict[str, str]:
    """A short, unique name per model for tables and file names: a folder's last part, a built-in's name."""
    short = {n: n.removeprefix("builtin:") if n.startswith("builtin:") else Path(n.rstrip("/")).name or n for n in names}
    counts = {}
    for label in short.values():
        counts[label] = counts.get(label, 0) + 1
    return {n: label if counts[label] == 1 else n for n, label in short.items()}


def file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def load_prompts(config: EvalConfig) -> tuple[list, dict[str, list], str]:
    """The first eval.num_prompts prompts of the held-out split, and their other columns."""
    data = config.data
    splits = load_dataset_dict(data.dataset_name, data.dataset_config, data.world_seed)
    split = data.dataset_test_split
    if split is None or split not in splits:
        if data.dataset_train_split not in splits:
            raise UserError(f"data.dataset_test_split: {split!r} is not a split of {data.dataset_name}; "
                            f"it has: {', '.join(splits)}.")
        log.warning("%s has no held-out split %r: prompts come from %r and may have been seen in training",
                    data.dataset_name, split, data.dataset_train_split)
        split = data.dataset_train_split
    dataset = splits[split]
    require_columns(dataset, {"data.prompt_column": data.prompt_column}, f"{data.dataset_name} ({split})")
    if len(dataset) == 0:
        raise UserError(f"data.dataset_name: the {split!r} split of {data.dataset_name} is empty.")
    if len(dataset) < config.eval.num_prompts:
        log.warning("eval.num_prompts is %d but %s (%s) has %d prompts: using them all",
                    config.eval.num_prompts, data.dataset_name, split, len(dataset))
    dataset = dataset.select(range(min(config.eval.num_prompts, len(dataset))))
    columns = {c: dataset[c] for c in dataset.column_names if c != data.prompt_column}
    return dataset[data.prompt_column], columns, split


def repeat_rows(values: list, times: int) -> list:
    """Prompt-major repetition: [a, b] x 2 -> [a, a, b, b] (row i * times + j is sample j of prompt i)."""
    return [v for v in values for _ in range(times)]


def run(config: EvalConfig, resume: bool = False, overwrite: bool = False) -> None:
    opts, gen = config.eval, config.generation
    # 1. Logging, output folder (an earlier evaluation is refused here), device; matplotlib before any work
    output_dir = start_eval(config, resume, overwrite)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.plots:
        plots.require_matplotlib()

    # 2. Every tokenizer and reward source: a missing folder or a bad reward stops here, before any sampling
    models = evaluated_models(config)
    tokenizers = {name: load_eval_tokenizer(name, key) for name, key in models}
    ref_tokenizer = None
    if opts.reference_model is not None:
        ref_tokenizer = load_eval_tokenizer(opts.reference_model, "eval.reference_model")
        for name, _ in models:
            check_reference_vocabulary(tokenizers[name], ref_tokenizer, name, opts.reference_model)
    reward = CombinedReward(config.reward, device)
    tools = environment_tools(config.environment) if config.environment.tools else None  # a bad tool stops here too
    reward_models = [s.model for s in (config.reward.sources or [config.reward]) if s.model is not None]
    every_name = [n for n, _ in models] + [n for n in (opts.reference_model, *reward_models) if n is not None]
    labels = short_labels(list(dict.fromkeys(every_name)))

    # 3. Held-out prompts (the same rows for every model) and the texts for perplexity
    prompts, columns, split = load_prompts(config)
    row_columns = {c: repeat_rows(v, opts.samples_per_prompt) for c, v in columns.items()}
    texts, text_split = load_texts(opts, config.data.world_seed) if opts.perplexity_dataset else (None, None)

    # 4. Each model in turn: sample with the shared seeds, score, figures (the reference stays loaded);
    #    config.yaml marks the folder as a run only now that the setup has passed
    write_run_files(output_dir, "eval", config)
    reference = EvalModel(opts.reference_model, device, "eval.reference_model", ref_tokenizer) if opts.reference_model else None
    results, scores = {}, {}
    (output_dir / "samples.jsonl").touch()
    for name, key in models:
        started = time.perf_counter()
        lm = reference if name == opts.reference_model else EvalModel(name, device, key, tokenizers[name])
        ids = encode_prompt_set(prompts, lm.tokenizer, config.data, f"prompts for {name}",
                                prompt_tools(config.environment, tools))
        samples = sample_model(lm, repeat_rows(ids, opts.samples_per_prompt), gen, opts.seed, opts.batch_size, reference,
                               config.environment, tools)
        episodes = {} if samples.episodes is None else {"episodes": samples.episodes}  # reward functions get them
        combined, parts = reward.score(samples.prompts, samples.responses, {**row_columns, **episodes})
        label = labels[name]
        results[label] = {"model": name, **summarise(parts, combined, samples.lengths, samples.stopped,
                                                     samples.responses, samples.kls)}
        results[label]["environment"] = episode_stats(samples.episodes) if samples.episodes is not None else None
        results[label]["training_alarms"] = read_alarms(name)  # an online run's reward-hacking alarms, if any
        results[label]["perplexity"] = (
            held_out_perplexity(lm, texts, min(config.data.max_length, lm.tokenizer.model_max_length), opts.batch_size)
            if texts is not None else None
        )
        scores[label] = {source: values.tolist() for source, values in parts.items()}
        append_jsonl(output_dir / "samples.jsonl", sample_rows(label, samples, parts, combined, opts.samples_per_prompt))
        log.info("%s: %d samples scored in %.1fs", label, len(samples.responses), time.perf_counter() - started)
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 5. Win rates: sample i of each model against sample i of the baseline, under the chosen source
    source = reward.names[opts.win_rate_source]
    baseline = labels[opts.baseline_model] if opts.baseline_model is not None else None
    for label in results:
        results[label]["win_rate"] = (
            win_rate(torch.tensor(scores[label][source]), torch.tensor(scores[baseline][source]))
            if baseline is not None else None
        )

    # 6. eval.json and the table
    report = {
        "settings": {
            "models": list(opts.models), "baseline_model": opts.baseline_model, "baseline_label": baseline,
            "reference_model": opts.reference_model,
            "reference_label": labels.get(opts.reference_model) if opts.reference_model else None,
            "reward_sources": reward.names, "reward_weights": reward.weights, "win_rate_source": source,
            "prompts": {"dataset": config.data.dataset_name, "split": split, "column": config.data.prompt_column},
            "num_prompts": len(prompts), "samples_per_prompt": opts.samples_per_prompt, "seed": opts.seed,
            "generation": dataclasses.asdict(gen), "perplexity_dataset": opts.perplexity_dataset,
            "perplexity_split": text_split, "device": str(device),
        },
        "models": results,
    }
    write_json(output_dir / "eval.json", report)
    print_table(report)

    # 7. Plots: reward distributions, and the training curves of every output folder with a metrics.jsonl
    if opts.plots:
        drawn = {"reward_distribution.png": plots.reward_distribution(
            scores, [source] + [s for s in reward.names if s != source], output_dir / "reward_distribution.png")}
        for name in dict.fromkeys(every_name):
            if (Path(name) / "metrics.jsonl").is_file():
                file = f"curves_{file_safe(labels[name])}.png"
                curves = plots.training_curves(read_metrics(name), labels[name], output_dir / file)
                if curves is not None:
                    drawn[file] = {"model": name, **curves}
        write_json(output_dir / "plots.json", drawn)
        log.info("plots: %s", ", ".join(drawn))
    log.info("done: eval.json, samples.jsonl%s in %s", " and plots" if opts.plots else "", output_dir)
