"""Checks only a CUDA GPU can make (they skip elsewhere); with the other tests marked `gpu` they are
the subset bench/gpu.sh runs on a GPU machine (`pytest -m gpu`).

What CPU tests check with torch's CPU GradScaler and CPU autocast, these check through accelerate's
real fp16 scaler and CUDA kernels; and the chunked LM head's memory through torch's CUDA allocator.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from rlhf_cli.config.loader import build_stage
from rlhf_cli.lm.head import chunked_stats, stats_from_logits
from rlhf_cli.models.loading import load_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.ppo.trainer import PPOTrainer
from rlhf_cli.training.accel import make_accelerator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["I watched The", "My sister and I went to see a film about", "It", "We caught Return to Seville in"] * 4


@pytest.fixture
def trainer_for(tmp_path):
    def make(model: str, precision: str, **ppo) -> PPOTrainer:
        AcceleratorState._reset_state(reset_partial_state=False)  # each test picks its own precision
        config = build_stage("ppo", {
            "model": {"model_name_or_path": model},
            "reward": {"function": "builtin:sentiment"},
            "generation": {"response_length": 16, "temperature": 0.7},
            "training": {"output_dir": str(tmp_path), "per_device_train_batch_size": 16, "learning_rate": 1e-3,
                         precision: True},
            "ppo": {"total_episodes": 16, "num_mini_batches": 1, **ppo},
        })
        accelerator = make_accelerator(config.training, tmp_path)
        policy, reference = load_policy(config.model, config.peft, seed=0)
        return PPOTrainer(config, policy, load_tokenizer(model, padding_side="left"), accelerator, reference)

    yield make
    AcceleratorState._reset_state(reset_partial_state=False)


def test_fp16_ppo_skips_scaler_overflows_and_trains(trainer_for):
    """The first fp16 steps overflow by design and the scaler skips them (fp16_overflow_skips); the
    run does not stop, and the weights change."""
    trainer = trainer_for("builtin:tiny-gpt2", "fp16", num_ppo_epochs=4)
    before = [p.detach().clone() for p in trainer.unwrapped.parameters()]
    for _ in range(3):
        stats = trainer.step(trainer.generate(PROMPTS), torch.linspace(-1, 1, len(PROMPTS)))
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.unwrapped.parameters(), strict=True))


def test_fp16_sft_runs_through_the_scaler(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_cli", "sft", "configs/quickstart-sft.yaml", "--output-dir", str(tmp_path),
         "--set", "training.max_steps=20", "--set", "training.fp16=true", "--set", "training.eval_steps=0",
         "--set", "training.logging_steps=5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_bf16_ppo_on_cuda_kernels_starts_at_kl_zero_and_ratio_one(trainer_for, model):
    trainer = trainer_for(model, "bf16", num_ppo_epochs=1)
    torch.manual_seed(0)
    stats = trainer.step(trainer.generate(PROMPTS), torch.linspace(-1, 1, len(PROMPTS)))
    assert abs(stats["objective/kl"]) < 1e-2 and stats["val/ratio"] == pytest.approx(1.0, abs=1e-3)


def test_chunked_head_peak_memory_does_not_grow_with_the_batch_of_logits():
    """At a 128k vocabulary, 4 x 1,024 positions: the chunked read's peak allocation (forward and
    backward) is a small fraction of the plain path's, whose float32 logits alone take 2 GiB."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 131072, bias=False, device=device)
    tokens = torch.randint(0, 131072, (4, 1024), device=device)

    def peak(read) -> int:
        hidden = torch.randn(4, 1024, 256, device=device, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        stats = read(hidden)
        (stats.logprobs.sum() + stats.entropy.sum()).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    plain = peak(lambda h: stats_from_logits(head(h), tokens, 0.7, "grad"))
    chunked = peak(lambda h: chunked_stats(head, h, tokens, 0.7, "grad"))
    assert chunked < 0.2 * plain, (chunked / 2**20, plain / 2**20)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_ddpo_epoch_on_cuda(precision):
    """DDPO's sampling and update on CUDA tensors (the update indexes device latents with CPU indices and
    hands the UNet its timesteps on its own device), in fp32 and under bf16 autocast."""
    from accelerate import Accelerator
    from image_pipelines import untrained_pipeline

    from rlhf_cli.config.diffusion import DDPOOptions, UNetPeftConfig
    from rlhf_cli.config.sections import TrainingConfig
    from rlhf_cli.diffusion.policy import trainable_unet
    from rlhf_cli.diffusion.trainer import DDPOTrainer

    AcceleratorState._reset_state(reset_partial_state=False)
    pipe = untrained_pipeline().to("cuda")
    options = DDPOOptions(sample_num_steps=4, sample_guidance_scale=3.0, sample_batch_size=4,
                          sample_num_batches_per_epoch=2, train_batch_size=2, train_timesteps_per_call=None)
    trainer = DDPOTrainer(pipe, trainable_unet(pipe, UNetPeftConfig(use_peft=True)), options,
                          TrainingConfig(learning_rate=1e-3), Accelerator(mixed_precision=precision))
    traj, rows = trainer.sample_epoch(["a red circle", "a blue square"], epoch=0)
    assert traj.latents.is_cuda and torch.isfinite(traj.log_probs).all()
    stats = trainer.update(traj, torch.linspace(-1, 1, 8), epoch=1)
    assert all(math.isfinite(v) for v in stats.values()) and trainer.global_step == 4
