"""`rlhf reward` vs TRL 1.16's RewardTrainer, side by side.

    python bench/reward.py                   # 2 rounds of A B A B, 10 optimizer steps per run

Both sides: the same `builtin:small-gpt2` start (bench/.work/policy-small-gpt2) with a fresh scalar
head, builtin:review-preferences (prompt + chosen / rejected), the same batch of pairs, learning rate,
schedule, weight decay, gradient clipping and center_rewards_coefficient. Held-out accuracy: each
trainer's own evaluation (each formats pairs its own way: TRL appends EOS, we do not). What is measured
and how: bench/pairs_bench.py.
"""

from pairs_bench import main

if __name__ == "__main__":
    main("reward", "Reward", __doc__, {"learning_rate": 3e-4, "weight_decay": 0.01, "center_rewards_coefficient": 0.01})
