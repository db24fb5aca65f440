"""FSDP 2 on two CPU processes (configs/accelerate/fsdp_cpu.yaml), against data parallel (cpu_ddp.yaml) on the
same runs (tests/engines.py: the stages of one recipe, launched once per engine, and the tolerances): the
training stages whose FSDP path rlhf supports (training/accel.py TESTED_UNDER) give DDP's metrics and weights,
write a plain Hugging Face folder, and resume to the uninterrupted run.
"""

import pytest
import torch
import yaml
from engines import (
    RUNS,
    assert_prompts_shared_in_step,
    assert_resume_exactly,
    ddp_runs,
    launch,
    launched,
    mismatches_with_ddp,
    write_config,
    write_recipe,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_every_stage_under_fsdp_equals_ddp_and_resumes(tmp_path, tmp_path_factory):
    fsdp, ddp = tmp_path / "fsdp", ddp_runs(tmp_path_factory)
    log = launched("fsdp_cpu", "run", str(write_recipe(tmp_path, fsdp)))
    assert log.count("FSDP 2: parameters, gradients and optimizer state sharded over 2 processes") == len(RUNS)
    assert "has not been tested" not in log
    assert_prompts_shared_in_step(log)

    assert not (problems := mismatches_with_ddp(fsdp, ddp)), problems
    assert (fsdp / "sft" / "samples.jsonl").read_text() == (ddp / "sft" / "samples.jsonl").read_text()
    # the checkpoint's optimizer state is FSDP's (keyed by parameter name, whole tensors), not DDP's (by index)
    state = torch.load(fsdp / "sft" / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert "transformer.wte.weight" in state and state["transformer.wte.weight"]["exp_avg"].shape == (4096, 64)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp / "sft")  # loads as it is, the head tied again
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    # resumed from half-way under the same engine: the uninterrupted run's metrics and weights, bit for bit
    assert_resume_exactly("fsdp_cpu", fsdp)


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
