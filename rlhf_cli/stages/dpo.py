"""`rlhf dpo`: direct preference optimisation of a causal LM or an encoder-decoder (full weights or a
LoRA adapter) on prompt/chosen/rejected pairs, against the frozen starting policy (Rafailov et al. 2023).
An encoder-decoder reads the prompt in its encoder and scores each response as the decoder's target.

The output folder is a plain model (or a peft adapter folder), as `rlhf sft` writes it: it loads
with `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM` / peft and starts `rlhf ppo`, `rlhf eval` or
another `rlhf dpo`.
"""

import logging

from rlhf_cli.config.schema import DPOConfig
from rlhf_cli.data.collators import supports_packed_attention
from rlhf_cli.data.dpo_pairs import DPOCollator, Seq2SeqDPOCollator, tokenize_dpo_pairs
from rlhf_cli.data.loading import load_splits
from rlhf_cli.dpo.objective import DPOObjective, evaluate
from rlhf_cli.dpo.reference import Reference, precompute
from rlhf_cli.errors import UserError
from rlhf_cli.models.adapters import apply_lora, save_final_model
from rlhf_cli.models.dropout import disable_dropout
from rlhf_cli.models.loading import float32_master_weights, load_model, load_stage_tokenizer, model_options
from rlhf_cli.models.policy import has_reference_adapter, is_encoder_decoder, load_policy
from rlhf_cli.stages.common import finish_run, record_model, start_run
from rlhf_cli.training.loop import train_loop
from rlhf_cli.training.sharding import full_model_state

log = logging.getLogger(__name__)


def load_dpo_policy(config: DPOConfig):
    """(policy, Reference). Dropout is off in both (as TRL's disable_dropout): the log-ratio of the
    policy to the reference must not move with random masks. The reference is load_policy's, as PPO's."""
    model_cfg, seed = config.model, config.training.seed
    name = model_cfg.model_name_or_path
    if config.dpo.reference_free:
        seq2seq = is_encoder_decoder(name, model_cfg.trust_remote_code, model_cfg.revision)
        policy = load_model(name, task="seq2seq-lm" if seq2seq else "causal-lm", seed=seed, is_trainable=True,
                            **model_options(model_cfg))
        if config.peft.use_peft and not hasattr(policy, "peft_config"):
            policy = apply_lora(policy, config.peft, task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
        disable_dropout(policy)
        return float32_master_weights(policy), Reference("free")
    wrapped, frozen_copy = load_policy(model_cfg, config.peft, seed, with_value=False)
    policy = wrapped.policy
    if frozen_copy is not None:
        log.info("reference: a frozen copy of %s", name)
        return policy, Reference("copy", frozen_copy)
    if not has_reference_adapter(policy):
        log.info("reference: the policy with its LoRA adapter switched off (no second copy in memory)")
    return policy, Reference("adapter")


def run(config: DPOConfig, resume: bool = False, overwrite: bool = False) -> None:
    # 1. Output folder, accelerator, logging
    run_ = start_run("dpo", config, resume, overwrite)
    accelerator, training, data, opts = run_.accelerator, config.training, config.data, config.dpo

    # 2. Tokenizer and data: pairs -> prompt / chosen / rejected token ids, the boundary taken from the data
    #    (a dataset that cannot be read stops the run here, before the models are loaded)
    tokenizer = load_stage_tokenizer(config.model)
    train_raw, test_raw = load_splits(data)
    with accelerator.main_process_first():
        train, stats = tokenize_dpo_pairs(train_raw, tokenizer, data)
        test = tokenize_dpo_pairs(test_raw, tokenizer, data)[0] if test_raw is not None else None
    log.info("training pairs: %d kept of %d (%d cut to max_prompt_length %d / max_length %d, %d dropped with "
             "identical sides once cut)", stats["kept"], stats["pairs"], stats["truncated"], data.max_prompt_length,
             data.max_length, stats["dropped_identical"])

    # 3. The policy and its frozen reference; the collator for the model's kind
    model, reference = load_dpo_policy(config)
    record_model(run_, model)
    if training.gradient_checkpointing:
        if hasattr(model, "peft_config"):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device)
    if reference.model is not None:
        reference.model.to(accelerator.device)
    seq2seq = model.config.is_encoder_decoder
    if opts.padding_free and seq2seq:
        raise UserError(f"dpo.padding_free: {config.model.model_name_or_path} is an encoder-decoder; padding-free "
                        "batches are for causal LMs. Set dpo.padding_free: false.")
    if opts.padding_free and not supports_packed_attention(model, block_diagonal_mask=False):
        raise UserError(
            f"dpo.padding_free: {type(model).__name__} does not keep sequences apart by position_ids alone "
            "(its attention would mix the pairs of a batch); set dpo.padding_free: false."
        )

    if seq2seq:
        collate = Seq2SeqDPOCollator(tokenizer.pad_token_id, model.config.decoder_start_token_id)
    else:
        collate = DPOCollator(tokenizer.pad_token_id, padding_free=opts.padding_free)

    # 4. Reference log-probs for the whole dataset at once, when asked (a frozen copy is freed after)
    if opts.precompute_ref_log_probs:
        size = training.per_device_eval_batch_size
        train = precompute(train, reference, model, collate, size, accelerator)
        test = precompute(test, reference, model, collate, size, accelerator) if test is not None else None
        reference.release()

    # 5. Train (the loop checkpoints, evaluates and resumes)
    def run_eval(prepared_model) -> dict[str, float]:
        return evaluate(prepared_model, reference, test, collate, training.per_device_eval_batch_size, accelerator, opts)

    state = train_loop(
        accelerator=accelerator, model=model, objective=DPOObjective(opts, reference), train_dataset=train,
        collate=collate, training=training, output_dir=run_.output_dir,
        evaluate=run_eval if test is not None else None, resume_from=run_.resume_from, metrics=run_.metrics,
        tokenizer=tokenizer, progress_keys=("loss", "rewards/accuracies", "pairs_per_s"), description="dpo",
    )

    # 6. The final model at the top of output_dir (an adapter folder holds the trained adapter only)
    gathered = full_model_state(accelerator, state["model"])  # FSDP: the whole weights (every process)
    if accelerator.is_main_process:
        save_final_model(accelerator.unwrap_model(state["model"]), tokenizer, run_.output_dir, config.peft, gathered)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in state.get("eval", {}).items())
        log.info("done: %d steps; %s; model written to %s", state["step"], summary or "no held-out split", run_.output_dir)
    finish_run(run_)
