"""Checkpoints: everything round-trips, incomplete and damaged ones are skipped, rotation keeps the newest."""

import json
import logging
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_cli.errors import UserError
from rlhf_cli.training.checkpoint import load_checkpoint, save_checkpoint
from rlhf_cli.training.checkpoint_scan import (
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    resume_checkpoint,
    safetensors_problem,
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


# --- damaged checkpoints: found by file before anything loads them -----------------------------------


def saved_run(folder, steps=(1, 2), lr=1e-2, with_head=True):
    """Checkpoints of a tiny model after each of `steps` (one optimizer step each); returns the objects."""
    accelerator = Accelerator(cpu=True)
    model, head = tiny_model(0), torch.nn.Linear(16, 1)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for step in steps:
        train_one_step(model, optimizer, scheduler)
        save_checkpoint(folder, step, accelerator, model, optimizer, scheduler, {"totals": {}},
                        extra_modules={"value_head": head} if with_head else None)
    return accelerator, model, head, optimizer, scheduler


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_safetensors_problem_reads_the_header_only(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(3, 4)}, path)
    assert safetensors_problem(path) is None
    size = path.stat().st_size
    truncate(path, 0.9)
    assert "truncated" in safetensors_problem(path) and str(size) in safetensors_problem(path)
    save_file({"a": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes() + b"extra")
    assert "longer than its header says" in safetensors_problem(path)
    path.write_bytes(b"\x05\x00")
    assert "shorter than a safetensors header" in safetensors_problem(path)
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    assert "not a safetensors file" in safetensors_problem(path)
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert "truncated" in safetensors_problem(path)


DAMAGE = [
    ("truncated-weights", lambda c: truncate(c / "model" / "model.safetensors"), "model/model.safetensors is truncated"),
    ("missing-weights", lambda c: (c / "model" / "model.safetensors").unlink(), "holds no weights"),
    ("truncated-optimizer", lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    ("missing-scheduler", lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    ("truncated-value-head", lambda c: truncate(c / "value_head.safetensors"), "value_head.safetensors is truncated"),
    ("missing-value-head", lambda c: (c / "value_head.safetensors").unlink(), "value_head.safetensors is missing"),
    ("truncated-rng", lambda c: truncate(c / "rng_state_0.safetensors"), "rng_state_0.safetensors is truncated"),
    ("bad-rng-json", lambda c: (c / "rng_state_0.json").write_text("{"), "rng_state_0.json is damaged"),
    ("bad-trainer-state", lambda c: (c / "trainer_state.json").write_text('{"step": '), "trainer_state.json is damaged"),
]


@pytest.mark.parametrize(("damage", "needle"), [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_latest_checkpoint_is_reported_by_file_and_skipped(tmp_path, caplog, damage, needle):
    saved_run(tmp_path)
    newest = tmp_path / "checkpoint-2"
    assert checkpoint_problem(newest, ("value_head.safetensors",)) is None
    damage(newest)
    problem = checkpoint_problem(newest, ("value_head.safetensors",))
    assert problem is not None and needle in problem, problem
    with caplog.at_level("WARNING"):
        chosen, damaged = resume_checkpoint(tmp_path, ("value_head.safetensors",))
    assert chosen == tmp_path / "checkpoint-1"
    assert damaged == [(newest, problem)]
    assert needle in caplog.text and "skipping" in caplog.text
    # the checkpoint it falls back to loads (it is what the stages' load_checkpoint gets)
    accelerator, model, head, optimizer, scheduler = saved_run(tmp_path / "again", steps=())
    assert load_checkpoint(chosen, accelerator, model, optimizer, scheduler, {"value_head": head})["step"] == 1


def test_no_undamaged_checkpoint_gives_none_and_every_problem(tmp_path):
    saved_run(tmp_path)
    for step in (1, 2):
        truncate(tmp_path / f"checkpoint-{step}" / "optimizer.pt")
    chosen, damaged = resume_checkpoint(tmp_path)
    assert chosen is None and latest_checkpoint(tmp_path) is None
    assert [p.name for p, _ in damaged] == ["checkpoint-2", "checkpoint-1"]


def test_a_sharded_model_folder_is_checked_and_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    accelerator, model, head, optimizer, scheduler = saved_run(tmp_path, steps=(1,))
    folder = tmp_path / "checkpoint-1" / "model"
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problem(tmp_path / "checkpoint-1") is None
    other = tiny_model(5)
    load_checkpoint(tmp_path / "checkpoint-1", accelerator, other, optimizer, scheduler, {"value_head": head})
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    truncate(folder / "model-00002-of-00002.safetensors")
    assert "model-00002-of-00002.safetensors is truncated" in checkpoint_problem(tmp_path / "checkpoint-1")


# --- loading into a run whose config changed (--resume --allow-config-change) -------------------------


def test_resumed_optimizer_takes_the_configs_learning_rate(tmp_path):
    """torch restores the checkpoint's lr, betas, eps and weight decay; the config's win (with the
    checkpoint's step count, Adam moments and schedule position)."""
    saved_run(tmp_path, steps=(1, 2), lr=1e-2)
    model, head = tiny_model(1), torch.nn.Linear(16, 1)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    load_checkpoint(tmp_path / "checkpoint-2", Accelerator(cpu=True), model, optimizer, scheduler, {"value_head": head})
    assert scheduler.last_epoch == 2 and scheduler.base_lrs == [1e-3]
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == 1e-3 / 3
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    assert len(optimizer.state) > 0  # the Adam moments came from the checkpoint
    train_one_step(model, optimizer, scheduler)
    assert scheduler.get_last_lr()[0] == 1e-3 / 4


def test_weights_that_do_not_fit_the_model_are_a_user_error(tmp_path):
    saved_run(tmp_path, steps=(1,))
    bigger = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    optimizer = torch.optim.AdamW(bigger.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(UserError, match="checkpoint-1/model does not fit the model this config builds"):
        load_checkpoint(tmp_path / "checkpoint-1", Accelerator(cpu=True), bigger, optimizer, scheduler)


def test_a_ppo_checkpoint_without_its_value_head_is_not_resumed(tmp_path):
    """start_run asks for the stage's own checkpoint files: PPO's value head."""
    from rlhf_cli.config.loader import build_stage
    from rlhf_cli.stages.common import start_run
    from rlhf_cli.training.output import write_run_files

    config = build_stage("ppo", {"reward": {"function": "builtin:sentiment"}, "training": {"output_dir": str(tmp_path)}})
    saved_run(tmp_path, steps=(1,), with_head=False)
    write_run_files(tmp_path, "ppo", config)
    try:
        with pytest.raises(UserError, match="value_head.safetensors is missing"):
            start_run("ppo", config, resume=True, overwrite=False)
    finally:
        logging.getLogger().handlers.clear()  # start_run installed a handler on the captured stream
