"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (configs/accelerate/deepspeed_zero{2,3}_cpu.yaml), against data
parallel (cpu_ddp.yaml) on the same runs (tests/engines.py: the stages of one recipe, launched once per engine,
and the tolerances; every model loaded from a folder): every training stage rlhf supports under DeepSpeed
gives DDP's metrics and weights,
writes a plain Hugging Face folder, checkpoints through DeepSpeed's own sharded files, and resumes to the
uninterrupted run.
"""

import pytest
import torch
from engines import (
    RUNS,
    assert_prompts_shared_in_step,
    assert_resume_exactly,
    ddp_runs,
    launch,
    launched,
    mismatches_with_ddp,
    write_recipe,
)
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.mark.parametrize("stage", [2, 3])
def test_every_stage_under_zero_equals_ddp_and_resumes(stage, tmp_path, tmp_path_factory):
    engine, runs, ddp = f"deepspeed_zero{stage}_cpu", tmp_path / f"zero{stage}", ddp_runs(tmp_path_factory)
    log = launched(engine, "run", str(write_recipe(tmp_path, runs)))
    assert log.count(f"DeepSpeed ZeRO-{stage}: ") == len(RUNS), log[-3000:]
    assert "has not been tested" not in log and "the launcher asks for" not in log
    assert_prompts_shared_in_step(log)
    assert "is deprecated. Please use `torch.distributed" not in log  # torch's notice to DeepSpeed, per collective

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
