"""`PPOTrainer`: the online trainer (online/trainer.py) with the PPO algorithm (ppo/algorithm.py),
kept as the Python API for users who drive the loop themselves:

    trainer = PPOTrainer(config, policy_with_value, tokenizer, accelerator)
    rollout = trainer.generate(prompts)                 # or trainer.rollout_from(queries, responses)
    scores = my_reward(rollout.prompts, rollout.responses)   # any function, model or human
    stats = trainer.step(rollout, scores)               # one PPO update; returns the statistics
"""

from rlhf_cli.config.schema import PPOConfig
from rlhf_cli.models.value_head import PolicyWithValue
from rlhf_cli.online.experience import Experience, Rollout
from rlhf_cli.online.trainer import OnlineTrainer
from rlhf_cli.online.updater import NonFiniteBatch
from rlhf_cli.ppo.algorithm import PPO

__all__ = ["Experience", "NonFiniteBatch", "PPOTrainer", "Rollout"]


class PPOTrainer(OnlineTrainer):
    def __init__(self, config: PPOConfig, model: PolicyWithValue, tokenizer, accelerator, reference=None):
        super().__init__(config, PPO(config.ppo), config.ppo.total_episodes, model, tokenizer, accelerator, reference,
                         config.ppo.local_rollout_forward_batch_size)
        self.ppo = config.ppo

    @property
    def kl_ctl(self):
        return self.algorithm.kl_ctl
