"""Every common architecture through every stage, as a user brings it: a local folder holding a tiny
random model of that family (tests/architectures.py) runs a few steps of `rlhf <stage>` through the
real CLI, saves, and reloads in plain `transformers`; and the log-probs recorded while sampling equal
a fresh forward's (left padding, RoPE position ids, tied or untied heads).

Encoder-decoders (T5, BART) run every stage too: the prompt is the encoder's input, and SFT learns
prompt-completion rows (plain text has no input/target split)."""

import json
from pathlib import Path

import pytest
import torch
from architectures import ARCHITECTURES, DECODER_ONLY, ENCODER_DECODER, save_tiny
from conftest import run_in_process
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from rlhf_cli.training.metrics import read_metrics

GOOD, BAD = ["great", "lovely", "superb", "moving"], ["awful", "dull", "boring", "weak"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    return {name: save_tiny(name, root / name) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small local jsonl files: text for SFT, pairs for reward models and DPO, prompts for PPO/GRPO."""
    root = tmp_path_factory.mktemp("data")
    rows = {
        "text": [{"text": f"Film {i} was {GOOD[i % 4]} and the cast was {BAD[i % 4]}."} for i in range(32)],
        "pairs": [{"prompt": f"Film {i} was", "chosen": f" {GOOD[i % 4]} indeed.", "rejected": f" {BAD[i % 4]} indeed."}
                  for i in range(32)],
        "prompts": [{"prompt": f"Film {i} was"} for i in range(32)],
    }
    paths = {}
    for name, items in rows.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths


def stage_config(stage: str, seq2seq: bool, data: dict[str, Path], out: Path) -> dict:
    training = {"output_dir": str(out), "learning_rate": 1e-3, "per_device_train_batch_size": 4,
                "logging_steps": 1, "save_steps": 100}
    local = {"dataset_test_split": None}
    return {
        "sft": {"data": {"dataset_name": str(data["pairs"]), "dataset_format": "prompt-completion",
                         "completion_column": "chosen", "max_length": 32, **local} if seq2seq else
                {"dataset_name": str(data["text"]), "dataset_format": "text", "max_length": 32, **local},
                "training": {**training, "max_steps": 2}},
        "reward": {"data": {"dataset_name": str(data["pairs"]), "max_length": 32, **local},
                   "training": {**training, "max_steps": 2}},
        "dpo": {"data": {"dataset_name": str(data["pairs"]), "max_length": 32, "max_prompt_length": 8, **local},
                "training": {**training, "max_steps": 2}},
        "ppo": {"data": {"dataset_name": str(data["prompts"]), "max_prompt_length": 8, **local},
                "generation": {"response_length": 6}, "reward": {"function": "builtin:sentiment"},
                "training": training, "ppo": {"total_episodes": 8, "num_mini_batches": 2, "sample_steps": 1}},
        "grpo": {"data": {"dataset_name": str(data["prompts"]), "max_prompt_length": 8, **local},
                 "generation": {"response_length": 6}, "reward": {"function": "builtin:sentiment"},
                 "training": training, "grpo": {"total_episodes": 8, "num_generations": 2, "sample_steps": 1}},
    }[stage]


def run_stage(monkeypatch, capsys, tmp_path, stage: str, arch: str, model: Path, data) -> tuple[int, str, Path]:
    import yaml

    out = tmp_path / "out"
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump({"stage": stage, "model": {"model_name_or_path": str(model), "attn_implementation": "eager"},
                                    **stage_config(stage, arch in ENCODER_DECODER, data, out)}))
    code, err = run_in_process(monkeypatch, capsys, stage, str(path))
    return code, err, out


RELOAD = {"sft": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification, "dpo": AutoModelForCausalLM,
          "ppo": AutoModelForCausalLM, "grpo": AutoModelForCausalLM}
STAGES = list(RELOAD)
CASES = [(arch, stage) for arch in ARCHITECTURES for stage in STAGES]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "stage"), CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_stage_trains_saves_and_reloads(arch, stage, folders, data, tmp_path, monkeypatch, capsys):
    code, err, out = run_stage(monkeypatch, capsys, tmp_path, stage, arch, folders[arch], data)
    assert code == 0, err[-3000:]
    assert read_metrics(out), "no metrics logged"
    loaded = json.loads((out / "run_info.json").read_text())["model"]
    assert loaded["dtype"] == "float32" and loaded["attn_implementation"] == "eager"
    auto = AutoModelForSeq2SeqLM if arch in ENCODER_DECODER and stage != "reward" else RELOAD[stage]
    model = auto.from_pretrained(out)
    assert model.config.model_type == json.loads((folders[arch] / "config.json").read_text())["model_type"]
    ids = torch.tensor([[5, 6, 7, 8, model.config.eos_token_id]])  # T5/BART classifiers pool the eos token
    with torch.no_grad():
        logits = model(input_ids=ids, **({"decoder_input_ids": ids} if model.config.is_encoder_decoder else {})).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", list(DECODER_ONLY))
def test_sampled_logprobs_equal_a_fresh_forward(arch, folders, tmp_path):
    """What tests/ppo/test_performance_equivalence.py checks for GPT-2, for every decoder-only family:
    left-padded prompts of different lengths, rows stopping at different steps."""
    from ppo.test_performance_equivalence import check_recorded_equals_forward, make_trainer

    check_recorded_equals_forward(make_trainer(tmp_path, str(folders[arch])))
