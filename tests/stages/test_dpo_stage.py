"""`rlhf dpo` through the real CLI: files, TRL metric names, reload in transformers/peft, bad inputs,
the hub config on built-in twins, kill-and-resume, two processes, and learning on the built-in world."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import start_cli
from huggingface_hub import metadata_load
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlhf_cli.models.loading import load_model
from rlhf_cli.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TRAIN_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected", "learning_rate", "epoch", "pairs_per_s",
                 "tokens_per_s", "num_pairs", "num_tokens", "grad_norm"}
EVAL_METRICS = {"eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected", "eval_logits/chosen",
                "eval_logits/rejected"}
GOOD, BAD = ["great", "lovely", "superb", "moving"], ["awful", "dull", "boring", "weak"]


def write_pairs(path: Path, n: int = 48, implicit: bool = False, chosen: str = "chosen") -> Path:
    rows = []
    for i in range(n):
        prompt, good, bad = f"Film {i} was", f" {GOOD[i % 4]} indeed.", f" {BAD[i % 4]} indeed."
        rows.append({chosen: prompt + good, "rejected": prompt + bad} if implicit else
                    {"prompt": prompt, chosen: good, "rejected": bad})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def dpo_config(folder: Path, pairs: Path, **sections) -> Path:
    config = {
        "stage": "dpo", "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        "data": {"dataset_name": str(pairs), "dataset_test_split": None, "max_length": 32, "max_prompt_length": 8},
        "training": {"output_dir": str(folder / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-3, "logging_steps": 2, "save_steps": 2},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_cli_end_to_end_full_weights(cli, tmp_path):
    """Builtin pairs with a held-out split: files, TRL-named metrics, a model transformers reloads."""
    out = tmp_path / "out"
    data = {"dataset_name": "builtin:review-preferences", "dataset_test_split": "test", "max_train_samples": 32,
            "max_eval_samples": 8, "max_length": 128, "max_prompt_length": 16}
    result = cli("dpo", str(dpo_config(tmp_path, tmp_path / "unused", data=data)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference: a frozen copy of builtin:tiny-gpt2" in result.stderr
    for name in ("config.yaml", "run_info.json", "metrics.jsonl", "config.json", "model.safetensors", "tokenizer.json",
                 "checkpoint-4"):
        assert (out / name).exists(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    rows = read_metrics(out)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [4]
    assert not TRAIN_METRICS - set(train[-1]), TRAIN_METRICS - set(train[-1])
    assert not EVAL_METRICS - set(evals[-1]) and train[-1]["num_pairs"] == 16
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == model.config.vocab_size
    card = metadata_load(out / "README.md")  # the model card's header, as the Hub reads it
    assert card["tags"] == ["rlhf", "dpo"] and card["library_name"] == "transformers"


@pytest.mark.slow
def test_cli_lora_implicit_prompt_precomputed_padding_free(cli, tmp_path):
    """A fresh LoRA adapter (reference: adapter off), prompts inside the texts, reference log-probs
    precomputed, padding-free batches: an adapter folder that peft loads."""
    out = tmp_path / "out"
    data = write_pairs(tmp_path / "pairs.jsonl", implicit=True)
    config = dpo_config(tmp_path, data, data={"prompt_column": None}, peft={"use_peft": True, "lora_r": 4},
                        dpo={"precompute_ref_log_probs": True, "padding_free": True, "loss_type": "ipo"})
    result = cli("dpo", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference log-probs precomputed for 48 pairs" in result.stderr
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    # peft loads the adapter over its base (a built-in here, which the Hub cannot name: built by rlhf)
    base = load_model("builtin:tiny-gpt2", task="causal-lm", seed=42)
    model = PeftModel.from_pretrained(base, out)
    assert model.peft_config["default"].r == 4
    assert [r["step"] for r in read_metrics(out)] == [2, 4]


@pytest.mark.slow
def test_cli_from_an_adapter_folder_keeps_the_starting_adapter_as_reference(cli, tmp_path):
    """An `rlhf dpo` LoRA output as the start: the trained adapter continues, the reference is the
    starting adapter (so the implicit rewards start at exactly 0), and only the trained adapter is saved."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    first = dpo_config(tmp_path / "a", data, peft={"use_peft": True, "lora_r": 4}, training={"max_steps": 2})
    assert cli("dpo", str(first)).returncode == 0
    second = dpo_config(tmp_path / "b", data, model={"model_name_or_path": str(tmp_path / "a" / "out")},
                        training={"max_steps": 2, "logging_steps": 1, "learning_rate": 1e-6})
    result = cli("dpo", str(second))
    assert result.returncode == 0, result.stderr[-3000:]
    first_row = read_metrics(tmp_path / "b" / "out")[0]
    assert abs(first_row["rewards/chosen"]) < 1e-5 and abs(first_row["rewards/margins"]) < 1e-5
    assert (tmp_path / "b" / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"data": {"chosen_column": "good"}}, "data.chosen_column: column 'good' not found"),
    ({"dpo": {"reference_free": True, "precompute_ref_log_probs": True}}, "no reference to precompute"),
    ({"dpo": {"loss_type": "kto_pair"}}, "dpo.loss_type"),
    ({"dpo": {"label_smoothing": 0.1, "loss_type": "hinge"}}, "dpo.label_smoothing applies to"),
    ({"data": {"max_prompt_length": 64, "max_length": 32}}, "data.max_prompt_length (64) leaves no room"),
])
def test_bad_inputs_exit_2_with_one_message(cli, tmp_path, change, message):
    result = cli("dpo", str(dpo_config(tmp_path, write_pairs(tmp_path / "pairs.jsonl"), **change)))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and message in result.stderr, result.stderr[-2000:]
    if "column" in message:  # the data is read before the policy and its reference are loaded
        assert "model: class" not in result.stderr


@pytest.mark.slow
def test_hub_config_runs_on_built_in_twins(cli, tmp_path):
    """configs/dpo-qwen-ultrafeedback.yaml, its hub names swapped for built-ins: every other key as written
    (LoRA over a bf16 base, bf16 compute, gradient checkpointing, gradient accumulation)."""
    out = tmp_path / "out"
    twins = ["model.model_name_or_path=builtin:tiny-gpt2", "data.dataset_name=builtin:review-preferences",
             "data.prompt_column=prompt", "data.max_train_samples=8", "data.max_eval_samples=4",
             "training.max_steps=2", "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
             "peft.lora_target_modules=[c_attn]", f"training.output_dir={out}"]
    args = [a for s in twins for a in ("--set", s)]
    result = cli("dpo", str(REPO / "configs" / "dpo-qwen-ultrafeedback.yaml"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").exists()
    assert any("eval_rewards/accuracies" in r for r in read_metrics(out))


# --- interruption and many processes -------------------------------------------------------------


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in rows]


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_run(cli, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=80)
    settings = {"training": {"max_steps": 24, "save_steps": 8, "logging_steps": 1}}
    assert cli("dpo", str(dpo_config(tmp_path / "ref", data, **settings))).returncode == 0
    config = dpo_config(tmp_path / "cut", data, **settings)
    out = tmp_path / "cut" / "out"
    process = start_cli("dpo", str(config))
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-8" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before checkpoint-8"
        time.sleep(0.05)
    process.kill()
    process.communicate()
    assert len(read_metrics(out)) < 24
    result = cli("dpo", str(config), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    ref = tmp_path / "ref" / "out"
    assert comparable(read_metrics(out)) == comparable(read_metrics(ref))
    assert same_weights(out, ref)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    config = dpo_config(tmp_path, write_pairs(tmp_path / "pairs.jsonl"), training={"max_steps": 3})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rlhf_cli", "dpo", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(2 processes, cpu" in result.stderr and "all 2 processes hold identical weights" in result.stderr
    (row,) = [r for r in read_metrics(tmp_path / "out") if r["step"] == 2]
    assert row["num_pairs"] == 2 * 2 * 4  # two steps of 2 processes x 4 pairs


# --- learning -------------------------------------------------------------------------------------


LEARN_EVAL = """\
stage: eval
eval:
  models: [{sft}, {dpo}]
  baseline_model: {sft}
  num_prompts: 64
  seed: 0
  output_dir: {out}
  batch_size: 64
  plots: false
data:
  dataset_name: builtin:review-prompts
  dataset_test_split: test
  max_prompt_length: 16
generation:
  response_length: 32
  min_response_length: 24
  temperature: 1.0
  top_k: 0
  top_p: 1.0
reward:
  function: builtin:sentiment
"""


@pytest.mark.slow(minutes=4)
def test_learns_the_built_in_preferences_from_the_sft_model(cli, sft_model, tmp_path, write_yaml):
    """From the short SFT model: held-out implicit-reward accuracy well above 0.5, and samples on
    held-out openings that the gold scorer (never trained on) rates higher than the SFT model's."""
    out = tmp_path / "dpo"
    started = time.perf_counter()
    result = cli("dpo", str(REPO / "configs" / "quickstart-dpo.yaml"), "--output-dir", str(out),
                 "--set", f"model.model_name_or_path={sft_model}", "--set", "data.max_train_samples=960",
                 "--set", "data.max_eval_samples=100", "--set", "training.max_steps=60",
                 "--set", "training.learning_rate=1e-4", "--set", "training.eval_steps=1000", timeout=1800)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in read_metrics(out) if "eval_rewards/accuracies" in r][-1]
    evaluation = tmp_path / "eval"
    config = write_yaml("eval.yaml", LEARN_EVAL.format(sft=sft_model, dpo=out, out=evaluation))
    result = cli("eval", str(config), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    models = json.loads((evaluation / "eval.json").read_text())["models"]
    gold = {name: m["rewards"]["builtin:sentiment"]["mean"] for name, m in models.items()}
    print(f"held-out accuracy {final['eval_rewards/accuracies']:.3f}, gold {gold} after {seconds:.0f} s of DPO")
    assert final["eval_rewards/accuracies"] >= 0.7, final  # measured 0.79 (0.72 at step 30)
    sft_gold, dpo_gold = gold[Path(sft_model).name], gold[out.name]
    assert dpo_gold > sft_gold + 0.05, gold  # measured 0.013 -> 0.149


@pytest.mark.slow
def test_an_encoder_decoder_learns_the_pairs_with_a_lora_adapter(cli, tmp_path):
    """builtin:tiny-t5: the prompt is the encoder's input, each response the decoder's target; a LoRA
    adapter (SEQ_2_SEQ_LM, reference: the adapter off) ranks the chosen side first after a few steps.
    Padding-free batches, which concatenate causal sequences, are refused by name."""
    out = tmp_path / "out"
    data = write_pairs(tmp_path / "pairs.jsonl")
    config = dpo_config(tmp_path, data, model={"model_name_or_path": "builtin:tiny-t5"},
                        peft={"use_peft": True, "lora_r": 8, "lora_alpha": 16},
                        training={"max_steps": 12, "learning_rate": 1e-2, "per_device_train_batch_size": 8,
                                  "logging_steps": 4, "save_steps": 12})
    result = cli("dpo", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    rows = read_metrics(out)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] and rows[-1]["rewards/accuracies"] >= 0.75, rows
    refused = cli("dpo", str(config), "--set", "dpo.padding_free=true", "--output-dir", str(tmp_path / "free"))
    assert refused.returncode == 2 and "dpo.padding_free" in refused.stderr and "encoder-decoder" in refused.stderr
