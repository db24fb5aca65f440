"""Rules that involve more than one key. Single-key types and ranges are checked by the loader."""

from pathlib import Path
from typing import Any

from rlhf_cli.config.sections import GenerationConfig, RewardSourceConfig, TrainingConfig
from rlhf_cli.errors import UserError
from rlhf_cli.training.trackers import check_installed


def check_training(training: TrainingConfig) -> None:
    if training.bf16 and training.fp16:
        raise UserError("training.bf16 and training.fp16 are both true; choose at most one.")
    check_installed(training.report_to)  # before any training: accelerate would drop a missing one silently


# half-precision weights and the mixed-precision flag that gives the same compute with float32 weights
HALF_DTYPES = {"bfloat16": "training.bf16", "float16": "training.fp16"}


def check_trainable_dtype(stage: str, config: Any) -> None:
    """Refuse full weights that train in bfloat16/float16. AdamW keeps no float32 copy of them, so
    every step smaller than half a unit in the last place of a weight rounds away (at a learning rate
    of 1e-6, 98% of the weights of a bf16 model are unchanged after 10 steps). LoRA is fine: peft keeps
    adapter weights in float32 over a frozen half-precision base. (`model.dtype: auto` on a folder
    saved in half precision is upcast where the model is loaded for training: models/loading.py.)"""
    if stage not in ("sft", "reward", "ppo", "dpo", "grpo", "rloo") or config.model.dtype not in HALF_DTYPES:
        return
    dtype = config.model.dtype
    name = config.model.model_name_or_path
    # sft and ppo keep training the adapter of an adapter folder; the reward stage merges it unless use_peft
    adapter = config.peft.use_peft or (stage != "reward" and (Path(name) / "adapter_config.json").is_file())
    critic = config.ppo.value_model_name_or_path if stage == "ppo" else None
    if adapter and critic is None:
        return
    flag = HALF_DTYPES[dtype]
    if critic is not None and adapter:
        raise UserError(
            f"model.dtype: {dtype} would train the separate critic (ppo.value_model_name_or_path, loaded in "
            f"model.dtype) with all its weights in {dtype}, which loses most updates (no float32 master "
            f"weights). Use model.dtype: float32 with {flag}: true ({dtype} compute, float32 weights), or drop "
            "ppo.value_model_name_or_path to use a value head on the policy."
        )
    raise UserError(
        f"model.dtype: {dtype} with full-weight training (peft.use_peft is false) loses most updates: "
        f"AdamW keeps no float32 copy of the weights, and steps smaller than {dtype}'s precision round away. "
        f"Use model.dtype: float32 with {flag}: true ({dtype} compute, float32 weights), or train a LoRA "
        "adapter (peft.use_peft: true), whose weights peft keeps in float32."
    )


def check_reward_source(source: RewardSourceConfig, key: str) -> None:
    if (source.model is None) == (source.function is None):
        raise UserError(
            f"{key}: give exactly one of {key}.model (a reward/classifier model) or {key}.function "
            "(`package.module:callable` or `builtin:sentiment`)."
        )
    if source.function is not None and ":" not in source.function:
        raise UserError(
            f"{key}.function: {source.function!r} must be `package.module:callable` or a `builtin:` name."
        )


def check_reward(reward: Any) -> None:
    """`reward` either is one source (model/function) or lists several in `reward.sources`."""
    if reward.sources:
        if reward.model is not None or reward.function is not None:
            raise UserError("reward: give either reward.model/reward.function or reward.sources, not both.")
        for i, source in enumerate(reward.sources):
            check_reward_source(source, f"reward.sources[{i}]")
    else:
        check_reward_source(reward, "reward")


def check_eval(config: Any) -> None:
    if not config.eval.models:
        raise UserError("eval.models: list at least one model to evaluate.")
    sources = len(config.reward.sources) or 1
    if config.eval.win_rate_source >= sources:
        raise UserError(
            f"eval.win_rate_source: {config.eval.win_rate_source} is not a reward source; the reward has "
            f"{sources} source{'s' if sources > 1 else ''} (indices 0 to {sources - 1})."
        )


def check_dpo(config: Any) -> None:
    dpo, data = config.dpo, config.data
    if dpo.reference_free and dpo.precompute_ref_log_probs:
        raise UserError(
            "dpo.precompute_ref_log_probs is true but dpo.reference_free is true too: there is no reference "
            "to precompute; set one of them to false."
        )
    if dpo.label_smoothing >= 0.5:
        raise UserError(
            f"dpo.label_smoothing: {dpo.label_smoothing} would say at least half the labels are wrong; "
            "use a value in [0, 0.5)."
        )
    if dpo.label_smoothing > 0 and dpo.loss_type not in ("sigmoid", "robust"):
        raise UserError(
            f"dpo.label_smoothing applies to loss_type sigmoid or robust, not {dpo.loss_type}; set it to 0 or "
            "change dpo.loss_type."
        )
    if data.max_prompt_length >= data.max_length:
        raise UserError(
            f"data.max_prompt_length ({data.max_prompt_length}) leaves no room for a response in data.max_length "
            f"({data.max_length}); lower max_prompt_length or raise max_length."
        )


# TrainingConfig keys that DDPO's own keys replace (TRL's DDPOConfig names): a value set there would do nothing
DDPO_REPLACED = {
    "per_device_train_batch_size": "ddpo.train_batch_size (and ddpo.sample_batch_size)",
    "gradient_accumulation_steps": "ddpo.train_gradient_accumulation_steps",
    "num_train_epochs": "ddpo.num_epochs",
    "max_steps": "ddpo.num_epochs",
}


def check_ddpo(config: Any) -> None:
    """Batches that split into whole micro-batches and optimizer steps, and no key that would be ignored."""
    ddpo, defaults = config.ddpo, TrainingConfig()
    for key, instead in DDPO_REPLACED.items():
        if getattr(config.training, key) != getattr(defaults, key):
            raise UserError(f"training.{key} does not apply to rlhf ddpo; use {instead}.")
    if ddpo.sample_eta == 0:
        raise UserError("ddpo.sample_eta: 0 makes DDIM deterministic, and DDPO needs a stochastic sampler (each "
                        "denoising step's log-probability is what it trains); use a value in (0, 1], e.g. 1.0.")
    if ddpo.sample_batch_size % ddpo.train_batch_size:
        raise UserError(
            f"ddpo.train_batch_size ({ddpo.train_batch_size}) does not divide ddpo.sample_batch_size "
            f"({ddpo.sample_batch_size}); each sampled batch must split into whole training micro-batches."
        )
    micro_batches = ddpo.sample_batch_size * ddpo.sample_num_batches_per_epoch // ddpo.train_batch_size
    if micro_batches % ddpo.train_gradient_accumulation_steps:
        raise UserError(
            f"ddpo.train_gradient_accumulation_steps ({ddpo.train_gradient_accumulation_steps}) does not divide the "
            f"{micro_batches} training micro-batches of an epoch (sample_batch_size x sample_num_batches_per_epoch / "
            "train_batch_size); every optimizer step must have all its micro-batches."
        )
    if ddpo.per_prompt_stat_tracking and ddpo.per_prompt_stat_tracking_min_count > ddpo.per_prompt_stat_tracking_buffer_size:
        raise UserError(
            f"ddpo.per_prompt_stat_tracking_min_count ({ddpo.per_prompt_stat_tracking_min_count}) is larger than "
            f"ddpo.per_prompt_stat_tracking_buffer_size ({ddpo.per_prompt_stat_tracking_buffer_size}): a prompt's "
            "own statistics would never be used."
        )
    from rlhf_cli.diffusion.rewards import source_specs

    source_specs(config.reward, "reward")  # exactly one way of giving the rewards, each a callable's name


def check_generation(gen: GenerationConfig) -> None:
    if gen.min_response_length > gen.response_length:
        raise UserError(
            f"generation.min_response_length ({gen.min_response_length}) is larger than "
            f"generation.response_length ({gen.response_length}); lower it or raise response_length."
        )


def check_sft_data(data) -> None:
    markers = data.tool_result_markers
    if markers is not None and (len(markers) != 2 or not all(markers)):
        raise UserError(f"data.tool_result_markers: expected [start, end], two non-empty texts, got {markers}.")


def check_environment(env) -> None:
    for i, tool in enumerate(env.tools):
        if not tool.function:
            raise UserError(f"environment.tools[{i}]: no function; give `builtin:calculator`, `builtin:lookup` or "
                            "`package.module:callable`.")
    markers = {key: getattr(env, key) for key in ("call_start", "call_end", "result_start", "result_end")}
    for key, marker in markers.items():
        if not marker:
            raise UserError(f"environment.{key} is empty; every marker needs some text.")
    if env.call_end in (env.result_start, env.result_end):
        raise UserError("environment.call_end must differ from the result markers: generation stops at it.")
    for key in ("tool_call_start", "tool_call_end"):
        if not getattr(env, key):
            raise UserError(f"environment.{key} is empty; protocol chat finds each call between the two markers.")
    if env.tool_call_start == env.tool_call_end:
        raise UserError("environment.tool_call_end must differ from environment.tool_call_start: a call's JSON "
                        "object sits between the two.")


def check_stage(stage: str, config: Any) -> None:
    if hasattr(config, "training"):
        check_training(config.training)
    check_trainable_dtype(stage, config)
    if hasattr(config, "generation"):
        check_generation(config.generation)
    if stage in ("ppo", "grpo", "rloo", "eval"):
        check_reward(config.reward)
    if stage == "eval":
        check_eval(config)
    if stage == "sft":
        check_sft_data(config.data)
    if hasattr(config, "environment"):
        check_environment(config.environment)
        env, generation = config.environment, getattr(config, "generation", None)
        if env.tools and env.protocol == "chat" and generation is not None and generation.stop_token is None:
            raise UserError("generation.stop_token: environment.protocol chat ends each assistant turn at the stop "
                            "token, so it cannot be null; use eos or the chat template's end-of-turn token.")
        if env.tools and getattr(generation, "backend", "hf") == "vllm":
            raise UserError("generation.backend: vllm samples whole responses, but environment.tools runs a tool "
                            "between turns (HF generate); use backend hf with tools.")
    if stage == "dpo":
        check_dpo(config)
    if stage == "ddpo":
        check_ddpo(config)
    opening = getattr(getattr(config, "data", None), "prompt_opening_tokens", None)
    if opening is not None and (len(opening) != 2 or opening[0] > opening[1]):
        raise UserError(f"data.prompt_opening_tokens: expected [min, max] with min <= max, got {opening}.")
    if stage == "ppo" and config.ppo.advantage_estimator != "gae" and config.ppo.value_model_name_or_path:
        raise UserError(
            f"ppo.value_model_name_or_path is a critic, and ppo.advantage_estimator: {config.ppo.advantage_estimator} "
            "uses none; remove one of them."
        )
    if stage == "ppo":
        ppo, training = config.ppo, config.training
        rollout = training.per_device_train_batch_size * training.gradient_accumulation_steps * ppo.num_mini_batches
        if ppo.total_episodes < rollout:
            raise UserError(
                f"ppo.total_episodes ({ppo.total_episodes}) is smaller than one rollout batch "
                f"(per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches = {rollout})."
            )
    if stage in ("grpo", "rloo"):
        check_groups(stage, getattr(config, stage), config.training)
    if stage in ("ppo", "grpo", "rloo"):
        check_stop_rules(stage, getattr(config, stage), config.reward)


def check_groups(stage: str, options: Any, training: TrainingConfig) -> None:
    """A rollout batch of whole groups, and whole optimizer steps per pass over it."""
    steps = options.steps_per_generation or training.gradient_accumulation_steps
    if steps % training.gradient_accumulation_steps:
        raise UserError(
            f"{stage}.steps_per_generation ({steps}) is not a multiple of training.gradient_accumulation_steps "
            f"({training.gradient_accumulation_steps}); each optimizer step takes gradient_accumulation_steps of them."
        )
    rollout = training.per_device_train_batch_size * steps
    if rollout % options.num_generations:
        raise UserError(
            f"{stage}.num_generations ({options.num_generations}) does not divide the rollout batch "
            f"(per_device_train_batch_size x steps_per_generation = {rollout} responses per process); "
            "every prompt's group must be whole."
        )
    if options.total_episodes < rollout:
        raise UserError(
            f"{stage}.total_episodes ({options.total_episodes}) is smaller than one rollout batch ({rollout})."
        )


def check_stop_rules(stage: str, options: Any, reward: Any) -> None:
    """A stopping rule whose alarm cannot fire would never stop the run: say so (online/alarms.py)."""
    if options.stop_on_kl is not None and stage != "ppo" and options.beta == 0:
        raise UserError(f"{stage}.stop_on_kl needs a KL to watch, and {stage}.beta is 0 (no reference model); "
                        f"set {stage}.beta > 0 or remove stop_on_kl.")
    if options.stop_on_length_collapse and options.alarm_length_fraction == 0 and options.alarm_length_tokens == 0:
        raise UserError(f"{stage}.stop_on_length_collapse is true but the length alarm is off "
                        f"({stage}.alarm_length_fraction and alarm_length_tokens are 0); turn one of them on.")
    if options.stop_on_reward_divergence:
        if options.alarm_divergence_sigma is None:
            raise UserError(f"{stage}.stop_on_reward_divergence is true but {stage}.alarm_divergence_sigma is null "
                            "(the divergence alarm is off); give it a value.")
        if not any(source.weight == 0 for source in (reward.sources or [reward])):
            raise UserError(f"{stage}.stop_on_reward_divergence compares the optimised reward with a monitored one: "
                            "add a reward source with weight: 0 (e.g. the gold scorer) to reward.sources.")
