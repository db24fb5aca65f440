"""`python -m rlhf_cli` is the `rlhf` command (so `accelerate launch -m rlhf_cli ...` works)."""

from rlhf_cli.cli import main

if __name__ == "__main__":
    main()
