"""`rlhf reward`: a pairwise (Bradley–Terry) reward model, a scalar head on a causal LM or an encoder.

The model is a `*ForSequenceClassification` with `num_labels=1`, so the folder it writes loads with
`AutoModelForSequenceClassification.from_pretrained` (or `peft` for an adapter) and `rlhf ppo` scores
with it as it is. The score of a text is the model's own pooled logit: at the last real token for
causal LMs (transformers takes the rightmost token that is not the pad token), at [CLS] for BERT.
"""

import json
import logging
from pathlib import Path

import torch
from accelerate.utils import gather_object

from rlhf_cli.config.schema import RewardModelConfig
from rlhf_cli.data.loading import load_splits
from rlhf_cli.data.preferences import PairCollator, tokenize_pairs
from rlhf_cli.models.adapters import apply_lora, save_final_model
from rlhf_cli.models.loading import float32_master_weights, load_model, load_stage_tokenizer, model_options
from rlhf_cli.stages.common import finish_run, record_model, start_run
from rlhf_cli.training.bradley_terry import bradley_terry_loss
from rlhf_cli.training.loop import train_loop
from rlhf_cli.training.sharding import full_model_state, lockstep_batches

log = logging.getLogger(__name__)

STATS_FILE = "reward_stats.json"  # read by rlhf_cli/rewards/model.py when a reward source sets normalize
STATS_SAMPLE_PAIRS = 1000  # pairs scored for the stats when there is no held-out split


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B rows of a PairCollator batch -> (chosen (B,), rejected (B,)) rewards."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    scores = model(**inputs, use_cache=False).logits[:, 0].float()  # (2B, 1) -> (2B,)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


class RewardObjective:
    """Mean Bradley–Terry loss per pair (the loop divides the summed loss by the pairs of the step)."""

    def __init__(self, center_rewards_coefficient: float | None):
        self.center = center_rewards_coefficient

    def num_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model, batch: dict):
        chosen, rejected = pair_rewards(model, batch)  # (B,), (B,)
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.center)  # (B,)
        both = torch.cat([chosen, rejected]).detach()  # (2B,)
        sums = {
            "loss_sum": loss.sum().item(),
            "correct": (chosen > rejected).sum().item(),
            "margin_sum": (chosen - rejected).sum().item(),
            "reward_sum": both.sum().item(),
            "min_reward": both.min().item(),  # min_/max_ keys are reduced by min/max in the loop
            "max_reward": both.max().item(),
            "num_pairs": float(chosen.shape[0]),  # the loop logs pairs_per_s from it
            "num_tokens": batch["attention_mask"].sum().item(),
        }
        return loss.sum(), sums

    def finalize(self, sums: dict) -> dict:
        pairs = max(sums.get("num_pairs", 0.0), 1.0)
        return {
            "loss": sums["loss_sum"] / pairs,
            "accuracy": sums["correct"] / pairs,
            "margin": sums["margin_sum"] / pairs,
            "reward_mean": sums["reward_sum"] / (2 * pairs),
            "reward_min": sums["min_reward"],
            "reward_max": sums["max_reward"],
        }


@torch.no_grad()
def evaluate(model, dataset, collate, batch_size: int, accelerator, center: float | None) -> dict[str, float]:
    """Held-out loss, accuracy, margin, and the mean/std of the reward over every chosen AND rejected
    response (what reward_stats.json records). Each process scores a strided share of the rows; the
    per-pair numbers are gathered so the figures are exact for any number of processes."""
    model.eval()
    rows = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    local = []  # per pair: (r_chosen, r_rejected, loss)
    for batch_rows, real in lockstep_batches(rows, batch_size, accelerator):
        batch = collate([dataset[i] for i in batch_rows])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            chosen, rejected = pair_rewards(model, batch)
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), center)
        local.extend(torch.stack([chosen, rejected, loss], dim=1)[:real].tolist())  # (real, 3); see lockstep_batches
    pairs = torch.tensor(gather_object(local), dtype=torch.float64).reshape(-1, 3)  # (N, 3)
    chosen, rejected, loss = pairs.unbind(dim=1)
    both = torch.cat([chosen, rejected])  # (2N,)
    return {
        "eval_loss": loss.mean().item(),
        "eval_accuracy": (chosen > rejected).double().mean().item(),
        "eval_margin": (chosen - rejected).mean().item(),
        "eval_reward_mean": both.mean().item(),
        "eval_reward_std": both.std(correction=0).item(),
    }


def head_module_names(model) -> list[str]:
    """Top-level modules beside the backbone that hold weights: the scalar head (`score` on GPT-2,
    Llama...; `classifier` on BERT). LoRA trains them fully (peft `modules_to_save`)."""
    backbone = model.base_model_prefix
    return [name for name, module in model.named_children() if name != backbone and next(module.parameters(), None) is not None]


def load_reward_model(config: RewardModelConfig, tokenizer):
    """The model with its scalar head (a LoRA adapter on it when asked), ready to train.

    A start from an adapter folder: a reward adapter (SEQ_CLS) keeps training when peft.use_peft is on
    and is merged into its base otherwise; any other adapter (the CAUSAL_LM LoRA of an SFT run) is
    merged into its base LM, whose backbone then gets a fresh scalar head.
    """
    model_cfg, peft_cfg = config.model, config.peft
    common = {**model_options(model_cfg), "seed": config.training.seed}
    task_type = adapter_task_type(model_cfg.model_name_or_path)
    if task_type not in (None, "SEQ_CLS"):
        model = backbone_with_new_head(model_cfg.model_name_or_path, common)
    else:
        model = load_model(model_cfg.model_name_or_path, task="sequence-classification", num_labels=1,
                           is_trainable=True, **common)
        if task_type is not None and not peft_cfg.use_peft:
            model = model.merge_and_unload()
    # GPT-2-style models find each row's last real token as the rightmost token that is not pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        log.warning("the pad token is the eos token: a text that ends with eos is scored at the token before it")
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft_cfg.use_peft and not hasattr(model, "peft_config"):
        if config.training.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, peft_cfg, task_type="SEQ_CLS", modules_to_save=head_module_names(model))
    return float32_master_weights(model)  # full weights saved in half precision train in float32


def adapter_task_type(name_or_path: str) -> str | None:
    """The peft task type of an adapter folder (e.g. "CAUSAL_LM", "SEQ_CLS"); None for anything else."""
    path = Path(name_or_path) / "adapter_config.json"
    return str(json.loads(path.read_text()).get("task_type")) if path.is_file() else None


def backbone_with_new_head(adapter_folder: str, common: dict):
    """A sequence-classification model whose backbone is the adapter merged into its base LM."""
    lm = load_model(adapter_folder, task="causal-lm", **common).merge_and_unload()
    adapter = json.loads((Path(adapter_folder) / "adapter_config.json").read_text())
    base = adapter["base_model_name_or_path"]
    # the base at the revision the adapter records (model.revision names the adapter folder's own files)
    model = load_model(base, task="sequence-classification", num_labels=1, **{**common, "revision": adapter.get("revision")})
    # `base_model` is the backbone (GPT-2: `transformer`) in the LM and the classifier alike
    model.base_model.load_state_dict(lm.base_model.state_dict())
    log.info("merged the %s adapter %s into its base %s; a new scalar head goes on top",
             adapter_task_type(adapter_folder), adapter_folder, base)
    return model


def write_reward_stats(output_dir: Path, metrics: dict[str, float], split: str, responses: int) -> None:
    stats = {"mean": metrics["eval_reward_mean"], "std": metrics["eval_reward_std"],
             "num_responses": responses, "split": split}
    (output_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    log.info("reward on %d %s responses: mean %.4g, std %.4g -> %s", responses, split, stats["mean"], stats["std"], STATS_FILE)


def run(config: RewardModelConfig, resume: bool = False, overwrite: bool = False) -> None:
    # 1. Output folder, accelerator, logging
    run_ = start_run("reward", config, resume, overwrite)
    accelerator, training, data = run_.accelerator, config.training, config.data

    # 2. Tokenizer (right padding: encoders pool their first token) and data: pairs -> token ids (truncated or
    #    dropped when too long), both sides of a pair in one batch; a dataset that cannot be read stops the
    #    run here, before the model is loaded
    tokenizer = load_stage_tokenizer(config.model, padding_side="right")
    train_raw, test_raw = load_splits(data)
    with accelerator.main_process_first():
        train, stats = tokenize_pairs(train_raw, tokenizer, data)
        test = tokenize_pairs(test_raw, tokenizer, data)[0] if test_raw is not None else None
    log.info(
        "training pairs: %d kept of %d (%d truncated to %d tokens, %d dropped as too long, %d dropped with "
        "identical sides)", stats["kept"], stats["pairs"], stats["truncated"], data.max_length,
        stats["dropped_too_long"], stats["dropped_identical"],
    )
    collate = PairCollator(tokenizer.pad_token_id)
    center = config.reward.center_rewards_coefficient

    # 3. The model with its scalar head
    model = load_reward_model(config, tokenizer)
    record_model(run_, model)

    # 4. Train (the loop checkpoints, evaluates and resumes)
    def run_eval(prepared_model, dataset=test) -> dict[str, float]:
        return evaluate(prepared_model, dataset, collate, training.per_device_eval_batch_size, accelerator, center)

    state = train_loop(
        accelerator=accelerator, model=model, objective=RewardObjective(center), train_dataset=train,
        collate=collate, training=training, output_dir=run_.output_dir,
        evaluate=run_eval if test is not None else None, resume_from=run_.resume_from, metrics=run_.metrics,
        tokenizer=tokenizer, progress_keys=("loss", "accuracy", "pairs_per_s"), description="reward",
    )

    # 5. Reward statistics for normalisation in PPO: held-out responses, else (with a warning) training ones
    if test is not None:
        final, split, responses = state["eval"], data.dataset_test_split, 2 * len(test)
    else:
        sample = train.select(range(min(len(train), STATS_SAMPLE_PAIRS)))
        log.warning("no held-out split: %s is computed on %d training pairs", STATS_FILE, len(sample))
        final, split, responses = run_eval(state["model"], sample), data.dataset_train_split, 2 * len(sample)

    # 6. The final model at the top of output_dir, reward_stats.json beside it
    gathered = full_model_state(accelerator, state["model"])  # FSDP: the whole weights (every process)
    if accelerator.is_main_process:
        save_final_model(accelerator.unwrap_model(state["model"]), tokenizer, run_.output_dir, config.peft, gathered)
        write_reward_stats(run_.output_dir, final, split, responses)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items())
        log.info("done: %d steps; %s; model written to %s", state["step"], summary, run_.output_dir)
    finish_run(run_)
