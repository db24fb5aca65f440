"""Where a DPO batch's reference log-probs come from, and precomputing them for a whole dataset.

The reference is the starting policy, frozen, built by models/policy.py `load_policy` as for PPO:
a frozen copy (full weights), the same weights with the adapter switched off (a fresh LoRA adapter),
or the starting adapter kept frozen beside the trained one (an adapter folder); `reference_mode`
runs the policy as its reference in the last two cases. `reference_free` has no reference (log-probs
0). Reference log-probs of a batch are computed on the very batch the policy sees (same rows, same
concatenation), under no_grad, or read from the columns `precompute` added to the dataset.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import gather_object
from datasets import Dataset

from rlhf_cli.dpo.logprobs import sequence_logps
from rlhf_cli.models.policy import reference_mode

log = logging.getLogger(__name__)


def num_sequences(batch: dict) -> int:
    return int(batch["sequence_index"][-1]) + 1 if "sequence_index" in batch else batch["input_ids"].shape[0]


class Reference:
    """`logps(policy, batch)` -> (2B,) summed response log-probs of the reference, chosen rows first.

    kind: "copy" (a frozen model), "adapter" (the policy under reference_mode), "free" (zeros).
    A batch carrying ref_chosen_logps / ref_rejected_logps (precomputed) is read instead.
    """

    def __init__(self, kind: str, model=None):
        self.kind, self.model = kind, model

    @torch.no_grad()
    def logps(self, policy, batch: dict) -> torch.Tensor:
        if "ref_chosen_logps" in batch:
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        if self.kind == "free":
            return torch.zeros(num_sequences(batch), device=batch["input_ids"].device)
        if self.kind == "copy":
            return sequence_logps(self.model, batch).logps
        unwrapped = getattr(policy, "module", policy)  # DDP: the reference pass needs no gradient sync
        with reference_mode(unwrapped):
            return sequence_logps(unwrapped, batch).logps

    def release(self) -> None:
        """Free a frozen copy once every reference log-prob is precomputed."""
        self.model = None


@torch.no_grad()
def precompute(dataset: Dataset, reference: Reference, policy, collate, batch_size: int, accelerator) -> Dataset:
    """The dataset with ref_chosen_logps / ref_rejected_logps columns: each process computes a strided
    share of the rows; the shares are gathered so every process holds every row's values."""
    rows = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    local = []  # (row, ref chosen, ref rejected)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate([dataset[i] for i in chunk]).items()}
        with accelerator.autocast():
            logps = reference.logps(policy, batch).float()  # (2b,)
        half = len(chunk)
        local.extend(zip(chunk, logps[:half].tolist(), logps[half:].tolist(), strict=True))
    values = sorted(gather_object(local))  # every row once, in row order
    log.info("reference log-probs precomputed for %d pairs", len(values))
    return (dataset.add_column("ref_chosen_logps", [v[1] for v in values])
                   .add_column("ref_rejected_logps", [v[2] for v in values]))
