"""The config sections shared by the stages: model, peft, data, training, generation, reward.

Key names follow transformers' `TrainingArguments` and TRL's configs, so a TRL user recognises
every key. Each field's help text lives in its metadata (see `option`).
"""

from dataclasses import dataclass

from rlhf_cli.config.fields import option

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")


@dataclass
class ModelConfig:
    model_name_or_path: str = option(
        "builtin:tiny-gpt2",
        "Model to start from: a `builtin:` name, a local folder (an `rlhf` output folder works) or a "
        "Hugging Face Hub name.",
    )
    tokenizer_name_or_path: str | None = option(
        None, "Tokenizer to use; null means the one saved with the model."
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    dtype: str = option(
        "auto",
        "Dtype the weights are loaded in; `auto`: the dtype the checkpoint was saved in (built-ins: float32). "
        "Weights that train must be float32 (AdamW on half-precision weights loses small updates): "
        "`bfloat16`/`float16` suits a frozen base under a LoRA adapter (`peft.use_peft`) and is refused when "
        "full weights train; for half-precision compute use `float32` with `training.bf16`/`training.fp16`. "
        "Full weights that `auto` loads in half precision are upcast to float32 for training.",
        choices=DTYPES,
    )
    trust_remote_code: bool = option(
        False, "Run modelling code shipped with a Hub model. Off by default; announced when on."
    )
    attn_implementation: str | None = option(
        None,
        "Attention kernel: `eager`, `sdpa` (PyTorch's fused attention), `flash_attention_2` (needs the "
        "flash-attn package and a CUDA GPU) or `flex_attention`; null: transformers' default for the "
        "architecture (sdpa where it supports it). Recorded in run_info.json with the dtype the weights loaded in.",
        choices=ATTN_IMPLEMENTATIONS,
    )


@dataclass
class PeftConfig:
    use_peft: bool = option(False, "Train a LoRA adapter (through `peft`) instead of all weights.")
    lora_r: int = option(16, "LoRA rank.", min=1)
    lora_alpha: int = option(32, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).", min=1)
    lora_dropout: float = option(0.05, "Dropout on the LoRA branch during training.", min=0.0, max=1.0)
    lora_target_modules: list[str] | None = option(
        None,
        "Module names to adapt, e.g. [c_attn, c_proj]; null means peft's default for the architecture "
        "(or all linear layers when peft has none).",
    )
    save_merged: bool = option(
        False, "Also write the adapter merged into the base weights, in `<output_dir>/merged`."
    )


@dataclass
class DataConfig:
    dataset_name: str = option(
        "builtin:reviews",
        "Dataset: a `builtin:` name, a Hub dataset name, a local .jsonl/.json/.csv/.parquet file or a "
        "folder written by `save_to_disk`.",
    )
    dataset_config: str | None = option(None, "Hub dataset configuration name (the `name` of load_dataset).")
    dataset_train_split: str = option("train", "Split to train on.")
    dataset_test_split: str | None = option(
        "test", "Held-out split for evaluation; null to skip evaluation."
    )
    max_train_samples: int | None = option(None, "Use at most this many training rows (null: all).", min=1)
    max_eval_samples: int | None = option(None, "Use at most this many held-out rows (null: all).", min=1)
    max_length: int = option(512, "Maximum tokens per sequence; longer ones are truncated.", min=2)
    world_seed: int = option(
        0,
        "Seed of a `builtin:` dataset. Keep it equal across stages so held-out rows stay unseen.",
        min=0,
    )


@dataclass
class TrainingConfig:
    output_dir: str = option("outputs/run", "Folder for the resolved config, metrics, checkpoints and model.")
    seed: int = option(42, "Seed for Python, NumPy and torch (and the data order).", min=0)
    learning_rate: float = option(5e-5, "Peak learning rate of AdamW.", greater_than=0.0)
    lr_scheduler_type: str = option(
        "linear",
        "Learning-rate schedule after warmup.",
        choices=("linear", "cosine", "constant", "constant_with_warmup"),
    )
    warmup_steps: int = option(0, "Linear warmup steps (overrides warmup_ratio when > 0).", min=0)
    warmup_ratio: float = option(0.0, "Fraction of the optimizer steps used for warmup.", min=0.0, max=1.0)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0.0)
    adam_beta1: float = option(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = option(0.999, "AdamW beta2.", min=0.0, max=1.0)
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", greater_than=0.0)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value; 0 disables.", min=0.0)
    per_device_train_batch_size: int = option(8, "Training batch size per process (per micro-batch).", min=1)
    per_device_eval_batch_size: int = option(16, "Evaluation batch size per process.", min=1)
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.", min=1)
    num_train_epochs: float = option(1.0, "Passes over the training data (ignored when max_steps > 0).", greater_than=0.0)
    max_steps: int = option(-1, "Total optimizer steps; -1 means use num_train_epochs.", min=-1)
    logging_steps: int = option(10, "Log metrics every this many optimizer steps.", min=1)
    eval_steps: int | None = option(
        None, "Evaluate on the held-out split every this many steps (null: at the end only).", min=1
    )
    save_steps: int = option(500, "Write a resumable checkpoint every this many steps.", min=1)
    save_total_limit: int | None = option(
        2, "Keep at most this many checkpoints (oldest deleted first); null keeps all.", min=1
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    skip_nonfinite_batches: bool = option(
        False, "Skip a batch with a NaN/inf loss or gradient (PPO: NaN/inf rewards) and count it as nonfinite_skips, "
        "instead of stopping the run.",
    )
    bf16: bool = option(False, "Train in bfloat16 mixed precision (needs hardware support).")
    fp16: bool = option(False, "Train in float16 mixed precision (CUDA only).")
    report_to: list[str] = option(
        [],
        "Experiment trackers (through accelerate) that also get the metrics.jsonl rows, and the resolved config "
        "as hyper-parameters; metrics.jsonl is always written. They write under output_dir unless their own "
        "variables say otherwise: tensorboard/, wandb/ (WANDB_DIR; WANDB_MODE=offline to use no server), mlruns/ "
        "(MLFLOW_TRACKING_URI); trackio writes to TRACKIO_DIR (default $HF_HOME/trackio). Install them with "
        "`pip install 'rlhf-cli[trackers]'` (docs/trackers.md).",
        choices=("tensorboard", "wandb", "mlflow", "trackio"),
    )
    run_name: str | None = option(None, "Name of the run for trackers (default: the output folder's name).")


@dataclass
class GenerationConfig:
    response_length: int = option(32, "Maximum new tokens per response.", min=1)
    min_response_length: int = option(
        0, "Suppress the stop token until a response has this many tokens.", min=0
    )
    temperature: float = option(
        0.7, "Sampling temperature; also divides the logits when log-probs are computed.", greater_than=0.0
    )
    top_k: int = option(0, "Sample from the k most likely tokens; 0 disables.", min=0)
    top_p: float = option(1.0, "Nucleus sampling mass; 1.0 disables.", greater_than=0.0, max=1.0)
    stop_token: str | None = option(
        "eos", "Where a response ends: `eos` (the tokenizer's EOS), another token's text, or null (never)."
    )


@dataclass
class OnlineGenerationConfig(GenerationConfig):
    """Sampling in the online stages (ppo, grpo, rloo): the settings above, and which engine samples."""

    backend: str = option(
        "hf",
        "What samples the rollouts: `hf` (transformers' `generate` on the policy being trained) or `vllm` (a vLLM "
        "engine beside training on each GPU, weights synced before each rollout; needs `pip install "
        "'rlhf-cli[vllm]'` and a CUDA GPU; docs/online.md).",
        choices=("hf", "vllm"),
    )
    vllm_gpu_memory_utilization: float = option(
        0.3, "With backend vllm: the fraction of each GPU's memory the vLLM engine may take (weights and KV cache).",
        greater_than=0.0, max=1.0,
    )


@dataclass
class RewardSourceConfig:
    model: str | None = option(
        None,
        "A reward model (an `rlhf reward` output) or any sequence-classification model: folder, Hub name "
        "or `builtin:`.",
    )
    function: str | None = option(
        None,
        "A Python callable `package.module:callable` taking (prompts, responses, **columns) and "
        "returning one float per response, or a built-in such as `builtin:sentiment`.",
    )
    label: str | None = option(
        None, "For a classifier with several labels: the label (name or index) whose output is the reward."
    )
    output: str = option(
        "logit", "Use the classifier's raw logit or its probability.", choices=("logit", "probability")
    )
    normalize: bool = option(
        False, "Normalise scores with the mean/std that `rlhf reward` saved beside the model."
    )
    tokenizer_name_or_path: str | None = option(
        None, "Tokenizer of the reward model, when it differs from the one saved with it."
    )
    weight: float = option(1.0, "Weight of this source in the combined reward.")
    batch_size: int = option(32, "Responses scored per forward pass.", min=1)


@dataclass
class AlarmOptions:
    """Reward-hacking alarms and stopping rules of the online stages (ppo, grpo, rloo): rlhf_cli/online/alarms.py,
    docs/ppo.md (Reward hacking alarms)."""

    alarm_window: int = option(
        5,
        "Iterations the reward-hacking alarms average: the first alarm_window iterations are the baseline, "
        "the latest ones are compared with it.",
        min=2,
    )
    alarm_length_fraction: float = option(
        0.5,
        "Length alarm when the mean response length falls below this fraction of the baseline's; 0 turns it off.",
        min=0.0, max=1.0,
    )
    alarm_length_tokens: float = option(
        2.0,
        "Length alarm also when the mean response length (stop token included) falls to this many tokens from a "
        "longer baseline; 0 turns it off.",
        min=0.0,
    )
    alarm_kl: float | None = option(
        20.0, "KL alarm when the mean KL to the reference (nats per response) exceeds this; null turns it off.",
        greater_than=0.0,
    )
    alarm_divergence_sigma: float | None = option(
        4.0,
        "Divergence alarm (with a weight-0 reward source): standard errors that make a change of a reward clear. "
        "It fires when the optimised reward rose this much and the monitored one did not follow, or the monitored "
        "one fell this much from its best while the optimised held (docs/ppo.md); null turns it off.",
        greater_than=0.0,
    )
    stop_on_kl: float | None = option(
        None, "Stop the run (final save, exit 0) when the mean KL (nats per response) exceeds this; null: never.",
        greater_than=0.0,
    )
    stop_on_length_collapse: bool = option(False, "Stop the run (final save, exit 0) when the length alarm fires.")
    stop_on_reward_divergence: bool = option(
        False, "Stop the run (final save, exit 0) when the divergence alarm fires (needs a weight-0 reward source)."
    )


@dataclass
class ToolConfig:
    """One tool of a text environment (rlhf_cli/environments/tools.py). A plain string in the list is
    its `function`."""

    SHORTHAND = "function"
    function: str | None = option(
        None, "`builtin:calculator`, `builtin:lookup` (needs `corpus`) or any `package.module:callable` taking "
        "the argument string the model wrote and returning the text it reads back."
    )
    name: str | None = option(None, "The name the model calls it by; null: calculator / lookup / the callable's name.")
    corpus: str | None = option(None, "For builtin:lookup: a text file, one passage per line.")


@dataclass
class EnvironmentConfig:
    """A text environment: tools the policy calls mid-response (rlhf_cli/environments/, docs/environments.md)."""

    tools: list[ToolConfig] = option(
        [], "Tools the model may call, each `builtin:calculator`, `package.module:callable` or a mapping "
        "{function, name, corpus} (`builtin:lookup` needs a corpus file); empty: no environment, one generate "
        "call per response (docs/environments.md)."
    )
    protocol: str = option(
        "text", "How calls are written: `text` (the model writes `<call>name argument</call>` in plain text and "
        "reads `<result>...</result>`; for base models) or `chat` (for chat models: prompts are conversations "
        "rendered with the tools' JSON schemas, the model writes `<tool_call>{\"name\": ..., \"arguments\": {...}}"
        "</tool_call>` in its turn, results come back as `tool` messages through the chat template; "
        "docs/environments.md).", choices=("text", "chat"),
    )
    max_turns: int = option(4, "Generate calls per episode at most (each call to a tool starts a new turn).", min=1)
    max_length: int = option(
        256, "Response tokens of an episode at most, tool results included (generation.response_length bounds "
        "each turn).", min=1,
    )
    max_tool_response: int = option(200, "Characters of a tool's answer the model reads at most (the rest is cut).", min=1)
    tool_timeout_s: float = option(5.0, "Seconds a tool call may take; later, the model reads a timeout error.",
                                   greater_than=0.0)
    tool_workers: int = option(
        16, "Tool calls of a turn that run at once (each in its own thread); the rest wait for a free one.", min=1
    )
    call_start: str = option("<call>", "Protocol text: marker the model writes before a call (`<call>calculator 2+3</call>`).")
    call_end: str = option("</call>", "Protocol text: marker that ends a call; generation stops there and the tool runs.")
    result_start: str = option("<result>", "Protocol text: marker written before a tool's answer.")
    result_end: str = option("</result>", "Protocol text: marker written after a tool's answer.")
    tool_call_start: str = option(
        "<tool_call>", "Protocol chat: the marker before each call's JSON object in the assistant's turn (Hermes / Qwen)."
    )
    tool_call_end: str = option("</tool_call>", "Protocol chat: the marker after each call's JSON object.")
