"""Experiment trackers (`training.report_to`) through accelerate: which ones, whether they are
installed, where each writes, the run's config as their hyper-parameters, and closing them.

metrics.jsonl is always written; every tracker gets the same rows (training/metrics.py forwards
them). Where each writes unless the user's own environment says otherwise (docs/trackers.md):

    tensorboard  <output_dir>/tensorboard/<run_name>/   (no variable; accelerate's logging_dir)
    wandb        <output_dir>/wandb/                    WANDB_DIR; online unless WANDB_MODE=offline
    mlflow       <output_dir>/mlruns/ (a file store)    MLFLOW_TRACKING_URI
    trackio      $HF_HOME/trackio/<run_name>.db         TRACKIO_DIR (trackio reads it once, at import)

Module imports are light (no accelerate, no tracker): the config check calls check_installed.
"""

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.errors import UserError


@dataclass(frozen=True)
class Tracker:
    modules: tuple[str, ...]  # importable names, any one of which provides the tracker (as accelerate looks)
    package: str  # what `pip install` needs


# The names are accelerate's; training.report_to's choices are these keys (a test keeps them equal).
TRACKERS = {
    # accelerate writes through torch's SummaryWriter (needs `tensorboard`) or else tensorboardX
    "tensorboard": Tracker(("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": Tracker(("wandb",), "wandb"),
    # the client without the server (full `mlflow` works too): its file store is all a run needs
    "mlflow": Tracker(("mlflow",), "mlflow-skinny"),
    "trackio": Tracker(("trackio",), "trackio"),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        return False


def check_installed(report_to: list[str]) -> None:
    """Refuse a tracker that is not installed, at config time: accelerate would silently drop it
    and the run would end with no tracker files."""
    for name in report_to:
        tracker = TRACKERS[name]  # the loader has checked the name against the choices
        if not any(_importable(m) for m in tracker.modules):
            raise UserError(
                f"training.report_to: {name} is not installed. Install it with `pip install {tracker.package}` "
                f"(every supported tracker: `pip install 'rlhf-cli[trackers]'`), or remove {name} from "
                "training.report_to."
            )


def hyperparameters(config_dict: dict) -> dict[str, Any]:
    """The resolved config (what config.yaml holds) as flat `section.key` scalars: tensorboard's
    hparams take scalars only and mlflow's params strings, so lists and nested values become JSON."""
    from rlhf_cli.training.output import flatten

    scalar = (bool, int, float, str, type(None))
    return {
        key: value if isinstance(value, scalar) else json.dumps(value, default=str)
        for key, value in flatten(config_dict).items()
    }


# The environment variables this process set for mlflow (mlflow itself keeps the tracking URI in
# MLFLOW_TRACKING_URI, which would send the next stage of `rlhf run` into this stage's store):
# close_trackers removes them.
_mlflow_env_set: list[str] = []


def _use_local_mlflow_store(output_dir: Path) -> None:
    """A file store in the output folder unless the user named a tracking URI. mlflow's own default,
    ./mlflow.db in the current folder, is a database that mlflow-skinny cannot open and that takes
    seconds to create; mlflow 3 keeps the file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    import mlflow

    if not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        _mlflow_env_set.append("MLFLOW_ALLOW_FILE_STORE")
    mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())  # sets MLFLOW_TRACKING_URI
    _mlflow_env_set.append("MLFLOW_TRACKING_URI")


def _undo_local_mlflow_store() -> None:
    if "MLFLOW_TRACKING_URI" in _mlflow_env_set:
        import mlflow

        mlflow.set_tracking_uri(None)  # mlflow's own URI, and MLFLOW_TRACKING_URI, back to unset
    for name in _mlflow_env_set:
        os.environ.pop(name, None)
    _mlflow_env_set.clear()


def start_trackers(accelerator, output_dir: Path, run_name: str, report_to: list[str], config_dict: dict) -> None:
    """Start the trackers of training.report_to with the config as their hyper-parameters. Called once
    the output folder is ready (--overwrite empties it first). Every process calls it; accelerate
    starts and feeds the trackers on the main process only."""
    if not report_to:
        return
    init_kwargs: dict[str, dict] = {}
    if "wandb" in report_to and not os.environ.get("WANDB_DIR"):
        init_kwargs["wandb"] = {"dir": str(output_dir)}  # wandb adds its own `wandb/` folder there
    if "mlflow" in report_to:
        _use_local_mlflow_store(output_dir)
    try:
        accelerator.init_trackers(run_name, config=hyperparameters(config_dict), init_kwargs=init_kwargs)
    except Exception as err:  # a login, server or setting of the tracker's own: the user's to fix
        _undo_local_mlflow_store()
        which = report_to[0] if len(report_to) == 1 else f"one of {', '.join(report_to)}"
        raise UserError(
            f"training.report_to: {which} could not start ({type(err).__name__}: {err}). Check its settings "
            "(docs/trackers.md) or remove it from training.report_to."
        ) from err


# mlflow refuses a metric name with other characters (a reward source named `rm@v2`, or `#1` for a
# second source of the same name: rewards/combined.py) and would stop the run mid-training
MLFLOW_REFUSED = re.compile(r"[^/\w.\- :]")


def log_to_trackers(accelerator, metrics: dict[str, Any], step: int) -> None:
    """One metrics.jsonl row to every tracker, under the same names; for mlflow alone, characters it
    refuses become `_`."""
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            tracker.log({MLFLOW_REFUSED.sub("_", name): value for name, value in metrics.items()}, step=step)
        else:
            tracker.log(metrics, step=step)


def close_trackers(accelerator) -> None:
    """Finish every tracker (each flushes and closes its files) and undo start_trackers' process-wide
    setting. The trackers are then dropped, so accelerate's end_training does not finish them twice."""
    names = {tracker.name for tracker in accelerator.trackers}
    for tracker in accelerator.trackers:
        if tracker.name == "trackio" and accelerator.is_main_process:
            import trackio

            trackio.finish()  # as accelerate's finish, and trackio forgets the run (else it finishes it again at exit)
        else:
            tracker.finish()
    accelerator.trackers.clear()
    if "wandb" in names and accelerator.is_main_process:
        import wandb

        # finish() can return before wandb's service process has written the run's file (seen offline
        # under load: the file held its header only); teardown waits for the service to close it
        wandb.teardown()
    _undo_local_mlflow_store()
