"""Checkpoints: everything round-trips, incomplete ones are skipped, rotation keeps the newest."""

import random

import numpy as np
import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_cli.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from rlhf_cli.training.loop import BatchOrder


def tiny_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()  # no dropout: the two runs below draw different random numbers


def train_one_step(model, optimizer, scheduler):
    loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_save_and_load_restore_weights_optimizer_scheduler_rng(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = tiny_model(0)
    head = torch.nn.Linear(16, 1)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    train_one_step(model, optimizer, scheduler)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    save_checkpoint(tmp_path, 1, accelerator, model, optimizer, scheduler, {"totals": {"num_tokens": 4}},
                    extra_modules={"value_head": head})
    expected_rng = (random.random(), np.random.rand(), torch.rand(1).item())

    model2, head2 = tiny_model(1), torch.nn.Linear(16, 1)
    optimizer2 = torch.optim.AdamW(list(model2.parameters()) + list(head2.parameters()), lr=1e-2)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 1.0 / (s + 1))
    state = load_checkpoint(tmp_path / "checkpoint-1", accelerator, model2, optimizer2, scheduler2,
                            extra_modules={"value_head": head2})
    assert state == {"step": 1, "totals": {"num_tokens": 4}}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_rng
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(head.weight, head2.weight)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    # the next step is identical in both (optimizer moments restored)
    train_one_step(model, optimizer, scheduler)
    train_one_step(model2, optimizer2, scheduler2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_incomplete_checkpoints_are_skipped_and_rotation(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = tiny_model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, accelerator, model, optimizer, scheduler, {}, save_total_limit=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / "checkpoint-3" / "trainer_state.json").unlink()  # as if killed mid-save by another tool
    (tmp_path / "checkpoint-4.tmp").mkdir()  # a save interrupted before its rename
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_batch_order_is_deterministic_disjoint_across_ranks_and_epochs():
    orders = [BatchOrder(10, 2, world_size=2, rank=r, seed=0) for r in (0, 1)]
    assert orders[0].batches_per_epoch == 2  # 10 rows / (2 x 2) -> 2 full batches per rank, tail dropped
    epoch0 = [i for o in orders for m in (0, 1) for i in o.indices(m)]
    assert len(set(epoch0)) == 8
    assert orders[0].indices(2) != orders[0].indices(0) or orders[0].indices(3) != orders[0].indices(1)
    assert BatchOrder(10, 2, 2, 0, seed=0).indices(3) == orders[0].indices(3)
