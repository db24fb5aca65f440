"""`rlhf rloo` vs TRL 1.16's RLOOTrainer, side by side, plus the floor of any RLOO.

    python bench/rloo.py                          # beta 0.05, 2 rounds of A B A B, 8 iterations
    python bench/rloo.py --rounds 1 --iterations 3 --gold-prompts 32               # a smoke run

Both sides: the same policy, prompts, groups of 4 responses, 32 responses (8 prompts) per rollout,
micro-batches of 16 (2 optimizer steps per pass), 2 passes (num_iterations), 32-token completions
(forced full length on both sides), epsilon 0.2, the same reward function, beta 0.05 (TRL's and our
default: a frozen reference; beta x the summed k1 KL of a response subtracted from its reward) and
no advantage whitening. What is measured and how: bench/group_bench.py. Prints a table, then ONE
JSON line.
"""

from group_bench import main

if __name__ == "__main__":
    main("rloo", __doc__, betas="0.05")
