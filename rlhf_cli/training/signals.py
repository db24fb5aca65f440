"""SIGTERM and Ctrl-C during training: finish the step, save a checkpoint, exit so that --resume continues.

Preemptible clusters send SIGTERM some seconds before they kill a job; a user presses Ctrl-C. Either
only sets a flag here. The training loops (training/loop.py, stages/ppo.py) look at the flag after
each optimizer step / PPO iteration, write a checkpoint and raise `Interrupted`; the CLI prints how to
resume and exits with 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C), as a shell does.

A second signal while the first is being handled is not swallowed: the default behaviour comes back
(Ctrl-C twice raises KeyboardInterrupt at once; SIGTERM twice ends the process), for a user who does
not want to wait for the checkpoint.
"""

import logging
import signal
import threading

import torch

from rlhf_cli.errors import Interrupted  # noqa: F401  (raised by the loops as signals.Interrupted)

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None
_previous: dict[int, object] = {}


def _handler(signum, frame) -> None:
    global _requested
    if _requested is not None:  # second signal: give the user the default behaviour back
        restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)
        return
    _requested = signum
    log.warning("%s received: stopping after this step and saving a checkpoint (send it again to stop now).",
                signal.Signals(signum).name)


def install() -> None:
    """Catch SIGTERM/SIGINT until `restore()` (only the main thread can install handlers)."""
    global _requested
    _requested = None
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        previous = signal.signal(signum, _handler)
        _previous.setdefault(signum, previous)


def restore() -> None:
    """Put back the handlers that were there before `install()`."""
    for signum, previous in list(_previous.items()):
        signal.signal(signum, previous)
    _previous.clear()


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _requested


def stop_requested(accelerator) -> int | None:
    """The stop signal, agreed by every process (all must stop after the same step, or collectives hang)."""
    if accelerator.num_processes == 1:
        return _requested
    flag = torch.tensor(float(_requested or 0), device=accelerator.device)
    agreed = int(accelerator.reduce(flag, "max").item())
    return agreed or None
