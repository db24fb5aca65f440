"""`rlhf reward`: not built yet (issue #4). Its config already loads and validates."""

from rlhf_cli.errors import NotBuiltYet


def run(config, resume: bool = False, overwrite: bool = False) -> None:
    raise NotBuiltYet("rlhf reward is not available in this version yet; `rlhf validate` checks its config.")
