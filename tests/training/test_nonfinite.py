"""Numerical faults: a NaN/inf loss (SFT/reward loop), or reward, value or gradient (PPO) stops the run
with a message that names the fault and the last good checkpoint (left intact), or, with
training.skip_nonfinite_batches, skips the batch and counts it as `nonfinite_skips`. In-process runs
with the fault injected by monkeypatching (user reward functions cannot return NaN: they exit 2)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_in_process
from safetensors.torch import load_file

from rlhf_cli.training.metrics import read_metrics

TINY = "builtin:tiny-gpt2"



def poison_after(monkeypatch, owner, name: str, calls: int, value: float, wrap, times: int = 10**9):
    """Replace owner.name so that the `times` calls after the first `calls` return `value` (wrapped by `wrap`)."""
    original = getattr(owner, name)
    count = {"n": 0}

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        count["n"] += 1
        return wrap(out, value) if calls < count["n"] <= calls + times else out

    monkeypatch.setattr(owner, name, patched)


def nan_loss(out, value):
    loss, sums = out
    return loss * torch.tensor(value), sums


def sft_config(tmp_path: Path, **training) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"a good film number {i}"}) + "\n" for i in range(64)))
    config = {
        "stage": "sft", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": str(data), "dataset_test_split": None, "max_length": 16},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 6, "per_device_train_batch_size": 4,
                     "logging_steps": 1, "save_steps": 2, **training},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sft_nan_loss_stops_with_last_good_checkpoint(monkeypatch, capsys, tmp_path):
    from rlhf_cli.stages.sft import SFTObjective

    poison_after(monkeypatch, SFTObjective, "loss", calls=3, value=float("nan"), wrap=nan_loss)
    code, stderr = run_in_process(monkeypatch, capsys, "sft", str(sft_config(tmp_path)))
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert "step 4" in message and "nan" in message.lower() and "checkpoint-2" in message, message
    assert "skip_nonfinite_batches" in message
    out = tmp_path / "out"
    checkpoint = load_file(out / "checkpoint-2" / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in checkpoint.values())
    assert not (out / "checkpoint-4").exists() and not (out / "model.safetensors").exists()


def test_sft_skip_nonfinite_batches_counts_skips(monkeypatch, capsys, tmp_path):
    from rlhf_cli.stages.sft import SFTObjective

    state = {"n": 0}
    original = SFTObjective.loss

    def every_third_inf(self, model, batch):
        loss, sums = original(self, model, batch)
        state["n"] += 1
        return (loss * float("inf"), sums) if state["n"] % 3 == 0 else (loss, sums)

    monkeypatch.setattr(SFTObjective, "loss", every_third_inf)
    code, stderr = run_in_process(monkeypatch, capsys, "sft", str(sft_config(tmp_path, skip_nonfinite_batches=True)))
    assert code == 0, stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "out") if "learning_rate" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["nonfinite_skips"] == 2
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def ppo_config(tmp_path: Path, **training) -> Path:
    config = {
        "stage": "ppo", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": "builtin:review-prompts", "dataset_test_split": None},
        "generation": {"response_length": 4},
        "reward": {"function": "builtin:sentiment"},
        "training": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "logging_steps": 1,
                     "save_steps": 1, **training},
        "ppo": {"total_episodes": 12, "num_ppo_epochs": 1},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def inf_scores(out, value):
    scores, parts = out
    return torch.full_like(scores, value), parts


def nan_values(out, value):
    logprobs, values, ref_logprobs = out
    return logprobs, values * value, ref_logprobs


def poison_rollout(monkeypatch, fault: str) -> None:
    """The second iteration's rewards (inf) or values (NaN) are not finite."""
    from rlhf_cli.online.trainer import OnlineTrainer
    from rlhf_cli.rewards.combined import CombinedReward

    if fault == "rewards":
        poison_after(monkeypatch, CombinedReward, "score", calls=1, value=float("inf"), wrap=inf_scores, times=1)
    else:
        poison_after(monkeypatch, OnlineTrainer, "evaluate", calls=1, value=float("nan"), wrap=nan_values, times=1)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize(("fault", "named"), [("rewards", "scores"), ("values", "values")])
def test_ppo_nonfinite_rollout_stops_or_skips(monkeypatch, capsys, tmp_path, fault, named, skip):
    """Found before the update: stop with checkpoint-1 intact, or skip the rollout, count it, and
    keep the count in the checkpoint (a resumed run goes on counting)."""
    poison_rollout(monkeypatch, fault)
    config = ppo_config(tmp_path, **({"skip_nonfinite_batches": True} if skip else {}))
    code, stderr = run_in_process(monkeypatch, capsys, "ppo", str(config))
    out = tmp_path / "out"
    if not skip:
        assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
        message = stderr.strip().splitlines()[-1]
        assert "step 2" in message and "NaN/inf" in message and named in message and "checkpoint-1" in message, message
        assert (out / "checkpoint-1" / "trainer_state.json").exists() and not (out / "checkpoint-2").exists()
    else:
        assert code == 0, stderr[-3000:]
        rows = [r for r in read_metrics(out) if "episode" in r]
        assert rows[-1]["step"] == 3 and rows[-1]["nonfinite_skips"] == 1
        assert "skipping the batch" in stderr
        state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        assert '"nonfinite_skips": 1' in json.dumps(state)


@pytest.mark.parametrize("skip", [False, True])
def test_ppo_nonfinite_gradient_stops_or_skips_the_optimizer_step(monkeypatch, capsys, tmp_path, skip):
    """A NaN gradient is never applied: the run stops (exit 2) or that optimizer step is skipped and
    counted; the final weights are finite either way."""
    from rlhf_cli.online.updater import Updater

    original, calls = Updater._micro_step, {"n": 0}

    def nan_gradient(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the second iteration (one micro-step each: 4 rows, 1 mini-batch, 1 epoch)
            next(p for p in self.model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return stats

    monkeypatch.setattr(Updater, "_micro_step", nan_gradient)
    config = ppo_config(tmp_path, **({"skip_nonfinite_batches": True} if skip else {}))
    code, stderr = run_in_process(monkeypatch, capsys, "ppo", str(config))
    out = tmp_path / "out"
    if not skip:
        assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert "step 2: the gradient is NaN/inf" in stderr.strip().splitlines()[-1]
        weights = load_file(out / "checkpoint-1" / "model" / "model.safetensors")
    else:
        assert code == 0, stderr[-3000:]
        assert [r for r in read_metrics(out) if "episode" in r][-1]["nonfinite_skips"] == 1
        weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
