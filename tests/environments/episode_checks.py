"""A check shared by the rollout tests of both protocols (not a test module)."""

import pytest
import torch

from rlhf_cli.lm.logprobs import logprobs_from_logits


def check_first_update(trainer, exp) -> None:
    """On an environment's Experience (rows of different prompt and episode lengths, with inserted
    tokens): the log-probs the trainer computes for the padded batch equal each episode's own unpadded
    forward, the first mini-batch's ratio is 1, and the advantages are 0 exactly at the inserted tokens
    (GAE carries across them) and not all 0 at the model's own."""
    old, _, _ = trainer.evaluate(exp)
    policy = trainer.unwrapped.policy.eval()
    for i in range(len(exp)):
        query = exp.query_ids[i][exp.query_mask[i].bool()]
        response = exp.response_ids[i][exp.response_mask[i]]
        with torch.no_grad():
            logits = policy(torch.cat([query, response])[None]).logits[0, len(query) - 1 : -1]
        want = logprobs_from_logits(logits[None], response[None], trainer.temperature)[0]
        torch.testing.assert_close(old[i, : len(response)], want, atol=1e-5, rtol=1e-5)
    stats = trainer.step(exp, torch.tensor([1.0, 0.0, 1.0]))
    assert stats["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    inserted = exp.response_mask & ~exp.loss_mask
    assert inserted.any() and (exp.advantages[inserted] == 0).all()
    assert (exp.advantages[exp.loss_mask] != 0).any()
