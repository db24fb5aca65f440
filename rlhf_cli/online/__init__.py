"""The online-RL engine every sampling algorithm shares (docs/online.md):

    sampler (lm/sampler.py) -> Experience (experience.py) -> Algorithm (advantages, loss)
                                                          -> Updater (updater.py: epochs, mini/micro-batches)

`OnlineTrainer` (trainer.py) puts them together; PPO, GRPO and RLOO are each one Algorithm class.
"""
