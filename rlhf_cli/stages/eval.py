"""`rlhf eval`: not built yet (issue #6). Its config already loads and validates."""

from rlhf_cli.errors import NotBuiltYet


def run(config, resume: bool = False, overwrite: bool = False) -> None:
    raise NotBuiltYet("rlhf eval is not available in this version yet; `rlhf validate` checks its config.")
