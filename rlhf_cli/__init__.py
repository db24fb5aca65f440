"""rlhf: train transformer language models with reinforcement learning from feedback."""

__version__ = "0.1.0"
