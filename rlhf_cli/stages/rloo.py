"""`rlhf rloo`: RLOO against a reward -- num_generations responses per prompt, each measured against
the mean reward of the others, no critic (docs/grpo.md)."""

from rlhf_cli.config.schema import RLOOConfig
from rlhf_cli.online.rloo import RLOO
from rlhf_cli.stages.online import run_online


def run(config: RLOOConfig, resume: bool = False, overwrite: bool = False) -> None:
    algorithm = RLOO(config.rloo, config.training, config.generation.response_length)
    run_online("rloo", config, config.rloo, algorithm, resume, overwrite, num_generations=config.rloo.num_generations,
               share_prompts=config.rloo.share_prompt_prefix)
