"""FSDP 2 on two CPU processes (configs/accelerate/fsdp_cpu.yaml), against data parallel (cpu_ddp.yaml) on the
same runs: the training stages whose FSDP path rlhf supports (training/accel.py TESTED_UNDER) give DDP's
metrics and weights, write a plain Hugging Face folder, and resume to the uninterrupted run. All runs are
the stages of one recipe (`rlhf run`), launched once per engine.

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


def launch(engine: str, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<engine>.yaml -m rlhf_cli <args>`, as a user types it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / f"{engine}.yaml"), "-m", "rlhf_cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


def launched(engine: str, *args: str) -> str:
    result = launch(engine, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(2 processes, cpu" in result.stderr, result.stderr[-4000:]
    return result.stderr


ONLINE = {"generation": {"response_length": 12}, "reward": {"function": "builtin:sentiment"}}
PROMPTS = {"dataset_name": "builtin:review-prompts"}
PPO = {"total_episodes": 64, "num_mini_batches": 2, "num_ppo_epochs": 1}
CRITIC_FREE = {"total_episodes": 64, "num_generations": 4, "beta": 0.04, "steps_per_generation": 2}
LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8}
# Every run: (stage, data, other sections, weight files to compare). 4 optimizer steps each (online:
# 2 iterations of 2 mini-batches); tiny GPT-2 unless the sections say otherwise.
RUNS = {
    "sft": ("sft", {"dataset_name": "builtin:reviews", "dataset_format": "text", "max_length": 32}, {},
            ["model.safetensors"]),
    "sft-lora": ("sft", {"dataset_name": "builtin:reviews", "dataset_format": "text", "max_length": 32},
                 {"peft": {**LORA, "save_merged": True}}, ["adapter_model.safetensors", "merged/model.safetensors"]),
    "reward": ("reward", {"dataset_name": "builtin:review-preferences", "max_length": 48}, {}, ["model.safetensors"]),
    # the policy sharded; the reference (a frozen copy) whole on every process
    "dpo": ("dpo", {"dataset_name": "builtin:review-preferences", "max_length": 64, "max_prompt_length": 16}, {},
            ["model.safetensors"]),
    # the policy and its value head sharded as one module; generation in synced steps; a frozen reference
    "ppo": ("ppo", PROMPTS, {**ONLINE, "ppo": PPO}, ["model.safetensors", "value_head.safetensors"]),
    # the reference is the policy with its adapter off, called past the sharded wrapper
    "ppo-lora": ("ppo", PROMPTS, {**ONLINE, "ppo": PPO, "peft": LORA},
                 ["adapter_model.safetensors", "value_head.safetensors"]),
    # a second backbone in the wrapper: its registered parameters were not the optimizer's, and nothing
    # was clipped until the norm was taken over the optimizer's own
    "ppo-critic": ("ppo", PROMPTS, {**ONLINE, "ppo": {**PPO, "value_model_name_or_path": "builtin:tiny-gpt2"}},
                   ["model.safetensors", "value_head.safetensors"]),
    # an encoder-decoder policy shards inside the wrapper (alone it cannot: the refusal test below)
    "ppo-t5": ("ppo", PROMPTS, {**ONLINE, "ppo": PPO, "model": {"model_name_or_path": "builtin:tiny-t5"}},
               ["model.safetensors", "value_head.safetensors"]),
    # no value head: the tied LM head of the wrapped policy must stay tied (it came back untied, once)
    "grpo": ("grpo", PROMPTS, {**ONLINE, "grpo": CRITIC_FREE}, ["model.safetensors"]),
    "rloo": ("rloo", PROMPTS, {**ONLINE, "rloo": CRITIC_FREE}, ["model.safetensors"]),
}


def write_config(path: Path, name: str) -> Path:
    stage, data, sections, _ = RUNS[name]
    config = {
        "stage": stage, "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        # 9 held-out rows over 2 processes in batches of 2: 3 forwards on one, 2 on the other
        "data": {**data, "max_train_samples": 64, "max_eval_samples": 9},
        "training": {"output_dir": "unused", "max_steps": 4, "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 2, "learning_rate": 1e-3, "adam_epsilon": 1e-3, "logging_steps": 1,
                     "save_steps": 2, "eval_steps": 2},
        **sections,
    }
    if stage in ("ppo", "grpo", "rloo"):  # the length comes from total_episodes; 8 rollouts per process and iteration
        config["training"].update(max_steps=-1, per_device_train_batch_size=8, save_steps=1, eval_steps=None)
    path.write_text(yaml.safe_dump(config))
    return path


def write_recipe(folder: Path, output_dir: Path) -> Path:
    """Every run as one stage of a recipe: one launch per engine (each launch costs ~10 s of start-up)."""
    stages = [{"name": name, "command": RUNS[name][0], "config": str(write_config(folder / f"{name}.yaml", name))}
              for name in RUNS]
    path = folder / f"recipe-{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(output_dir), "stages": stages}))
    return path


def metrics(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_per_s") and not k.startswith("time/")}  # timings differ
            for row in rows]


def metric_mismatches(a: list[dict], b: list[dict]) -> list[str]:
    if [sorted(r) for r in a] != [sorted(r) for r in b]:
        return ["different rows or keys"]
    return [f"step {x['step']} {key}: {value} vs {y[key]}" for x, y in zip(a, b, strict=True)
            for key, value in x.items() if value != pytest.approx(y[key], rel=METRICS_RTOL, abs=METRICS_ATOL)]


def weight_mismatches(a: Path, b: Path) -> list[str]:
    x, y = load_file(a), load_file(b)
    if sorted(x) != sorted(y):  # a plain folder: no sharded or duplicated (tied) tensors
        return [f"tensor names differ: {sorted(set(x) ^ set(y))[:3]}"]
    return [f"{key}: {(x[key] - y[key]).abs().max().item():.2e}" for key in x
            if x[key].shape != y[key].shape or not torch.allclose(x[key], y[key], atol=WEIGHTS_ATOL, rtol=0)]


def resume_from_halfway(output_dir: Path, stage: str, halfway: int) -> list[dict]:
    """Cut the finished run back to checkpoint-<halfway> (later checkpoints and the final model gone),
    resume it under FSDP, and return its metrics."""
    kept = {f"checkpoint-{halfway}", "config.yaml", "metrics.jsonl", "run_info.json"}
    for path in output_dir.iterdir():
        if path.name not in kept:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    log = launched("fsdp_cpu", stage, str(output_dir / "config.yaml"), "--resume")
    assert f"resumed from {output_dir / f'checkpoint-{halfway}'}" in log, log[-3000:]
    return metrics(output_dir)


def test_every_stage_under_fsdp_equals_ddp_and_resumes(tmp_path):
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    log = launched("fsdp_cpu", "run", str(write_recipe(tmp_path, fsdp)))
    launched("cpu_ddp", "run", str(write_recipe(tmp_path, ddp)))
    assert log.count("FSDP 2: parameters, gradients and optimizer state sharded over 2 processes") == len(RUNS)
    assert "has not been tested" not in log

    problems = {}
    for name, (_, _, _, weights) in RUNS.items():
        found = metric_mismatches(metrics(fsdp / name), metrics(ddp / name))
        for file in weights:
            found += [f"{file} {m}" for m in weight_mismatches(fsdp / name / file, ddp / name / file)]
        if found:
            problems[name] = found[:4]
    assert not problems, problems
    assert (fsdp / "sft" / "samples.jsonl").read_text() == (ddp / "sft" / "samples.jsonl").read_text()
    # the checkpoint's optimizer state is FSDP's (keyed by parameter name, whole tensors), not DDP's (by index)
    state = torch.load(fsdp / "sft" / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert "transformer.wte.weight" in state and state["transformer.wte.weight"]["exp_avg"].shape == (4096, 64)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp / "sft")  # loads as it is, the head tied again
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    # resumed from half-way under FSDP: the uninterrupted run's metrics and weights, bit for bit
    for name, stage, halfway in (("sft", "sft", 2), ("ppo", "ppo", 1)):
        uninterrupted = metrics(fsdp / name)
        final = {file: (fsdp / name / file).read_bytes() for file in RUNS[name][3]}
        assert resume_from_halfway(fsdp / name, stage, halfway) == uninterrupted, name
        assert {file: (fsdp / name / file).read_bytes() for file in final} == final, name


def test_an_encoder_decoder_model_the_stage_shards_itself_is_refused(tmp_path):
    """SFT of T5 under FSDP: accelerate cannot wrap its shared embedding; one line instead of its error."""
    config = write_config(tmp_path / "t5.yaml", "sft")
    settings = yaml.safe_load(config.read_text())
    settings["model"]["model_name_or_path"] = "builtin:tiny-t5"
    settings["data"] = {"dataset_name": "builtin:review-chat", "max_length": 48, "max_train_samples": 64}
    settings["training"]["output_dir"] = str(tmp_path / "out")
    config.write_text(yaml.safe_dump(settings))
    result = launch("fsdp_cpu", "sft", str(config))
    assert result.returncode != 0
    assert "error: FSDP: an encoder-decoder model (t5) cannot be sharded for this stage" in result.stderr, \
        result.stderr[-3000:]
