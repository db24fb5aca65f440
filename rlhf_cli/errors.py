"""Errors a user can cause and fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, missing column, ...).

    The message must name the key, file or row at fault and say how to fix it.
    """

    exit_code = 2


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
