"""Errors a user can cause and fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, missing column, ...).

    The message must name the key, file or row at fault and say how to fix it. `detail` (optional) is
    printed under it: the frames of the user's own code for an exception raised there.
    """

    exit_code = 2

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


def user_frames(err: BaseException) -> str:
    """The stack of `err` without the toolkit's own frames: where in the user's code (a reward
    function, say) it was raised, most recent call last, as Python prints it."""
    import traceback
    from pathlib import Path

    package = str(Path(__file__).resolve().parent)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not str(Path(f.filename).resolve()).startswith(package)]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(err), err)
    return "in your code (most recent call last):\n" + "".join(lines).rstrip()


class NotBuiltYet(Exception):
    """A subcommand whose config loads but whose training is not in this version (exit status 1)."""

    exit_code = 1


class Interrupted(Exception):
    """Training stopped on SIGTERM / Ctrl-C after saving a checkpoint (see training/signals.py).

    The CLI prints how to resume and exits with 128 + the signal number (143 SIGTERM, 130 SIGINT).
    """

    def __init__(self, signum: int, step: int, checkpoint):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to {checkpoint}.")
