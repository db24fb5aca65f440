"""What every training stage does first: output folder, accelerator, logging, metrics, resume point."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rlhf_cli.training.accel import make_accelerator
from rlhf_cli.training.checkpoint import latest_checkpoint
from rlhf_cli.training.metrics import MetricsWriter
from rlhf_cli.training.output import prepare_output_dir, write_run_files
from rlhf_cli.training.progress import setup_logging

log = logging.getLogger(__name__)


@dataclass
class Run:
    accelerator: Accelerator
    output_dir: Path
    metrics: MetricsWriter
    resume_from: Path | None


def start_run(stage: str, config: Any, resume: bool, overwrite: bool) -> Run:
    """Prepare the output folder (main process), write config.yaml, build the accelerator."""
    output_dir = Path(config.training.output_dir)
    accelerator = make_accelerator(config.training, output_dir)
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    resume_from = latest_checkpoint(output_dir) if resume else None
    if resume and resume_from is None:
        log.warning("--resume: no complete checkpoint in %s; starting from the beginning.", output_dir)
    if accelerator.is_main_process:
        write_run_files(output_dir, stage, config)
        if resume_from is None:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
        log.info("rlhf %s -> %s (%d process%s, %s)", stage, output_dir, accelerator.num_processes,
                 "es" if accelerator.num_processes > 1 else "", accelerator.device)
    metrics = MetricsWriter(output_dir, accelerator, enabled=accelerator.is_main_process)
    return Run(accelerator, output_dir, metrics, resume_from)


# `rlhf run` runs several stages in one process and sets this: the process group of a many-process
# launch then outlives each stage (it cannot be re-created reliably) and the recipe closes it.
KEEP_PROCESS_GROUP = False


def finish_run(run: Run) -> None:
    """Close trackers and the process group (a process can abort at exit otherwise; see DESIGN.md)."""
    run.accelerator.wait_for_everyone()
    if KEEP_PROCESS_GROUP:
        for tracker in run.accelerator.trackers:
            tracker.finish()
    else:
        run.accelerator.end_training()
