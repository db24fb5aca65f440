"""Errors a user can cause and fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, missing column, ...).

    The message must name the key, file or row at fault and say how to fix it.
    """

    exit_code = 2


class NotBuiltYet(Exception):
    """A subcommand whose config loads but whose training is not in this version (exit status 1)."""

    exit_code = 1
