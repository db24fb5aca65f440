"""`rlhf sft`: supervised fine-tuning of a causal language model, an encoder-decoder (T5, BART: the
prompt is the encoder's input, the completion the decoder's target), or a LoRA adapter on either."""

import logging
import math

import torch

from rlhf_cli.config.schema import SFTConfig, SFTDataConfig
from rlhf_cli.data.collators import Seq2SeqCollator, SFTCollator, supports_packed_attention
from rlhf_cli.data.loading import load_splits
from rlhf_cli.data.packing import pack_dataset
from rlhf_cli.data.seq2seq_format import tokenize_seq2seq_dataset
from rlhf_cli.data.sft_format import detect_format, tokenize_dataset
from rlhf_cli.errors import UserError
from rlhf_cli.lm.head import read_tokens
from rlhf_cli.models.adapters import apply_lora, save_final_model
from rlhf_cli.models.loading import float32_master_weights, load_model, load_stage_tokenizer, model_options
from rlhf_cli.models.policy import is_encoder_decoder
from rlhf_cli.stages.common import finish_run, record_model, start_run
from rlhf_cli.training.loop import train_loop
from rlhf_cli.training.samples import generate_responses, write_samples
from rlhf_cli.training.sharding import full_model_state, lockstep_batches, params_partitioned

log = logging.getLogger(__name__)

NUM_SAMPLES = 3  # held-out prompts the final model continues, written to samples.jsonl


def targets(batch: dict) -> torch.Tensor:
    """The labels the logits predict: a causal LM's shift left by one (token t predicts token t+1);
    an encoder-decoder's decoder inputs are already the labels shifted right (Seq2SeqCollator)."""
    return batch["labels"] if "decoder_input_ids" in batch else batch["labels"][:, 1:]


def token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of the predicted token, and where it counts.

    Returns (loss (B, T'), correct (B, T') bool, mask (B, T') bool) over `targets(batch)` (T' = T - 1
    for a causal LM, the target length for an encoder-decoder); positions labelled -100 are masked.
    The loss is read through the LM head in chunks (lm/head.py): no (B, T', V) logits.
    """
    keys = ("input_ids", "attention_mask", "position_ids", "decoder_input_ids")
    inputs = {k: batch[k] for k in keys if k in batch}
    labels = targets(batch)  # (B, T')
    mask = labels != -100
    safe_labels = labels.masked_fill(~mask, 0)

    def predicting(x: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, T', ...): the last predicts nothing
        return x[:, : labels.shape[1]]

    stats, _ = read_tokens(model, lambda: (model(**inputs, use_cache=False).logits, None), predicting,
                           safe_labels, 1.0, top1=True)
    return -stats.logprobs * mask, stats.top1 & mask, mask


class SFTObjective:
    """Mean next-token loss over trainable tokens (the loop normalises by the tokens of the whole step)."""

    def num_items(self, batch: dict) -> int:
        return int((targets(batch) != -100).sum())

    def loss(self, model, batch: dict):
        loss, correct, mask = token_losses(model, batch)
        sums = {"loss_sum": loss.sum().item(), "correct": correct.sum().item(), "num_tokens": mask.sum().item()}
        return loss.sum(), sums

    def finalize(self, sums: dict) -> dict:
        tokens = max(sums.get("num_tokens", 0.0), 1.0)
        return {"loss": sums["loss_sum"] / tokens, "mean_token_accuracy": sums["correct"] / tokens}


@torch.no_grad()
def evaluate(model, dataset, collate, batch_size: int, accelerator) -> dict[str, float]:
    """eval_loss (mean over held-out trainable tokens) and eval_perplexity = exp(eval_loss)."""
    model.eval()
    total = torch.zeros(3, device=accelerator.device)  # loss sum, correct, tokens
    rows = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    for batch_rows, real in lockstep_batches(rows, batch_size, accelerator):
        batch = collate([dataset[i] for i in batch_rows])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss, correct, mask = token_losses(model, batch)
        if real:  # 0: a forward run only to keep step with the other FSDP processes
            total += torch.stack([loss.sum(), correct.sum().float(), mask.sum().float()])
    total = accelerator.reduce(total, "sum")
    eval_loss = (total[0] / total[2].clamp(min=1)).item()
    return {
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        "eval_mean_token_accuracy": (total[1] / total[2].clamp(min=1)).item(),
    }


def packed_attention_route(model) -> bool:
    """How packed examples are kept apart: position_ids restarts (no seq x seq mask) where the model
    supports it, else a 4D block-diagonal mask; warn when neither works. Returns block_diagonal_mask."""
    if supports_packed_attention(model, block_diagonal_mask=False):
        log.info("packing: examples kept apart through position_ids")
        return False
    if supports_packed_attention(model, block_diagonal_mask=True):
        log.info("packing: examples kept apart with a block-diagonal attention mask")
        return True
    log.warning(
        "packing: %s accepts neither position_ids restarts nor a 4D mask; packed examples can attend "
        "to earlier examples in the same sequence (see docs/packing.md).", type(model).__name__,
    )
    return False


def sample_prompts(rows, tokenizer, cfg: SFTDataConfig, n: int = NUM_SAMPLES) -> tuple[list[str], list[list[int]]]:
    """The first `n` rows as generation prompts: (text shown to the user, token ids); see _prompt_of."""
    fmt = detect_format(rows.column_names, cfg)
    shown, ids = [], []
    for row in rows.select(range(min(n, len(rows)))):
        prompt = _prompt_of(row, fmt, cfg)
        if isinstance(prompt, str):
            shown.append(prompt)
            ids.append(list(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        else:  # messages: rendered by the chat template, shown as the last message (the request)
            shown.append(prompt[-1]["content"] if prompt else "")
            ids.append(list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)))
    keep = [i for i, p in enumerate(ids) if p]
    return [shown[i] for i in keep], [ids[i] for i in keep]


def _prompt_of(row: dict, fmt: str, cfg: SFTDataConfig) -> str | list[dict]:
    """messages: the conversation before the first assistant turn; prompt-completion: the prompt;
    text: the `prompt` column when the dataset has one (builtin:reviews does), else the first words."""
    if fmt == "messages":
        turns = row[cfg.messages_column]
        first_answer = next((i for i, m in enumerate(turns) if m["role"] == "assistant"), len(turns))
        return turns[:first_answer]
    if fmt == "prompt-completion" or isinstance(row.get(cfg.prompt_column), str):
        return row[cfg.prompt_column]
    return " ".join(row[cfg.text_column].split()[:4])


def log_samples(model, tokenizer, rows, cfg: SFTDataConfig, output_dir, step: int, write: bool = True) -> None:
    """Continue a few held-out prompts with the trained model; log them and write samples.jsonl (`write`:
    False on the processes that only take part in a sharded model's generation)."""
    shown, prompts = sample_prompts(rows, tokenizer, cfg)
    if not prompts:
        return
    max_new_tokens = max(16, min(128, cfg.max_length - max(len(p) for p in prompts)))
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens)
    if write:
        write_samples(output_dir, step, shown, responses)


def run(config: SFTConfig, resume: bool = False, overwrite: bool = False) -> None:
    # 1. Output folder, accelerator, logging
    run_ = start_run("sft", config, resume, overwrite)
    accelerator, training = run_.accelerator, config.training

    # 2. Tokenizer and data: load, format and tokenize (a dataset that cannot be read stops the run here,
    #    before the model is loaded)
    tokenizer = load_stage_tokenizer(config.model)
    seq2seq = is_encoder_decoder(config.model.model_name_or_path, config.model.trust_remote_code, config.model.revision)
    if seq2seq and config.data.packing:
        raise UserError("data.packing: packing joins examples into one sequence of a causal LM; "
                        f"{config.model.model_name_or_path} is an encoder-decoder. Set data.packing: false.")
    train_raw, test_raw = load_splits(config.data)
    tokenize = tokenize_seq2seq_dataset if seq2seq else tokenize_dataset
    with accelerator.main_process_first():
        train, stats = tokenize(train_raw, tokenizer, config.data)
        test = tokenize(test_raw, tokenizer, config.data)[0] if test_raw is not None else None
    log.info(
        "training rows: %d kept of %d (%d truncated to %d tokens, %d dropped with no trainable token)",
        stats["kept"], stats["examples"], stats["truncated"], config.data.max_length, stats["dropped_no_trainable_tokens"],
    )

    # 3. The model (a LoRA adapter on top when asked); the rows packed for it, collated
    model = load_model(config.model.model_name_or_path, task="seq2seq-lm" if seq2seq else "causal-lm",
                       is_trainable=True, **model_options(config.model))
    if training.gradient_checkpointing:
        # Training forwards pass use_cache=False themselves; the saved config keeps use_cache for users.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("gradient checkpointing: activations are recomputed in the backward pass")
    if config.peft.use_peft and not hasattr(model, "peft_config"):
        if training.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, config.peft, task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    model = float32_master_weights(model)  # full weights saved in half precision train in float32
    record_model(run_, model)
    block_mask = False
    if config.data.packing:
        train = pack_dataset(train, config.data.max_length)
        block_mask = packed_attention_route(model)
        log.info("packed into %d sequences of up to %d tokens", len(train), config.data.max_length)
    if seq2seq:
        collate = eval_collate = Seq2SeqCollator(tokenizer.pad_token_id, model.config.decoder_start_token_id)
    else:
        collate = SFTCollator(tokenizer.pad_token_id, block_diagonal_mask=block_mask)
        eval_collate = SFTCollator(tokenizer.pad_token_id)

    # 4. The "before" figure: held-out loss of the starting model, as step 0 (a resumed run has it)
    def run_eval(prepared_model) -> dict[str, float]:
        return evaluate(prepared_model, test, eval_collate, training.per_device_eval_batch_size, accelerator)

    if test is not None and run_.resume_from is None:
        before = run_eval(model.to(accelerator.device))
        run_.metrics.log(0, before)
        log.info("before training: eval_loss %.4g, eval_perplexity %.4g", before["eval_loss"], before["eval_perplexity"])

    # 5. Train (the loop checkpoints, evaluates and resumes)
    state = train_loop(
        accelerator=accelerator, model=model, objective=SFTObjective(), train_dataset=train, collate=collate,
        training=training, output_dir=run_.output_dir, evaluate=run_eval if test is not None else None,
        resume_from=run_.resume_from, metrics=run_.metrics, tokenizer=tokenizer,
        progress_keys=("loss", "mean_token_accuracy", "tokens_per_s"), description="sft",
    )

    # 6. A few samples from held-out prompts, and the final model at the top of output_dir
    # (under FSDP and ZeRO-3 generating and gathering the weights are collectives: every process takes part)
    final_model = accelerator.unwrap_model(state["model"])
    if accelerator.is_main_process or params_partitioned(accelerator):
        log_samples(final_model, tokenizer, test_raw if test_raw is not None else train_raw, config.data,
                    run_.output_dir, state["step"], write=accelerator.is_main_process)
    gathered = full_model_state(accelerator, state["model"])
    if accelerator.is_main_process:
        save_final_model(final_model, tokenizer, run_.output_dir, config.peft, gathered)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in state.get("eval", {}).items())
        log.info("done: %d steps; %s; model written to %s", state["step"], summary or "no held-out split", run_.output_dir)
    finish_run(run_)
