"""metrics.jsonl (one JSON object per logged step, always with `step`) and accelerate's trackers."""

import json
import math
from pathlib import Path
from typing import Any

from rlhf_cli.training.trackers import log_to_trackers


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends rows to `<output_dir>/metrics.jsonl` and forwards them to accelerate's trackers.

    Only the main process writes. On resume the file is cut back to the checkpoint's step, so a
    resumed run's file equals an uninterrupted one's.
    """

    def __init__(self, folder: Path, accelerator=None, enabled: bool = True):
        self.path = Path(folder) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = enabled

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            log_to_trackers(self.accelerator, metrics, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (they belong to work the resumed run will redo)."""
        if self.enabled:
            truncate_jsonl(self.path, step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines file whose `step` is <= step (a resumed run redoes the rest)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(folder: str | Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
