"""The run skeleton every training loop shares (`rlhf sft`, `reward`, `dpo` in training/loop.py; `ppo`,
`grpo`, `rloo` in stages/online.py): what happens after each step -- the progress line, logging every
`logging_steps`, evaluation every `eval_steps`, a checkpoint every `save_steps` -- the stop signal ->
checkpoint -> exit path, and the teardown that every way out of the loop (done, stopped, a fault)
goes through, so the signal handlers are always put back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rlhf_cli.config.sections import TrainingConfig
from rlhf_cli.errors import UserError
from rlhf_cli.training import signals
from rlhf_cli.training.metrics import MetricsWriter
from rlhf_cli.training.progress import StepProgress


class RunCadence:
    """`save(step) -> checkpoint folder`; `evaluate(step)` logs its own metrics (None: no evaluation)."""

    def __init__(self, *, total: int, training: TrainingConfig, accelerator, metrics: MetricsWriter,
                 progress: StepProgress, save: Callable[[int], Path], evaluate: Callable[[int], None] | None = None):
        self.total, self.training, self.accelerator = total, training, accelerator
        self.metrics, self.progress, self.save, self.evaluate = metrics, progress, save, evaluate
        signals.install()  # SIGTERM / Ctrl-C: checkpoint after this step, then stop (training/signals.py)

    def log_due(self, step: int) -> bool:
        return step % self.training.logging_steps == 0 or step == self.total

    def after_step(self, step: int, row: dict[str, float] | None, shown: dict[str, float] | None = None) -> None:
        """After step `step` (1-based) is done: log `row` (when given: a logging step), show `shown` on
        the progress bar otherwise, evaluate and checkpoint when due; a stop signal checkpoints and
        raises signals.Interrupted. The last step's evaluation and checkpoint are the caller's."""
        if row is not None:
            self.metrics.log(step, row)
            self.progress.update(step, row, log_line=True)
        else:
            self.progress.update(step, shown)
        last = step == self.total
        if self.evaluate is not None and self.training.eval_steps and step % self.training.eval_steps == 0 and not last:
            self.evaluate(step)
        stop = signals.stop_requested(self.accelerator) if not last else None
        if (step % self.training.save_steps == 0 and not last) or stop:
            saved = self.save(step)
            if stop:
                self.close()
                raise signals.Interrupted(stop, step, saved)

    def finish_at(self, step: int) -> None:
        """Make `step` the run's last (a stopping rule ended it early): `after_step(step, ...)` then logs it
        and leaves its evaluation and checkpoint to the caller's normal end, as for the planned last step."""
        self.total = step

    def fail(self, message: str) -> UserError:
        """Tear down and return the error to raise (a fault that stops the run)."""
        self.close()
        return UserError(message)

    def close(self) -> None:
        self.progress.close()
        signals.restore()
