"""Progress: a rich bar with ETA and key metrics on a terminal, plain log lines otherwise."""

import logging
import sys
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("rlhf")
console = Console(stderr=True)


def setup_logging(main_process: bool = True) -> None:
    """Rich log lines on a terminal, plain ones otherwise; other ranks only print warnings."""
    level = logging.INFO if main_process else logging.WARNING
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("rlhf_cli").setLevel(level)
    log.setLevel(level)
    for noisy in ("transformers", "datasets", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # their own progress bars (tokenizing, writing shards) would fight with ours
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def format_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics and isinstance(metrics[k], (int, float))]
    return " ".join(parts)


class StepProgress:
    """Tracks optimizer steps. `update(step, metrics)` refreshes the bar or prints a line."""

    def __init__(self, total: int, description: str, keys: tuple[str, ...], enabled: bool = True, start: int = 0):
        self.total, self.keys, self.enabled = total, keys, enabled
        self.interactive = enabled and console.is_terminal
        self.started = time.monotonic()
        self.start_step = start
        self.bar = None
        if self.interactive:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=console,
            )
            self.task = self.bar.add_task(description, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, metrics: dict[str, float] | None = None, log_line: bool = False) -> None:
        if not self.enabled:
            return
        info = format_metrics(metrics or {}, self.keys)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif log_line:
            elapsed = time.monotonic() - self.started
            rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info("step %d/%d %s eta %.0fs", step, self.total, info, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_samples(rows: list[dict]) -> None:
    """A rich table of (prompt, response, score) rows, printed above the progress bar."""
    from rich.table import Table

    table = Table(title=f"samples at step {rows[0]['step']}", show_lines=True)
    for column in ("prompt", "response", "score"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["prompt"], row["response"], f"{row['score']:.3f}")
    console.print(table)
