"""`rlhf ppo`: PPO against a reward, with a critic (a value head on the policy or a separate model), or
REINFORCE++ without one (`ppo.advantage_estimator`)."""

from rlhf_cli.config.schema import PPOConfig
from rlhf_cli.ppo.algorithm import PPO
from rlhf_cli.stages.online import run_online


def run(config: PPOConfig, resume: bool = False, overwrite: bool = False) -> None:
    algorithm = PPO(config.ppo)
    critic = config.ppo.value_model_name_or_path if algorithm.uses_critic else None
    run_online("ppo", config, config.ppo, algorithm, resume, overwrite, critic=critic)
