"""PNG plots of an evaluation, each returned with the data it shows (written to plots.json).

- reward_distribution.png: one panel per reward source (the win-rate source first), a histogram per
  model over bins shared by all models.
- curves_<name>.png: the training curves in an `rlhf` output folder's metrics.jsonl, one panel per
  metric that is there (scores, KL, entropy, losses, accuracy), against `step`.

Figures are drawn on matplotlib's `Figure` directly (the Agg canvas, no pyplot and no display),
so plotting never needs a screen and leaves no global state behind.
"""

import math
from pathlib import Path

import numpy as np

from rlhf_cli.errors import UserError

BINS = 20
# The training curves worth a panel, in panel order; `reward/<source>` and `eval/<name>` (PPO's
# per-source and held-out scores) follow them.
CURVE_KEYS = (
    "objective/scores", "objective/rlhf_reward", "objective/kl", "objective/entropy",
    "objective/non_score_reward", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg",
    "loss", "eval_loss", "accuracy", "eval_accuracy", "mean_token_accuracy", "eval_perplexity",
)
CURVE_PREFIXES = ("reward/", "eval/")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(
            "eval.plots: drawing plots needs matplotlib: pip install 'rlhf-cli[plots]' (or set eval.plots: false)."
        ) from None


def _figure(panels: int, width: float = 4.5, height: float = 3.2):
    from matplotlib.figure import Figure

    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes


# ------------------------------------------------------------------ reward distributions


def histogram_data(values_by_model: dict[str, list[float]], bins: int = BINS) -> dict:
    """Shared bin edges over every model's values and each model's counts in them."""
    everything = np.concatenate([np.asarray(v, dtype=float) for v in values_by_model.values()])
    edges = np.histogram_bin_edges(everything, bins=bins)
    counts = {m: np.histogram(np.asarray(v, dtype=float), bins=edges)[0].tolist() for m, v in values_by_model.items()}
    return {"bins": edges.tolist(), "counts": counts, "values": {m: list(map(float, v)) for m, v in values_by_model.items()}}


def reward_distribution(scores: dict[str, dict[str, list[float]]], sources: list[str], path: Path) -> dict:
    """scores: {model: {source: per-sample values}}; one panel per source, in the order given."""
    fig, axes = _figure(len(sources))
    panels = {}
    for ax, source in zip(axes, sources, strict=False):
        data = histogram_data({model: by_source[source] for model, by_source in scores.items()})
        for model, values in data["values"].items():
            ax.hist(values, bins=data["bins"], histtype="step", linewidth=1.5, label=model)
        ax.set(title=source, xlabel="reward", ylabel="samples")
        ax.legend(fontsize="small")
        panels[source] = data
    fig.suptitle("reward distribution per model")
    fig.savefig(path, dpi=100)
    return {"kind": "reward_distribution", "panels": panels}


# ------------------------------------------------------------------ training curves


def is_curve_key(key: str) -> bool:
    return key in CURVE_KEYS or key.startswith(CURVE_PREFIXES)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None  # metrics.jsonl writes nan/inf as strings
    return float(value)


def curve_series(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{metric: {"step": [...], "value": [...]}} for every curve metric with a finite value in some row."""
    seen = [k for row in rows for k in row if is_curve_key(k)]
    ordered = [k for k in CURVE_KEYS if k in seen] + [k for k in dict.fromkeys(seen) if k not in CURVE_KEYS]
    series = {}
    for key in ordered:
        points = [(row["step"], _number(row.get(key))) for row in rows if "step" in row]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            series[key] = {"step": [s for s, _ in points], "value": [v for _, v in points]}
    return series


def training_curves(rows: list[dict], title: str, path: Path) -> dict | None:
    """Plot every curve metric of a metrics.jsonl; None (and no file) when it has none."""
    series = curve_series(rows)
    if not series:
        return None
    fig, axes = _figure(len(series), width=4.0, height=2.8)
    for ax, (key, s) in zip(axes, series.items(), strict=False):
        ax.plot(s["step"], s["value"], marker="." if len(s["step"]) <= 30 else None)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"training curves: {title}")
    fig.savefig(path, dpi=100)
    return {"kind": "training_curves", "series": series}
