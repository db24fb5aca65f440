"""What every training stage does first: output folder, accelerator, logging, metrics, resume point."""

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rlhf_cli.config.loader import to_dict
from rlhf_cli.config.schema import STAGES
from rlhf_cli.errors import UserError
from rlhf_cli.models.loading import describe_model
from rlhf_cli.training.accel import launch_warnings, make_accelerator
from rlhf_cli.training.checkpoint_scan import resume_checkpoint, set_aside_damaged
from rlhf_cli.training.metrics import MetricsWriter
from rlhf_cli.training.model_card import write_model_cards
from rlhf_cli.training.output import (
    check_output_path,
    check_resume_config,
    keep_previous_config,
    prepare_output_dir,
    record_loaded_model,
    write_run_files,
)
from rlhf_cli.training.progress import setup_logging
from rlhf_cli.training.sharding import is_sharded, zero_stage
from rlhf_cli.training.trackers import close_trackers, start_trackers

log = logging.getLogger(__name__)


@dataclass
class Run:
    accelerator: Accelerator
    output_dir: Path
    metrics: MetricsWriter
    resume_from: Path | None
    stage: str = ""
    config: Any = None  # the stage's config: finish_run writes the model card from it


# The CLI's --allow-config-change for the stage it runs (the stages call start_run without it).
ALLOW_CONFIG_CHANGE = False


@contextlib.contextmanager
def config_change_allowed(allowed: bool):
    """Within the block, start_run resumes a run whose config changed in ways that make it meaningless."""
    global ALLOW_CONFIG_CHANGE
    before, ALLOW_CONFIG_CHANGE = ALLOW_CONFIG_CHANGE, allowed
    try:
        yield
    finally:
        ALLOW_CONFIG_CHANGE = before


def start_run(stage: str, config: Any, resume: bool, overwrite: bool, allow_config_change: bool | None = None) -> Run:
    """Prepare the output folder (main process), pick the checkpoint to resume from (damaged ones are
    skipped), check the config against the run's, write config.yaml, build the accelerator."""
    allow = ALLOW_CONFIG_CHANGE if allow_config_change is None else allow_config_change
    output_dir = Path(config.training.output_dir)
    check_output_path(output_dir)  # before the accelerator: every process reads it before anything is created
    accelerator = make_accelerator(config.training, output_dir)
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    # Every process reads the same files and so reaches the same decision (or the same error).
    resume_from, damaged, changes = None, [], None
    if resume:
        main = accelerator.is_main_process
        resume_from, damaged = resume_checkpoint(output_dir, STAGES[stage].checkpoint_files(config), report=main)
        if resume_from is None and damaged:
            raise UserError(
                f"--resume: no checkpoint in {output_dir} can be resumed from: {'; '.join(p for _, p in damaged)}. "
                "Start the run again (--overwrite; under `rlhf run`: --from this stage) or restore the files."
            )
        if resume_from is None:
            log.warning("--resume: no complete checkpoint in %s; starting from the beginning.", output_dir)
        else:
            changes = check_resume_config(output_dir, stage, config, resume_from, allow, report=main)
            if main:
                check_process_count(resume_from, accelerator.num_processes)
    accelerator.wait_for_everyone()  # nobody still reads config.yaml or the checkpoints below
    if accelerator.is_main_process:
        for path, _ in damaged:
            log.warning("%s set aside as %s", path, set_aside_damaged(path).name)
        if changes:
            kept = keep_previous_config(output_dir, resume_from)
            if kept is not None:
                log.info("the run's config up to %s is kept as %s", resume_from.name, kept)
        write_run_files(output_dir, stage, config)
        if resume_from is None:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
        log.info("rlhf %s -> %s (%d process%s, %s)", stage, output_dir, accelerator.num_processes,
                 "es" if accelerator.num_processes > 1 else "", accelerator.device)
        if is_sharded(accelerator):
            log.info("FSDP %d: parameters, gradients and optimizer state sharded over %d processes",
                     accelerator.state.fsdp_plugin.fsdp_version, accelerator.num_processes)
        if zero_stage(accelerator):
            log.info("DeepSpeed ZeRO-%d: %s sharded over %d processes", zero_stage(accelerator),
                     "parameters, gradients and optimizer state" if zero_stage(accelerator) == 3
                     else "gradients and optimizer state", accelerator.num_processes)
        for warning in launch_warnings(accelerator, stage):
            log.warning(warning)
    # the trackers write into the folder, so they start once it is ready (--overwrite has emptied it)
    start_trackers(accelerator, output_dir, config.training.run_name or output_dir.name,
                   config.training.report_to, to_dict(stage, config))
    metrics = MetricsWriter(output_dir, accelerator, enabled=accelerator.is_main_process)
    return Run(accelerator, output_dir, metrics, resume_from, stage, config)


def check_process_count(checkpoint: Path, processes: int) -> None:
    """A checkpoint written by another number of processes resumes, but the data each process sees
    from there on differs from the uninterrupted run's: say so."""
    saved = len(list(checkpoint.glob("rng_state_*.json")))
    if saved and saved != processes:
        log.warning("--resume: %s was written by %d process(es), this run has %d; the run continues, but not "
                    "with the batches the original run would have seen.", checkpoint, saved, processes)


# `rlhf run` runs several stages in one process and sets this: the process group of a many-process
# launch then outlives each stage (it cannot be re-created reliably) and the recipe closes it.
KEEP_PROCESS_GROUP = False


def finish_run(run: Run) -> None:
    """Write the model card (the stage has saved its model), close trackers and the process group (a
    process can abort at exit otherwise; see DESIGN.md)."""
    if run.accelerator.is_main_process and run.config is not None:
        write_model_cards(run.output_dir, run.stage, run.config, run.accelerator.num_processes)
    run.accelerator.wait_for_everyone()
    close_trackers(run.accelerator)  # each flushes its files
    if not KEEP_PROCESS_GROUP:
        run.accelerator.end_training()  # the trackers are closed: this destroys the process group
        if run.accelerator.num_processes > 1:
            exit_without_teardown()


def exit_without_teardown() -> None:
    """End a finished process of a many-process launch here, without Python's teardown.

    The stage's DDP wrapper still holds the destroyed process group; freeing it afterwards (when the
    stage returns, or at interpreter exit) runs gloo's destructor, which joins its worker threads, and
    that join was seen to hang forever in the process whose peer had already exited (gdb: main thread
    in ProcessGroupGloo::~ProcessGroupGloo from Reducer::~Reducer; twice in one day of CI, 2-process
    SFT and RLOO, after every file was written). Everything is saved and every tracker closed by now,
    so the process flushes its output and leaves with status 0."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def record_model(run: Run, model) -> None:
    """Log and record in run_info.json the trained model's class, dtype and attention kernel."""
    description = describe_model(run.accelerator.unwrap_model(model))
    log.info("model: %s", ", ".join(f"{k} {v}" for k, v in description.items()))
    if run.accelerator.is_main_process:
        record_loaded_model(run.output_dir, description)
