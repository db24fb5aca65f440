"""The launch configs under configs/accelerate/ are valid accelerate config files."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


def test_there_are_launch_configs():
    assert {p.stem for p in CONFIGS} >= {"single_gpu", "multi_gpu", "cpu_ddp", "deepspeed_zero2", "fsdp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_loads(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1
