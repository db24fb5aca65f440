"""`rlhf ppo`: PPO against a reward, with a critic (a value head on the policy or a separate model)."""

from rlhf_cli.config.schema import PPOConfig
from rlhf_cli.ppo.algorithm import PPO
from rlhf_cli.stages.online import run_online


def run(config: PPOConfig, resume: bool = False, overwrite: bool = False) -> None:
    run_online("ppo", config, config.ppo, PPO(config.ppo), resume, overwrite, critic=config.ppo.value_model_name_or_path)
