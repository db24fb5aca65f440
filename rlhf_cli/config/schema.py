"""One root config per subcommand, assembled from the shared sections plus its own options, and the
declaration of every stage (STAGES) that the CLI, the validator, `rlhf run` and the docs read."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_cli.config.diffusion import DDPOConfig
from rlhf_cli.config.fields import option, section
from rlhf_cli.config.sections import (
    AlarmOptions,
    DataConfig,
    EnvironmentConfig,
    GenerationConfig,
    ModelConfig,
    OnlineGenerationConfig,
    PeftConfig,
    RewardSourceConfig,
    TrainingConfig,
)


@dataclass
class SFTDataConfig(DataConfig):
    dataset_format: str = option(
        "auto",
        "Row format: `text` (language modelling), `prompt-completion`, `messages` (conversational, "
        "formatted with the chat template); `auto` picks from the columns present.",
        choices=("auto", "text", "prompt-completion", "messages"),
    )
    text_column: str = option("text", "Column holding plain text.")
    prompt_column: str = option("prompt", "Column holding the prompt.")
    completion_column: str = option("completion", "Column holding the completion.")
    messages_column: str = option("messages", "Column holding a list of {role, content} messages.")
    completion_only_loss: bool = option(
        True, "Train only on completion / assistant tokens (prompt and user tokens are masked)."
    )
    packing: bool = option(False, "Pack several short examples into each max_length sequence.")
    tool_result_markers: list[str] | None = option(
        None,
        "For demonstrations of a text environment: [start, end] markers of the tool results inside "
        "completions (e.g. [\"<result>\", \"</result>\"]); each result, markers included, is tokenized on its "
        "own, as the environment appends it, and is not trained. null: none.",
    )


@dataclass
class RewardDataConfig(DataConfig):
    dataset_name: str = option(
        "builtin:review-preferences",
        "Preference dataset: a `builtin:` name, Hub name, local file or `save_to_disk` folder.",
    )
    prompt_column: str | None = option(
        "prompt", "Column holding the prompt; null when chosen/rejected already contain it."
    )
    chosen_column: str = option("chosen", "Column holding the preferred response.")
    rejected_column: str = option("rejected", "Column holding the dispreferred response.")
    margin_column: str | None = option(None, "Optional column with a margin the chosen score must exceed by.")
    long_pairs: str = option(
        "truncate", "What to do with pairs longer than max_length.", choices=("truncate", "drop")
    )


@dataclass
class DPODataConfig(DataConfig):
    dataset_name: str = option(
        "builtin:review-preferences",
        "Preference dataset: a `builtin:` name, Hub name, local file or `save_to_disk` folder.",
    )
    prompt_column: str | None = option(
        "prompt",
        "Column holding the prompt (text or messages); null when chosen/rejected already contain it "
        "(the prompt is then their common beginning).",
    )
    chosen_column: str = option("chosen", "Column holding the preferred response.")
    rejected_column: str = option("rejected", "Column holding the dispreferred response.")
    max_prompt_length: int = option(256, "Maximum prompt tokens; longer prompts are cut (truncation_mode).", min=1)
    truncation_mode: str = option(
        "keep_end",
        "Which end of a long prompt to keep: `keep_end` (the tokens next to the response) or `keep_start`. "
        "A response that does not fit in max_length keeps its first tokens.",
        choices=("keep_end", "keep_start"),
    )


@dataclass
class PromptDataConfig(DataConfig):
    prompt_column: str = option("prompt", "Column holding the prompt (a string or a list of messages).")
    max_prompt_length: int = option(64, "Maximum prompt tokens.", min=1)
    long_prompts: str = option(
        "truncate_left",
        "Prompts longer than max_prompt_length: keep their last tokens, or stop with an error.",
        choices=("truncate_left", "reject"),
    )
    prompt_opening_tokens: list[int] | None = option(
        None,
        "[min, max]: use only the first k tokens of each prompt, k drawn per row between min and max "
        "(seeded by world_seed) — the classic IMDB setup of review openings as prompts.",
        min=1,
    )


@dataclass
class RewardConfig(RewardSourceConfig):
    sources: list[RewardSourceConfig] = option(
        [], "Several reward sources combined as a weighted sum (instead of model/function above)."
    )


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
        64, "Rows per no-grad forward pass when computing reference log-probs, values and rewards.", min=1
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
        64, "Rows per generation call and per no-grad forward pass (log-probs, reference).", min=1
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


@dataclass
class SFTConfig:
    model: ModelConfig = section(ModelConfig, "The model to fine-tune.")
    peft: PeftConfig = section(PeftConfig, "LoRA adapters.")
    data: SFTDataConfig = section(SFTDataConfig, "The training data and its format.")
    training: TrainingConfig = section(TrainingConfig, "Optimisation, logging and checkpoints.")


@dataclass
class RewardModelConfig:
    model: ModelConfig = section(ModelConfig, "The model the scalar head is put on.")
    peft: PeftConfig = section(PeftConfig, "LoRA adapters (the score head is always fully trained).")
    data: RewardDataConfig = section(RewardDataConfig, "The preference pairs.")
    training: TrainingConfig = section(TrainingConfig, "Optimisation, logging and checkpoints.")
    reward: RewardTrainingConfig = section(RewardTrainingConfig, "Reward-model loss options.")


@dataclass
class PPOConfig:
    model: ModelConfig = section(ModelConfig, "The policy (and the frozen reference made from it).")
    peft: PeftConfig = section(PeftConfig, "LoRA adapters on the policy; the reference is the starting policy (docs/ppo.md, detail 9).")
    data: PromptDataConfig = section(PromptDataConfig, "The prompts.")
    training: TrainingConfig = section(TrainingConfig, "Optimisation, logging and checkpoints.")
    generation: OnlineGenerationConfig = section(OnlineGenerationConfig, "Sampling of responses.")
    reward: RewardConfig = section(RewardConfig, "What scores a response.")
    environment: EnvironmentConfig = section(EnvironmentConfig, "Tools the policy calls mid-response (a text environment).")
    ppo: PPOOptions = section(PPOOptions, "PPO and KL options.")


@dataclass
class GRPOConfig:
    model: ModelConfig = section(ModelConfig, "The policy (and the frozen reference made from it when grpo.beta > 0).")
    peft: PeftConfig = section(PeftConfig, "LoRA adapters on the policy.")
    data: PromptDataConfig = section(PromptDataConfig, "The prompts (other columns reach reward functions).")
    training: TrainingConfig = section(TrainingConfig, "Optimisation, logging and checkpoints.")
    generation: OnlineGenerationConfig = section(OnlineGenerationConfig, "Sampling of responses.")
    reward: RewardConfig = section(RewardConfig, "What scores a response.")
    environment: EnvironmentConfig = section(EnvironmentConfig, "Tools the policy calls mid-response (a text environment).")
    grpo: GRPOOptions = section(GRPOOptions, "Groups, the clipped loss and the KL term.")


@dataclass
class RLOOConfig:
    model: ModelConfig = section(ModelConfig, "The policy (and the frozen reference made from it when rloo.beta > 0).")
    peft: PeftConfig = section(PeftConfig, "LoRA adapters on the policy.")
    data: PromptDataConfig = section(PromptDataConfig, "The prompts (other columns reach reward functions).")
    training: TrainingConfig = section(TrainingConfig, "Optimisation, logging and checkpoints.")
    generation: OnlineGenerationConfig = section(OnlineGenerationConfig, "Sampling of responses.")
    reward: RewardConfig = section(RewardConfig, "What scores a response.")
    environment: EnvironmentConfig = section(EnvironmentConfig, "Tools the policy calls mid-response (a text environment).")
    rloo: RLOOOptions = section(RLOOOptions, "Groups, the leave-one-out baseline and the KL.")


@dataclass
class DPOConfig:
    model: ModelConfig = section(
        ModelConfig, "The policy (any causal LM, full weights or a LoRA adapter folder) and its frozen reference."
    )
    peft: PeftConfig = section(
        PeftConfig, "LoRA adapters on the policy; the reference is then the model with the adapter off."
    )
    data: DPODataConfig = section(DPODataConfig, "The preference pairs.")
    training: TrainingConfig = section(TrainingConfig, "Optimisation, logging and checkpoints.")
    dpo: DPOOptions = section(DPOOptions, "The DPO loss and its reference.")


@dataclass
class EvalConfig:
    eval: EvalOptions = section(EvalOptions, "What to compare and where to write it.")
    data: PromptDataConfig = section(PromptDataConfig, "The held-out prompts.")
    generation: GenerationConfig = section(GenerationConfig, "Sampling settings, the same for every model.")
    reward: RewardConfig = section(RewardConfig, "The rewards every model is scored with.")
    environment: EnvironmentConfig = section(
        EnvironmentConfig, "Tools every model may call mid-response (a text environment); none: plain sampling."
    )


@dataclass(frozen=True)
class Stage:
    """A subcommand, declared once: `rlhf <name> CONFIG` builds `config` from the YAML and calls
    `run(config, resume=, overwrite=)` of the module `rlhf_cli.stages.<name>` (imported when it runs)."""

    name: str
    config: type
    help: str
    output_dir_key: str = "training.output_dir"
    # files a run's checkpoints hold beyond every checkpoint's, from its config
    checkpoint_files: Callable[[Any], tuple[str, ...]] = lambda config: ()
    one_process: bool = False  # under `rlhf run` with several processes, only the main one runs it

    @property
    def module(self) -> str:
        return f"rlhf_cli.stages.{self.name}"


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", SFTConfig, "Supervised fine-tuning of a causal language model (or a LoRA adapter)."),
    Stage("reward", RewardModelConfig, "Train a pairwise (Bradley-Terry) reward model from preference pairs."),
    Stage("ppo", PPOConfig, "PPO against a reward: a reward model, a classifier or any Python function.",
          checkpoint_files=lambda c: ("value_head.safetensors",) if c.ppo.advantage_estimator == "gae" else ()),
    Stage("dpo", DPOConfig, "Direct preference optimisation of a causal LM (or a LoRA adapter) on preference pairs."),
    Stage("grpo", GRPOConfig,
          "GRPO against a reward: group-normalised advantages over several responses per prompt, no critic."),
    Stage("rloo", RLOOConfig,
          "RLOO against a reward: a leave-one-out baseline over several responses per prompt, no critic."),
    Stage("ddpo", DDPOConfig,
          "DDPO: train a text-to-image diffusion pipeline (its UNet, or LoRA on it) against an image reward."),
    Stage("eval", EvalConfig, "Score, compare and plot models and checkpoints.", output_dir_key="eval.output_dir",
          one_process=True),
)}
