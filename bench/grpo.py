"""`rlhf grpo` vs TRL 1.16's GRPOTrainer, side by side, plus the floor of any GRPO.

    python bench/grpo.py                          # beta 0 and 0.04, 2 rounds of A B A B, 8 iterations
    python bench/grpo.py --betas 0 --rounds 1 --iterations 3 --gold-prompts 32      # a smoke run

Both sides: the same policy, prompts, groups of 8 responses, 32 responses (4 prompts) per rollout,
micro-batches of 16 (2 optimizer steps per pass), 2 passes (num_iterations), 32-token completions
(forced full length on both sides), loss_type dapo, scale_rewards group, epsilon 0.2, the same reward
function; beta 0 (no reference model on either side) and beta 0.04 (a frozen reference, k3 KL in the
loss). What is measured and how: bench/group_bench.py. Prints a table, then ONE JSON line.
"""

from group_bench import main

if __name__ == "__main__":
    main("grpo", __doc__, betas="0.04")
