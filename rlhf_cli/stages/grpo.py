"""`rlhf grpo`: GRPO against a reward -- num_generations responses per prompt, advantages normalised
within each prompt's group, no critic (docs/grpo.md)."""

from rlhf_cli.config.schema import GRPOConfig
from rlhf_cli.online.grpo import GRPO
from rlhf_cli.stages.online import run_online


def run(config: GRPOConfig, resume: bool = False, overwrite: bool = False) -> None:
    algorithm = GRPO(config.grpo, config.training, config.generation.response_length)
    run_online("grpo", config, config.grpo, algorithm, resume, overwrite, num_generations=config.grpo.num_generations,
               share_prompts=config.grpo.share_prompt_prefix)
