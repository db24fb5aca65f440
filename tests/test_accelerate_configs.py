"""The launch configs under configs/accelerate/: valid accelerate config files, and the ones a CPU can
launch do what their comments say (`accelerate launch --config_file ...` starts that many processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
# The configs a CPU can launch, and the processes each says it starts; the GPU ones (multi_gpu,
# deepspeed_zero2, deepspeed_zero3, fsdp) need GPUs; fsdp_cpu.yaml is launched by tests/test_fsdp.py, and
# deepspeed_zero2_cpu.yaml, deepspeed_zero3_cpu.yaml by tests/test_deepspeed.py.
CPU_LAUNCHES = {"cpu_ddp.yaml": 2, "single_gpu.yaml": 1}


def test_there_are_launch_configs():
    assert {p.stem for p in CONFIGS} >= {"single_gpu", "multi_gpu", "cpu_ddp", "deepspeed_zero2", "deepspeed_zero3",
                                         "fsdp", "fsdp_cpu", "deepspeed_zero2_cpu", "deepspeed_zero3_cpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_loads(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CPU_LAUNCHES))
def test_accelerate_launch_starts_the_processes_the_config_says(name, tmp_path):
    """As a user types it: `accelerate launch --config_file configs/accelerate/NAME -m rlhf_cli sft ...`
    trains with that many processes (the run's first log line names them)."""
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "sft", "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        "data": {"dataset_name": "builtin:reviews", "dataset_format": "text", "max_train_samples": 64,
                 "dataset_test_split": None, "max_length": 32},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "logging_steps": 1, "save_steps": 100},
    }))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / name), "-m", "rlhf_cli", "sft", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    processes = CPU_LAUNCHES[name]
    assert f"({processes} process{'es' if processes > 1 else ''}, cpu" in result.stderr, result.stderr[-4000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    # single_gpu.yaml asks for bf16; the recipe (no training.bf16) decides, and the run says so
    said = "the launcher asks for mixed precision 'bf16', but this run uses 'no'" in result.stderr
    assert said == (ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / name)).mixed_precision == "bf16")
