"""One root config per subcommand, assembled from the shared sections (sections.py), its data section and
its own options (options.py), and the declaration of every stage (STAGES) that the CLI, the validator,
`rlhf run` and the docs read."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_cli.config.diffusion import DDPOConfig
from rlhf_cli.config.fields import option, section
from rlhf_cli.config.options import (
    DPOOptions,
    EvalOptions,
    GRPOOptions,
    PPOOptions,
    RewardTrainingConfig,
    RLOOOptions,
)
from rlhf_cli.config.sections import (
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
class TokenizedDataConfig(DataConfig):
    """The data section of the stages that tokenize their whole training split before the first step."""

    dataset_num_proc: int | None = option(
        None,
        "Processes that tokenize the dataset (`datasets` map's num_proc, TRL's dataset_num_proc); null: one. "
        "Worth it for large conversational datasets, whose rows the chat template renders one at a time.",
        min=1,
    )


@dataclass
class SFTDataConfig(TokenizedDataConfig):
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
class RewardDataConfig(TokenizedDataConfig):
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
class DPODataConfig(TokenizedDataConfig):
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
