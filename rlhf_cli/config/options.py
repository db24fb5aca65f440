"""Each training algorithm's own section of a config -- `ppo:`, `grpo:`, `rloo:`, `dpo:`, `reward:` (the
reward model's loss) and `eval:` -- with its keys, defaults, bounds and help text (DDPO's: diffusion.py)."""

from dataclasses import dataclass

from rlhf_cli.config.fields import option
from rlhf_cli.config.sections import AlarmOptions


@dataclass
class RewardTrainingConfig:
    center_rewards_coefficient: float | None = option(
        None, "Weight of a penalty on (r_chosen + r_rejected)^2 that keeps rewards centred on zero.", min=0.0
    )


@dataclass
class PPOOptions(AlarmOptions):
    total_episodes: int = option(1024, "Responses generated and trained on in the whole run.", min=1)
    num_ppo_epochs: int = option(4, "Passes over each rollout batch.", min=1)
    num_mini_batches: int = option(1, "Mini-batches each rollout batch is split into per epoch.", min=1)
    local_rollout_forward_batch_size: int = option(
        64, "Rows per no-grad forward pass when computing reference log-probs, values and rewards (a longer "
        "rollout is read longest rows first, in passes of rows of similar length).", min=1
    )
    kl_coef: float = option(0.05, "Weight of the per-token KL penalty to the reference model.", min=0.0)
    kl_estimator: str = option(
        "k1", "Per-token KL estimator: k1 (log ratio) or k3 (unbiased, always positive).", choices=("k1", "k3")
    )
    adaptive_kl: bool = option(False, "Adapt kl_coef towards target_kl (Ziegler et al. 2019).")
    target_kl: float = option(6.0, "Target sequence-level KL of the adaptive controller.", greater_than=0.0)
    kl_horizon: int = option(10000, "Horizon (episodes) of the adaptive KL controller.", min=1)
    cliprange: float = option(0.2, "PPO clip range of the policy ratio.", greater_than=0.0)
    cliprange_value: float = option(0.2, "Clip range of the value prediction around its rollout value.", greater_than=0.0)
    vf_coef: float = option(0.1, "Weight of the value loss.", min=0.0)
    entropy_coef: float = option(0.0, "Weight of an entropy bonus in the policy loss.", min=0.0)
    gamma: float = option(1.0, "Discount factor.", min=0.0, max=1.0)
    lam: float = option(0.95, "GAE lambda.", min=0.0, max=1.0)
    whiten_rewards: bool = option(False, "Whiten the per-token rewards over valid tokens before GAE.")
    reward_clip: float | None = option(None, "Clip scores to [-reward_clip, reward_clip].", greater_than=0.0)
    missing_eos_penalty: float | None = option(
        None, "Subtract this from the score of a response that never produced the stop token."
    )
    value_model_name_or_path: str | None = option(
        None, "A separate critic (e.g. the reward model) instead of a value head on the policy."
    )
    advantage_estimator: str = option(
        "gae",
        "`gae`: a critic and GAE (PPO); `reinforce++`: no critic, advantages are the discounted sum of the "
        "per-token rewards (KL penalty on every token, the score on the last) whitened over the whole batch "
        "(REINFORCE++, Hu 2025); docs/ppo.md.",
        choices=("gae", "reinforce++"),
    )
    sample_steps: int = option(10, "Write a few (prompt, response, reward) rows every this many iterations.", min=1)
    num_sample_rows: int = option(4, "Rows written each time samples are logged.", min=0)


@dataclass
class GroupOptions(AlarmOptions):
    """What GRPO and RLOO share: groups of responses per prompt, TRL's key names where TRL has them (and the
    reward-hacking alarms every online stage has)."""

    total_episodes: int = option(1024, "Responses generated and trained on in the whole run.", min=1)
    num_generations: int = option(
        8, "Responses sampled per prompt (the group its advantages are measured within); at least 2.", min=2
    )
    steps_per_generation: int | None = option(
        None,
        "Micro-batches of per_device_train_batch_size responses in one rollout batch (null: "
        "gradient_accumulation_steps). Each pass over it makes steps_per_generation / "
        "gradient_accumulation_steps optimizer steps.",
        min=1,
    )
    num_iterations: int = option(1, "Passes over each rollout batch (mu in the GRPO paper).", min=1)
    beta: float = option(
        0.0, "Weight of the KL to the reference; 0 loads no reference model at all.", min=0.0
    )
    epsilon: float = option(0.2, "Clip range of the importance ratio (lower side, and upper without epsilon_high).",
                            greater_than=0.0)
    epsilon_high: float | None = option(
        None, "Upper clip range of the ratio (DAPO's clip-higher); null: epsilon.", greater_than=0.0
    )
    mask_truncated_completions: bool = option(
        False, "Leave responses that never produced the stop token out of the loss (they still count in the group)."
    )
    local_rollout_forward_batch_size: int = option(
        64, "Rows per generation call and per no-grad forward pass (log-probs, reference; a longer rollout is "
        "read longest groups first, in passes of rows of similar length).", min=1
    )
    share_prompt_prefix: bool = option(
        True,
        "Run each distinct prompt of a forward's rows through the model once and let all its responses read "
        "it (a shared KV cache; a shared encoder output): the same log-probs and gradients, less work the "
        "longer the prompts (docs/grpo.md). Off by itself where the model cannot (the log says why).",
    )
    sample_steps: int = option(10, "Write a few (prompt, response, reward) rows every this many iterations.", min=1)
    num_sample_rows: int = option(4, "Rows written each time samples are logged.", min=0)


@dataclass
class GRPOOptions(GroupOptions):
    loss_type: str = option(
        "dapo",
        "How per-token losses are averaged (docs/grpo.md): `grpo` (per response, then over responses), "
        "`dr_grpo` (sum / (responses x response_length)), `dapo` (over all tokens of the mini-batch, every "
        "process), `bnpo` (over this process's tokens of the mini-batch).",
        choices=("grpo", "dr_grpo", "dapo", "bnpo"),
    )
    scale_rewards: str = option(
        "group",
        "Divide advantages by the reward std of the `group`, of the whole `batch`, or `none` (Dr. GRPO).",
        choices=("group", "batch", "none"),
    )
    kl_estimator: str = option(
        "k3", "Per-token KL estimator in the loss: k3 (always >= 0, TRL's) or k1.", choices=("k1", "k3")
    )


@dataclass
class RLOOOptions(GroupOptions):
    num_generations: int = option(
        2, "Responses sampled per prompt (each one's baseline is the mean reward of the others); at least 2.", min=2
    )
    beta: float = option(
        0.05, "Weight of the KL to the reference; 0 loads no reference model at all.", min=0.0
    )
    kl_in_reward: bool = option(
        True,
        "Subtract beta x the response's summed KL (k1) from its reward, as RLOO and TRL do; false: a k3 KL "
        "term in the loss, as GRPO.",
    )
    normalize_advantages: bool = option(False, "Whiten the advantages over the rollout batch.")


@dataclass
class DPOOptions:
    beta: float = option(
        0.1, "Strength of the implicit KL to the reference: higher stays closer to it (TRL's beta).", greater_than=0.0
    )
    loss_type: str = option(
        "sigmoid",
        "`sigmoid` (DPO), `robust` (noise-robust DPO), `ipo` (IPO, on length-averaged log-probs), `hinge` "
        "(SLiC), `apo_zero` (APO-zero: chosen up, rejected down, each against the reference); docs/dpo.md.",
        choices=("sigmoid", "robust", "ipo", "hinge", "apo_zero"),
    )
    label_smoothing: float = option(
        0.0, "Assumed probability that a pair's label is flipped (sigmoid: cDPO; robust); below 0.5.", min=0.0
    )
    reference_free: bool = option(
        False, "No reference model: its log-probs are taken as 0 (the loss sees the policy's margins alone)."
    )
    precompute_ref_log_probs: bool = option(
        False,
        "Compute the reference log-probs of every pair once before training (then a full-weight reference "
        "is freed) instead of one reference pass per batch.",
    )
    rpo_alpha: float | None = option(
        None, "Weight of an NLL term on the chosen response (RPO, Pang et al. 2024); null: none.", min=0.0
    )
    padding_free: bool = option(
        False,
        "Concatenate the batch's sequences into one row without padding (position_ids restart per sequence); "
        "for models whose attention keeps packed sequences apart (checked at start).",
    )


@dataclass
class EvalOptions:
    models: list[str] = option(
        [], "Models to evaluate: folders (rlhf outputs, with adapters or value heads), `builtin:` or Hub names."
    )
    baseline_model: str | None = option(
        None,
        "Model the others' win rate is measured against (evaluated too when it is not in eval.models); "
        "null skips win rates.",
    )
    reference_model: str | None = option(
        None, "Model the KL of each evaluated model is measured to (same vocabulary); null skips KL."
    )
    win_rate_source: int = option(
        0, "Index (in reward.sources) of the reward source that decides wins and is plotted.", min=0
    )
    num_prompts: int = option(128, "Held-out prompts to generate from (the first rows of the test split).", min=1)
    samples_per_prompt: int = option(1, "Responses per prompt and model.", min=1)
    perplexity_dataset: str | None = option(
        None, "A text dataset (name or file) for held-out perplexity of each causal model; null skips it."
    )
    perplexity_split: str = option(
        "test", "Split of perplexity_dataset to score (a dataset with a single split uses that one)."
    )
    perplexity_text_column: str = option("text", "Column of perplexity_dataset holding the text.")
    perplexity_max_samples: int | None = option(
        None, "Score at most this many texts of perplexity_dataset (null: all).", min=1
    )
    seed: int = option(0, "Sampling seed, the same for every model (batch b is sampled with seed + b).", min=0)
    output_dir: str = option(
        "outputs/eval", "Folder for eval.json, samples.jsonl, plots.json and the PNG plots."
    )
    batch_size: int = option(32, "Rows (prompt x sample) per generation and forward batch.", min=1)
    plots: bool = option(True, "Draw PNG plots (needs matplotlib: pip install 'rlhf-cli[plots]').")
