"""Start-up warnings about how a run was launched (training/accel.py `launch_warnings`)."""

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from rlhf_cli.training.accel import launch_warnings


def accelerator(engine=DistributedType.NO, precision="no", processes=2):
    return SimpleNamespace(distributed_type=engine, mixed_precision=precision, num_processes=processes,
                           device=SimpleNamespace(type="cpu"))


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for variable in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("engine, name", [(DistributedType.DEEPSPEED, "DeepSpeed"), (DistributedType.FSDP, "FSDP")])
def test_an_untested_engine_is_said_at_start_up(engine, name, monkeypatch):
    stage = "kto"  # a stage added later, before its engine comparison is
    (warning,) = launch_warnings(accelerator(engine), stage)
    assert warning.startswith(f"{name}: rlhf {stage} has not been tested under {name}")


@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED])
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "grpo", "rloo", "ddpo"])
def test_stages_tested_under_an_engine_say_nothing(engine, stage):
    assert launch_warnings(accelerator(engine), stage) == []


@pytest.mark.parametrize("engine", [DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU])
def test_data_parallel_and_single_process_runs_say_nothing(engine, monkeypatch):
    assert launch_warnings(accelerator(engine), "sft") == []


def test_a_launchers_mixed_precision_the_config_overrides_is_said(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    (warning,) = launch_warnings(accelerator(precision="no"), "sft")
    assert "mixed precision 'bf16'" in warning and "training.bf16" in warning


@pytest.mark.parametrize("launcher, run", [("no", "bf16"), ("bf16", "bf16")])
def test_a_launcher_that_agrees_or_asks_for_nothing_says_nothing(launcher, run, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert launch_warnings(accelerator(precision=run), "sft") == []


def test_an_engine_the_launcher_asked_for_but_accelerate_did_not_apply_is_said(monkeypatch):
    """A DeepSpeed launch of one process runs as a plain process."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    (warning,) = launch_warnings(accelerator(DistributedType.NO, processes=1), "sft")
    assert warning.startswith("the launcher asks for DeepSpeed, but accelerate runs this as NO (1 process(es) on cpu)")
    assert warning.endswith("one process has nothing to shard with, so it holds the whole model.")


def test_an_engine_that_was_applied_is_only_said_untested(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    (warning,) = launch_warnings(accelerator(DistributedType.FSDP), "kto")
    assert warning.startswith("FSDP: rlhf kto has not been tested")
