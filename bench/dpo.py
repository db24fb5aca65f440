"""`rlhf dpo` vs TRL 1.16's DPOTrainer, side by side.

    python bench/dpo.py                      # 2 rounds of A B A B, 10 optimizer steps per run

Both sides: the same `builtin:small-gpt2` start (bench/.work/policy-small-gpt2) as policy and, frozen,
as reference; builtin:review-preferences (prompt + chosen / rejected), the same batch of pairs,
max_length, beta, sigmoid loss, learning rate, schedule and gradient clipping. Held-out accuracy of the
implicit reward (from a 10-step run it says little; it shows both sides train the same thing). What is
measured and how: bench/pairs_bench.py.
"""

from pairs_bench import main

if __name__ == "__main__":
    main("dpo", "DPO", __doc__, {"learning_rate": 5e-5, "beta": 0.1})
