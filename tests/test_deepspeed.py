"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (configs/accelerate/deepspeed_zero{2,3}_cpu.yaml), against data
parallel (cpu_ddp.yaml) on the same runs (tests/engines.py: the stages of one recipe, launched once per engine,
and the tolerances): every training stage rlhf supports under DeepSpeed gives DDP's metrics and weights,
writes a plain Hugging Face folder, checkpoints through DeepSpeed's own sharded files, and resumes to the
uninterrupted run.
"""

import pytest
import torch
import yaml
from engines import (
    ONLINE,
    PPO,
    PROMPTS,
    RUNS,
    assert_resume_exactly,
    ddp_runs,
    launch,
    launched,
    metric_mismatches,
    metrics,
    mismatches_with_ddp,
    weight_mismatches,
    write_recipe,
)
from transformers import AutoModelForCausalLM

from rlhf_cli.models.loading import load_model, load_tokenizer

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.mark.parametrize("stage", [2, 3])
def test_every_stage_under_zero_equals_ddp_and_resumes(stage, tmp_path, tmp_path_factory):
    engine, runs, ddp = f"deepspeed_zero{stage}_cpu", tmp_path / f"zero{stage}", ddp_runs(tmp_path_factory)
    log = launched(engine, "run", str(write_recipe(tmp_path, runs)))
    assert log.count(f"DeepSpeed ZeRO-{stage}: ") == len(RUNS), log[-3000:]
    assert "has not been tested" not in log and "the launcher asks for" not in log

    assert not (problems := mismatches_with_ddp(runs, ddp)), problems
    assert (runs / "sft" / "samples.jsonl").read_text() == (ddp / "sft" / "samples.jsonl").read_text()
    model = AutoModelForCausalLM.from_pretrained(runs / "sft")  # a plain folder, the head tied again
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # the optimizer state is DeepSpeed's own checkpoint, one file per process; optimizer.pt says who wrote it
    checkpoint = runs / "sft" / "checkpoint-4"
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True) == {"deepspeed": {"zero_stage": stage,
                                                                                       "processes": 2}}
    shards = sorted(p.name for p in (checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    # resumed from half-way under the same engine: the uninterrupted run's metrics and weights, bit for bit
    assert_resume_exactly(engine, runs)

    # the same checkpoint resumed without DeepSpeed: refused, naming both launches, before anything trains
    result = launch("cpu_ddp", "sft", str(runs / "sft" / "config.yaml"), "--resume")
    assert result.returncode != 0  # each process exits 2; the launcher reports its own failure
    assert (f"checkpoint-4 was written under DeepSpeed ZeRO-{stage} on 2 processes, and this run is without "
            "DeepSpeed: resume it as it was launched") in result.stderr, result.stderr[-3000:]


def test_models_loaded_from_folders_under_zero3_equal_ddp(tmp_path):
    """Models from folders, as every real run loads them (the built-in ones above are built, not loaded):
    accelerate leaves its DeepSpeed config where transformers' `from_pretrained` reads it, which under ZeRO-3
    partitioned each model as it loaded. SFT then failed in its evaluation before training (the weights read
    before the engine held them: "'weight' must be 2-D"), and PPO on its frozen reward model. Now both give
    data parallel's metrics and weights."""
    folders = {}
    for name, task in (("policy", "causal-lm"), ("reward-model", "sequence-classification")):
        folders[name] = tmp_path / name
        load_model("builtin:tiny-gpt2?seed=5", task=task).save_pretrained(folders[name])
        load_tokenizer("builtin:tiny-gpt2").save_pretrained(folders[name])
    training = {"output_dir": "unused", "per_device_train_batch_size": 4, "per_device_eval_batch_size": 2,
                "learning_rate": 1e-3, "adam_epsilon": 1e-3, "logging_steps": 1, "save_steps": 100}
    configs = {
        "sft": {"stage": "sft", "model": {"model_name_or_path": str(folders["policy"])},
                "data": {"dataset_name": "builtin:reviews", "dataset_format": "text", "max_length": 32,
                         "max_train_samples": 64, "max_eval_samples": 9},
                "training": {**training, "max_steps": 4}},
        "ppo": {"stage": "ppo", "model": {"model_name_or_path": str(folders["policy"])},
                "data": {**PROMPTS, "max_train_samples": 64, "max_eval_samples": 9},
                "training": {**training, "per_device_train_batch_size": 8},
                **ONLINE, "reward": {"model": str(folders["reward-model"])}, "ppo": PPO},
    }
    stages = []
    for name, config in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        stages.append({"name": name, "command": name, "config": str(tmp_path / f"{name}.yaml")})
    runs = {}
    for engine in ("cpu_ddp", "deepspeed_zero3_cpu"):
        runs[engine] = tmp_path / engine
        (tmp_path / f"{engine}.yaml").write_text(yaml.safe_dump({"output_dir": str(runs[engine]), "stages": stages}))
        launched(engine, "run", str(tmp_path / f"{engine}.yaml"))
    for name in configs:
        ddp, zero3 = runs["cpu_ddp"] / name, runs["deepspeed_zero3_cpu"] / name
        # evaluated before training (SFT's held-out loss, PPO's held-out reward: the reward model's scores)
        assert any(key.startswith(("eval_loss", "eval/")) for key in metrics(ddp)[0]), (name, metrics(ddp)[0])
        assert not (found := metric_mismatches(metrics(zero3), metrics(ddp))), (name, found[:4])
        assert not (found := weight_mismatches(zero3 / "model.safetensors", ddp / "model.safetensors")), (name, found[:4])
