"""`rlhf ppo`: not built yet (issue #5). Its config already loads and validates."""

from rlhf_cli.errors import NotBuiltYet


def run(config, resume: bool = False, overwrite: bool = False) -> None:
    raise NotBuiltYet("rlhf ppo is not available in this version yet; `rlhf validate` checks its config.")
