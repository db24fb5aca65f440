"""training/accel.py: start-up warnings about how a run was launched (`launch_warnings`), and unwrapping
that leaves DeepSpeed unimported where it is not in use."""

import importlib.util
import subprocess
import sys
import textwrap
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


def test_a_run_without_deepspeed_unwraps_and_saves_without_importing_it(tmp_path):
    """accelerate imports deepspeed (and through it mlflow: 1.3 s) on every unwrap when it is installed; after
    make_accelerator it does so only once deepspeed is in use, and then checks for its engine as before."""
    program = textwrap.dedent(f"""
        import sys
        from pathlib import Path

        import accelerate.utils.other
        from transformers import GPT2Config, GPT2LMHeadModel

        from rlhf_cli.config.sections import TrainingConfig
        from rlhf_cli.training.accel import make_accelerator

        accelerator = make_accelerator(TrainingConfig(output_dir="{tmp_path}"), Path("{tmp_path}"))
        model = accelerator.prepare(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)))
        accelerator.unwrap_model(model).save_pretrained("{tmp_path / 'model'}")  # transformers unwraps too
        assert "deepspeed" not in sys.modules, "deepspeed imported"
        if {importlib.util.find_spec("deepspeed") is not None}:
            import deepspeed  # noqa: F401  (as a DeepSpeed run has: the engine test is back)
            assert accelerate.utils.other.is_deepspeed_available()
        print("ok")
        """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
