"""What tests/test_fsdp.py and tests/test_deepspeed.py share: the runs of one recipe (every training stage
whose path under a sharding engine rlhf supports), launched on two CPU processes under an engine and under
data parallel (cpu_ddp.yaml), and the comparison of their metrics and weights.

Tolerances: a sharding engine reduce-scatters the gradients where DDP all-reduces them, which sums the same
float32 numbers in another order (~1e-7 relative per step). AdamW with its usual epsilon (1e-8) turns such
rounding in a near-zero gradient (the reward model's final-norm bias gets ~1e-9) into a full-size step of
either sign, so these runs use epsilon 1e-3: the comparison then measures the engines, not Adam's
amplification of rounding. Over 4 steps at lr 1e-3 that left the weights within 6e-8 and the logged figures
within 2.4e-6 relative under FSDP on the machine that wrote the test (DeepSpeed ZeRO-2/3: 4e-8, and the
figures within the same bounds); the bounds below leave about ten times that. A gradient that was not reduced
over the processes, or a shard left out, moves the weights by ~1e-3 per step. Resume is compared exactly
(the same engine on the same machine).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from architectures import save_tiny
from conftest import run_folder
from image_pipelines import built_tiny_sd
from safetensors.torch import load_file

from rlhf_cli.models.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]

WEIGHTS_ATOL = 1e-6
METRICS_RTOL, METRICS_ATOL = 2e-5, 1e-5
# The gradient norm of SFT's two accumulated micro-batches: the engines reduce each micro-batch's gradient where
# DDP sums them locally first, and the norm of that sum (partly cancelling) came out 0.9-1.4e-5 relative from
# DDP's under FSDP and ZeRO-2/3 alike while every weight stayed within 1.2e-7.
GRAD_NORM_RTOL = 1e-4


def launch(engine: str, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<engine>.yaml -m rlhf_cli <args>`, as a user types it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / f"{engine}.yaml"), "-m", "rlhf_cli", *args]
    # tests/ importable: the DDPO runs' reward is tests/fakes/image_rewards.py
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


def launched(engine: str, *args: str) -> str:
    result = launch(engine, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(2 processes, cpu" in result.stderr, result.stderr[-4000:]
    return result.stderr


ONLINE = {"generation": {"response_length": 12}, "reward": {"function": "builtin:sentiment"}}
PROMPTS = {"dataset_name": "builtin:review-prompts"}
# review openings as prompts (each run gives data.prompt_opening_tokens)
OPENINGS = {"dataset_name": "builtin:reviews", "prompt_column": "text", "max_prompt_length": 256}
PPO = {"total_episodes": 64, "num_mini_batches": 2, "num_ppo_epochs": 1}
CRITIC_FREE = {"total_episodes": 64, "num_generations": 4, "beta": 0.04, "steps_per_generation": 2}
LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8}
IMAGE_PROMPTS = {"dataset_name": "builtin:shape-prompts"}
# DDPO on the built-in tiny Stable Diffusion: 3 epochs of 8 images per process in 4 denoising steps, each epoch 2
# optimizer steps of 2 micro-batches. Its log-prob ratios amplify float rounding (docs/distributed.md), so the
# reward is continuous in the pixels (the JPEG rewards jump with one pixel's rounding) and the clip range clips
# nothing (a ratio 1e-7 from the bound would decide which rows train): then the comparison is about the engines.
DDPO = {"reward": {"function": "fakes.image_rewards:brightness"},
        "ddpo": {"num_epochs": 3, "sample_num_steps": 4, "sample_guidance_scale": 3.0, "sample_batch_size": 4,
                 "sample_num_batches_per_epoch": 2, "train_batch_size": 2, "train_gradient_accumulation_steps": 2,
                 "train_timesteps_per_call": None, "train_clip_range": 1000.0, "eval_samples_per_prompt": 1,
                 "grid_seeds": [0]}}
# The language models the runs start from, saved as folders by `write_recipe` (these names stand for them): every
# run loads its models through `from_pretrained` as a real run does, where a built-in name is built instead.
# Under ZeRO-3 that load partitioned each model (accelerate leaves its DeepSpeed config where transformers
# reads it): SFT failed in its evaluation, PPO on its frozen reward model; under FSDP the critic's new head was
# empty on the second process (training/accel.py load_models_whole).
# Besides GPT-2 and T5, two families real runs bring (tests/architectures.py): Llama (RoPE, grouped-query
# attention, tied embeddings, pad == eos) and Qwen2 (the same, its LM head untied).
GPT2, T5, REWARD_MODEL, LLAMA, QWEN2 = "tiny-gpt2", "tiny-t5", "tiny-gpt2-reward", "tiny-llama", "tiny-qwen2"


def saved_builtin(name: str, task: str):
    """A function that saves built-in model `name` (for `task`) and its tokenizer in a folder."""

    def save(folder: Path) -> None:
        load_model(name, task=task).save_pretrained(folder)
        load_tokenizer(name).save_pretrained(folder)

    return save


FOLDERS = {GPT2: saved_builtin("builtin:tiny-gpt2", "causal-lm"), T5: saved_builtin("builtin:tiny-t5", "seq2seq-lm"),
           REWARD_MODEL: saved_builtin("builtin:tiny-gpt2?seed=5", "sequence-classification"),
           LLAMA: partial(save_tiny, "llama"), QWEN2: partial(save_tiny, "qwen2")}
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
    # and a reward model: frozen, whole on every process (under ZeRO-3 it once loaded partitioned and empty)
    "ppo-critic": ("ppo", PROMPTS, {**ONLINE, "reward": {"model": REWARD_MODEL},
                                    "ppo": {**PPO, "value_model_name_or_path": GPT2}},
                   ["model.safetensors", "value_head.safetensors"]),
    # an encoder-decoder policy shards inside the wrapper (alone it cannot: the refusal test below)
    "ppo-t5": ("ppo", PROMPTS, {**ONLINE, "ppo": PPO, "model": {"model_name_or_path": T5}},
               ["model.safetensors", "value_head.safetensors"]),
    # no value head: the tied LM head of the wrapped policy must stay tied (it came back untied, once).
    # Each prompt runs once per group (lm/shared_prompts.py): GRPO's 20-24-token prompts share in every training
    # forward; RLOO's 2-12-token ones in some, where one process's rows would and another's would not
    "grpo": ("grpo", {**OPENINGS, "prompt_opening_tokens": [20, 24]},
             {**ONLINE, "grpo": CRITIC_FREE, "model": {"model_name_or_path": LLAMA}}, ["model.safetensors"]),
    "rloo": ("rloo", {**OPENINGS, "prompt_opening_tokens": [2, 12]},
             {**ONLINE, "rloo": CRITIC_FREE, "model": {"model_name_or_path": QWEN2}}, ["model.safetensors"]),
    # a diffusers UNet: sampled by every process in step (evaluation, grids), saved through a whole copy
    "ddpo": ("ddpo", IMAGE_PROMPTS, {**DDPO, "peft": {"use_peft": False}}, ["unet/diffusion_pytorch_model.safetensors"]),
    # LoRA: the pipeline samples through the sharded peft model (its root's parameters gathered in its forward)
    "ddpo-lora": ("ddpo", IMAGE_PROMPTS, {**DDPO, "peft": {"use_peft": True, "save_merged": True}},
                  ["pytorch_lora_weights.safetensors", "merged/unet/diffusion_pytorch_model.safetensors"]),
}


def save_models(folder: Path) -> None:
    """Each of FOLDERS saved (with its tokenizer) as `folder`/<name>."""
    for name, save in FOLDERS.items():
        save(folder / name)


def in_folder(value, folder: Path):
    """`value` (a config, or one of its values) with each of FOLDERS' names made a path under `folder`."""
    if isinstance(value, dict):
        return {key: in_folder(item, folder) for key, item in value.items()}
    return str(folder / value) if isinstance(value, str) and value in FOLDERS else value


def write_config(path: Path, name: str) -> Path:
    """The config of run `name`, its models the folders beside `path` (save_models)."""
    stage, data, sections, _ = RUNS[name]
    if stage == "ddpo":  # its own batch and length keys (ddpo.*); logging, evaluation and saving count epochs
        path.write_text(yaml.safe_dump({
            "stage": stage, "model": {"model_name_or_path": "builtin:tiny-sd"}, "data": data,
            "training": {"output_dir": "unused", "learning_rate": 3e-4, "adam_epsilon": 1e-3, "logging_steps": 1,
                         "save_steps": 1, "eval_steps": 2, "per_device_eval_batch_size": 4},
            **sections}))
        return path
    config = {
        "stage": stage, "model": {"model_name_or_path": GPT2},
        # 9 held-out rows over 2 processes in batches of 2: 3 forwards on one, 2 on the other
        "data": {**data, "max_train_samples": 64, "max_eval_samples": 9},
        "training": {"output_dir": "unused", "max_steps": 4, "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 2, "learning_rate": 1e-3, "adam_epsilon": 1e-3, "logging_steps": 1,
                     "save_steps": 2, "eval_steps": 2},
        **sections,
    }
    if name == "sft":  # two micro-batches per optimizer step: the engines' accumulation (DeepSpeed steps in backward)
        config["training"].update(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    if stage in ("ppo", "grpo", "rloo"):  # the length comes from total_episodes; 8 rollouts per process and iteration
        config["training"].update(max_steps=-1, per_device_train_batch_size=8, save_steps=1, eval_steps=None)
    path.write_text(yaml.safe_dump(in_folder(config, path.parent)))
    return path


def write_recipe(folder: Path, output_dir: Path) -> Path:
    """Every run as one stage of a recipe: one launch per engine (each launch costs seconds of start-up)."""
    save_models(folder)
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
            for key, value in x.items()
            if value != pytest.approx(y[key], rel=GRAD_NORM_RTOL if key == "grad_norm" else METRICS_RTOL,
                                      abs=METRICS_ATOL)]


def weight_mismatches(a: Path, b: Path) -> list[str]:
    x, y = load_file(a), load_file(b)
    if sorted(x) != sorted(y):  # a plain folder: no sharded or duplicated (tied) tensors
        return [f"tensor names differ: {sorted(set(x) ^ set(y))[:3]}"]
    return [f"{key}: {(x[key] - y[key]).abs().max().item():.2e}" for key in x
            if x[key].shape != y[key].shape or not torch.allclose(x[key], y[key], atol=WEIGHTS_ATOL, rtol=0)]


RESUMED = {"sft": 2, "ppo": 1, "ddpo": 2}  # run -> the half-way checkpoint it resumes from


def assert_resume_exactly(engine: str, runs: Path) -> None:
    """SFT, PPO and DDPO cut back to a half-way checkpoint (later checkpoints and the final model gone) and
    resumed under `engine` give the uninterrupted run's metrics and final weights bit for bit (the same engine
    on the same machine). One launch resumes the three: `rlhf run` on a recipe of just them, their configs
    beside `runs` (write_recipe), resumes each interrupted stage."""
    uninterrupted = {name: metrics(runs / name) for name in RESUMED}
    final = {name: {file: (runs / name / file).read_bytes() for file in RUNS[name][3]} for name in RESUMED}
    kept = {"config.yaml", "metrics.jsonl", "run_info.json"}
    for name, halfway in RESUMED.items():
        for path in (runs / name).iterdir():
            if path.name not in kept | {f"checkpoint-{halfway}"}:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    recipe = runs.parent / f"resume-{runs.name}.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(runs), "stages": [
        {"name": name, "command": RUNS[name][0], "config": str(runs.parent / f"{name}.yaml")} for name in RESUMED]}))
    log = launched(engine, "run", str(recipe))
    for name, halfway in RESUMED.items():
        assert f"resumed from {runs / name / f'checkpoint-{halfway}'}" in log, (name, log[-3000:])
        assert metrics(runs / name) == uninterrupted[name], name
        assert {file: (runs / name / file).read_bytes() for file in final[name]} == final[name], name


def assert_prompts_shared_in_step(log: str) -> None:
    """GRPO and RLOO ran prompts once per group in some forwards, every process deciding as the others did
    (training/sharding.py `agreement`: else ZeRO-2 reduced mixed-up gradients for RLOO here)."""
    shared = re.findall(r"share_prompt_prefix: (\d+) of \d+ forwards.*the processes share only together\)", log)
    assert len(shared) == 2 and all(int(n) > 0 for n in shared), shared or log[-3000:]


def ddp_runs(tmp_path_factory) -> Path:
    """The recipe under data parallel, the reference of every engine's runs: launched once and kept for the
    test session's other engine tests (under xdist too: the folder is shared by the workers, and the tests
    that launch processes take turns, conftest.py). The built-in pipeline is built first, so that no launch
    spends its time building it."""
    shared = run_folder(tmp_path_factory) / "ddp-recipe"
    built_tiny_sd()
    if not (shared / "done").exists():
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir()
        launched("cpu_ddp", "run", str(write_recipe(shared, shared / "out")))
        (shared / "done").touch()
    return shared / "out"


def mismatches_with_ddp(runs: Path, ddp: Path) -> dict[str, list[str]]:
    """Per run, the first few figures and weights that differ from data parallel's beyond the tolerances."""
    problems = {}
    for name, (_, _, _, weights) in RUNS.items():
        found = metric_mismatches(metrics(runs / name), metrics(ddp / name))
        for file in weights:
            found += [f"{file} {m}" for m in weight_mismatches(runs / name / file, ddp / name / file)]
        if found:
            problems[name] = found[:4]
    return problems
