"""FSDP 2 on two CPU processes (configs/accelerate/fsdp_cpu.yaml), against data parallel (cpu_ddp.yaml) on the
same runs: the training stages whose FSDP path rlhf supports (training/accel.py TESTED_UNDER) give DDP's
metrics and weights, write a plain Hugging Face folder, and resume to the uninterrupted run.

Tolerances: FSDP reduce-scatters the gradients where DDP all-reduces them, which sums the same float32
numbers in another order (~1e-7 relative per step). AdamW with its usual epsilon (1e-8) turns such
rounding in a near-zero gradient (the reward model's final-norm bias gets ~1e-9) into a full-size step
of either sign, so these runs use epsilon 1e-3: the comparison then measures the engines, not Adam's
amplification of rounding. Over 4 steps at lr 1e-3 that left the weights within 6e-8 and the logged
figures within 2.4e-6 relative on the machine that wrote this test; the bounds below leave about ten
times that. A gradient that was not reduced over the processes, or a shard left out, moves the weights by
~1e-3 per step. Resume under FSDP is compared exactly (the same engine on the same machine).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WEIGHTS_ATOL = 1e-6
METRICS_RTOL, METRICS_ATOL = 2e-5, 1e-5


def launch(engine: str, stage: str, config: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / f"{engine}.yaml"), "-m", "rlhf_cli", stage, str(config), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(2 processes, cpu" in result.stderr, result.stderr[-4000:]
    return result


ONLINE = {"generation": {"response_length": 12}, "reward": {"function": "builtin:sentiment"}}
STAGES = {  # per stage: data, other sections; 4 optimizer steps (2 iterations of 2 mini-batches online)
    "sft": ({"dataset_name": "builtin:reviews", "dataset_format": "text", "max_length": 32}, {}),
    "reward": ({"dataset_name": "builtin:review-preferences", "max_length": 48}, {}),
    "dpo": ({"dataset_name": "builtin:review-preferences", "max_length": 64, "max_prompt_length": 16}, {}),
    "ppo": ({"dataset_name": "builtin:review-prompts"},
            {**ONLINE, "ppo": {"total_episodes": 64, "num_mini_batches": 2, "num_ppo_epochs": 1}}),
}
for _critic_free in ("grpo", "rloo"):
    STAGES[_critic_free] = ({"dataset_name": "builtin:review-prompts"}, {**ONLINE, _critic_free: {
        "total_episodes": 64, "num_generations": 4, "beta": 0.04, "steps_per_generation": 2}})


def write_config(path: Path, stage: str, output_dir: Path, **sections) -> Path:
    data, stage_sections = STAGES[stage]
    config = {
        "stage": stage, "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        # 9 held-out rows over 2 processes in batches of 2: 3 forwards on one, 2 on the other
        "data": {**data, "max_train_samples": 64, "max_eval_samples": 9},
        "training": {"output_dir": str(output_dir), "max_steps": 4, "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 2, "learning_rate": 1e-3, "adam_epsilon": 1e-3, "logging_steps": 1,
                     "save_steps": 2, "eval_steps": 2},
        **stage_sections,
        **sections,
    }
    if stage in ("ppo", "grpo", "rloo"):  # the length comes from total_episodes; 8 rollouts per process and iteration
        config["training"].update(max_steps=-1, per_device_train_batch_size=8, save_steps=1, eval_steps=None)
    path.write_text(yaml.safe_dump(config))
    return path


def metrics(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_per_s") and not k.startswith("time/")}  # timings differ
            for row in rows]


def assert_same_metrics(a: list[dict], b: list[dict], rtol: float) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            assert value == pytest.approx(y[key], rel=rtol, abs=METRICS_ATOL), (x["step"], key)


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y)  # a plain folder: no sharded or duplicated (tied) tensors
    for key in x:
        assert x[key].shape == y[key].shape, key
        torch.testing.assert_close(x[key], y[key], atol=atol, rtol=0, msg=key)


def run_both(tmp_path: Path, stage: str, **sections) -> tuple[Path, Path, str]:
    """The same run under FSDP and under DDP; returns both output folders and the FSDP run's log."""
    out = {}
    for engine in ("fsdp_cpu", "cpu_ddp"):
        out[engine] = tmp_path / engine
        config = write_config(tmp_path / f"{engine}.yaml", stage, out[engine], **sections)
        log = launch(engine, stage, config).stderr
        if engine == "fsdp_cpu":
            fsdp_log = log
    return out["fsdp_cpu"], out["cpu_ddp"], fsdp_log


def resume_from_halfway(output_dir: Path, stage: str, config: Path, halfway: int = 2) -> None:
    """As if the run had stopped after checkpoint-<halfway>: the later checkpoints and the final model gone."""
    kept = {f"checkpoint-{halfway}", "config.yaml", "metrics.jsonl", "run_info.json"}
    for path in output_dir.iterdir():
        if path.name not in kept:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    log = launch("fsdp_cpu", stage, config, "--resume").stderr
    assert f"resumed from {output_dir / f'checkpoint-{halfway}'}" in log, log[-3000:]


def test_sft_under_fsdp_equals_ddp_and_resumes(tmp_path):
    fsdp, ddp, log = run_both(tmp_path, "sft")
    assert "FSDP 2: parameters, gradients and optimizer state sharded over 2 processes" in log
    assert "has not been tested" not in log
    # the checkpoint's optimizer state is FSDP's (keyed by parameter name, whole tensors), not DDP's (by index)
    state = torch.load(fsdp / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert "transformer.wte.weight" in state and state["transformer.wte.weight"]["exp_avg"].shape == (4096, 64)
    assert_same_metrics(metrics(fsdp), metrics(ddp), METRICS_RTOL)
    assert_same_weights(fsdp / "model.safetensors", ddp / "model.safetensors", WEIGHTS_ATOL)
    assert (fsdp / "samples.jsonl").read_text() == (ddp / "samples.jsonl").read_text()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp)  # loads as it is, the head tied again
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    uninterrupted, final = metrics(fsdp), (fsdp / "model.safetensors").read_bytes()
    resume_from_halfway(fsdp, "sft", tmp_path / "fsdp_cpu.yaml")
    assert metrics(fsdp) == uninterrupted
    assert (fsdp / "model.safetensors").read_bytes() == final


def test_lora_sft_under_fsdp_equals_ddp_and_resumes(tmp_path):
    peft = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "save_merged": True}
    fsdp, ddp, _ = run_both(tmp_path, "sft", peft=peft)
    assert_same_metrics(metrics(fsdp), metrics(ddp), METRICS_RTOL)
    assert_same_weights(fsdp / "adapter_model.safetensors", ddp / "adapter_model.safetensors", WEIGHTS_ATOL)
    assert_same_weights(fsdp / "merged" / "model.safetensors", ddp / "merged" / "model.safetensors", WEIGHTS_ATOL)

    uninterrupted, final = metrics(fsdp), (fsdp / "adapter_model.safetensors").read_bytes()
    resume_from_halfway(fsdp, "sft", tmp_path / "fsdp_cpu.yaml")
    assert metrics(fsdp) == uninterrupted
    assert (fsdp / "adapter_model.safetensors").read_bytes() == final


def test_reward_model_under_fsdp_equals_ddp(tmp_path):
    fsdp, ddp, _ = run_both(tmp_path, "reward")
    assert_same_metrics(metrics(fsdp), metrics(ddp), METRICS_RTOL)
    assert_same_weights(fsdp / "model.safetensors", ddp / "model.safetensors", WEIGHTS_ATOL)
    assert json.loads((fsdp / "reward_stats.json").read_text())["mean"] == pytest.approx(
        json.loads((ddp / "reward_stats.json").read_text())["mean"], rel=METRICS_RTOL, abs=1e-6)


def test_dpo_under_fsdp_equals_ddp(tmp_path):
    """The policy sharded; the reference (a frozen copy) whole on every process."""
    fsdp, ddp, _ = run_both(tmp_path, "dpo")
    assert_same_metrics(metrics(fsdp), metrics(ddp), METRICS_RTOL)
    assert_same_weights(fsdp / "model.safetensors", ddp / "model.safetensors", WEIGHTS_ATOL)


def test_ppo_under_fsdp_equals_ddp_and_resumes(tmp_path):
    """The policy and its value head sharded as one module; generation with synced steps; a frozen reference."""
    fsdp, ddp, log = run_both(tmp_path, "ppo")
    assert "has not been tested" not in log
    assert_same_metrics(metrics(fsdp), metrics(ddp), METRICS_RTOL)
    for name in ("model.safetensors", "value_head.safetensors"):
        assert_same_weights(fsdp / name, ddp / name, WEIGHTS_ATOL)

    uninterrupted = metrics(fsdp)
    final = {name: (fsdp / name).read_bytes() for name in ("model.safetensors", "value_head.safetensors")}
    resume_from_halfway(fsdp, "ppo", tmp_path / "fsdp_cpu.yaml", halfway=1)
    assert metrics(fsdp) == uninterrupted
    assert {name: (fsdp / name).read_bytes() for name in final} == final


PPO_VARIANTS = {
    # the reference is the policy with its adapter off, called past the sharded wrapper
    "lora": ({"peft": {"use_peft": True, "lora_r": 4, "lora_alpha": 8}}, "adapter_model.safetensors"),
    # a second backbone in the wrapper; its registered parameters were not the optimizer's, so clipping
    # (of the optimizer's parameters now) had been skipped
    "critic": ({"ppo": {**STAGES["ppo"][1]["ppo"], "value_model_name_or_path": "builtin:tiny-gpt2"}}, "model.safetensors"),
    # an encoder-decoder policy: wrapped inside PolicyWithValue it shards (alone it cannot: the test above)
    "t5": ({"model": {"model_name_or_path": "builtin:tiny-t5"}}, "model.safetensors"),
}


@pytest.mark.parametrize("variant", sorted(PPO_VARIANTS))
def test_ppo_variants_under_fsdp_equal_ddp(tmp_path, variant):
    sections, weights = PPO_VARIANTS[variant]
    fsdp, ddp, _ = run_both(tmp_path, "ppo", **sections)
    assert_same_metrics(metrics(fsdp), metrics(ddp), METRICS_RTOL)
    for name in (weights, "value_head.safetensors"):
        assert_same_weights(fsdp / name, ddp / name, WEIGHTS_ATOL)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_critic_free_stages_under_fsdp_equal_ddp(tmp_path, stage):
    """No value head: the tied LM head of the wrapped policy stays tied under FSDP (it did not, once)."""
    fsdp, ddp, _ = run_both(tmp_path, stage)
    assert_same_metrics(metrics(fsdp), metrics(ddp), METRICS_RTOL)
    assert_same_weights(fsdp / "model.safetensors", ddp / "model.safetensors", WEIGHTS_ATOL)


def test_an_encoder_decoder_model_the_stage_shards_itself_is_refused(tmp_path):
    """SFT of T5 under FSDP: accelerate cannot wrap its shared embedding; exit 2 and one line instead of its error."""
    config = write_config(tmp_path / "t5.yaml", "sft", tmp_path / "out", model={"model_name_or_path": "builtin:tiny-t5"},
                          data={"dataset_name": "builtin:review-chat", "max_length": 48, "max_train_samples": 64})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp_cpu.yaml"), "-m", "rlhf_cli", "sft", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode != 0
    assert "error: FSDP: an encoder-decoder model (t5) cannot be sharded for this stage" in result.stderr, \
        result.stderr[-3000:]
