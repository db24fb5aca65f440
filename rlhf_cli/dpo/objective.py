"""DPO as an Objective of the shared supervised loop (training/loop.py), and held-out evaluation.

Per micro-batch: the reference log-probs of the batch (no grad), then ONE policy forward over the
2B concatenated sequences (chosen rows, then rejected rows), the loss per pair, and the metrics
TRL's DPOTrainer logs under the same names: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected (+ nll_loss with rpo_alpha).
"""

from __future__ import annotations

import torch
from accelerate.utils import gather_object

from rlhf_cli.config.options import DPOOptions
from rlhf_cli.dpo.logprobs import SequenceLogps, sequence_logps
from rlhf_cli.dpo.losses import dpo_losses
from rlhf_cli.dpo.reference import Reference, num_sequences
from rlhf_cli.training.sharding import lockstep_batches

# per-pair quantities, in the order pair_terms returns them; each is logged as its mean over pairs
TERMS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen",
         "logits/rejected", "nll_loss")


def pair_terms(seq: SequenceLogps, ref_logps: torch.Tensor, opts: DPOOptions) -> dict[str, torch.Tensor]:
    """Policy SequenceLogps and reference log-probs (2B,) -> per-pair (B,) tensors named as TERMS.

    IPO works on log-probs averaged over each response's tokens (Azar et al. define it per token;
    TRL does the same), the others on sums. rpo_alpha adds the chosen response's mean token NLL.
    """
    policy, ref, tokens = seq.logps, ref_logps.to(seq.logps.dtype), seq.num_tokens.clamp(min=1)  # (2B,) each
    if opts.loss_type == "ipo":
        policy, ref = policy / tokens, ref / tokens
    half = policy.shape[0] // 2
    loss, chosen_reward, rejected_reward = dpo_losses(
        policy[:half], policy[half:], ref[:half], ref[half:], opts.beta, opts.loss_type, opts.label_smoothing
    )
    nll = -seq.logps[:half] / tokens[:half]  # (B,) mean NLL per chosen token
    if opts.rpo_alpha is not None:
        loss = loss + opts.rpo_alpha * nll
    mean_logits = (seq.logits_sum / tokens).detach()  # (2B,)
    return {
        "loss": loss, "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
        "logps/chosen": seq.logps[:half].detach(), "logps/rejected": seq.logps[half:].detach(),
        "logits/chosen": mean_logits[:half], "logits/rejected": mean_logits[half:], "nll_loss": nll.detach(),
    }


def summarize(pairs: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Per-pair terms over all pairs -> the logged means, plus rewards/accuracies and rewards/margins.
    rewards/accuracies counts pairs whose chosen reward is strictly larger (0 at the start, where both are 0)."""
    n = max(len(pairs["loss"]), 1)
    row = {f"{prefix}{key}": float(value.sum()) / n for key, value in pairs.items()}
    margins = pairs["rewards/chosen"] - pairs["rewards/rejected"]
    row[f"{prefix}rewards/accuracies"] = float((margins > 0).sum()) / n
    row[f"{prefix}rewards/margins"] = float(margins.sum()) / n
    return row


class DPOObjective:
    """Mean DPO loss per pair (the loop divides the summed loss by the pairs of the whole step)."""

    def __init__(self, opts: DPOOptions, reference: Reference):
        self.opts, self.reference = opts, reference

    def num_items(self, batch: dict) -> int:
        return num_sequences(batch) // 2

    def loss(self, model, batch: dict):
        ref = self.reference.logps(model, batch)  # (2B,) no grad, on the same concatenated batch
        seq = sequence_logps(model, batch)
        terms = pair_terms(seq, ref, self.opts)
        margins = terms["rewards/chosen"] - terms["rewards/rejected"]
        sums = {f"{key}_sum": value.detach().sum().item() for key, value in terms.items()}
        sums.update(correct=(margins > 0).sum().item(), margin_sum=margins.sum().item(),
                    num_pairs=float(margins.shape[0]), num_tokens=seq.num_tokens.sum().item())
        return terms["loss"].sum(), sums

    def finalize(self, sums: dict) -> dict:
        pairs = max(sums.get("num_pairs", 0.0), 1.0)
        row = {key: sums[f"{key}_sum"] / pairs for key in TERMS if key != "nll_loss" or self.opts.rpo_alpha is not None}
        row["rewards/accuracies"] = sums["correct"] / pairs
        row["rewards/margins"] = sums["margin_sum"] / pairs
        return row


@torch.no_grad()
def evaluate(model, reference: Reference, dataset, collate, batch_size: int, accelerator, opts: DPOOptions) -> dict[str, float]:
    """Held-out eval_loss, eval_rewards/accuracies, ... over every pair: each process takes a strided
    share of the rows; the per-pair terms are gathered, so the figures are exact for any process count."""
    model.eval()
    rows = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    local = []  # per pair: the TERMS values
    for batch_rows, real in lockstep_batches(rows, batch_size, accelerator):
        batch = {k: v.to(accelerator.device) for k, v in collate([dataset[i] for i in batch_rows]).items()}
        with accelerator.autocast():
            terms = pair_terms(sequence_logps(model, batch), reference.logps(model, batch), opts)
        local.extend(torch.stack([terms[k].float() for k in TERMS], dim=1)[:real].tolist())  # (real, len(TERMS))
    table = torch.tensor(gather_object(local), dtype=torch.float64).reshape(-1, len(TERMS))  # (N, len(TERMS))
    row = summarize(dict(zip(TERMS, table.unbind(dim=1), strict=True)), prefix="eval_")
    if opts.rpo_alpha is None:
        row.pop("eval_nll_loss")
    return row
