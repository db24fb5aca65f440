"""The model card (README.md) of a run folder: a metadata header the Hub reads, what the run was, and a
loading snippet that really loads the folder. Folders are saved here from built-in tiny models (no
training run): a few seconds in all."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import metadata_load

from rlhf_cli.config.loader import build_stage
from rlhf_cli.config.sections import PeftConfig
from rlhf_cli.errors import UserError
from rlhf_cli.models.adapters import apply_lora, save_final_model
from rlhf_cli.models.loading import load_model, load_tokenizer
from rlhf_cli.training.metrics import MetricsWriter
from rlhf_cli.training.model_card import CARD, MARKER, write_model_cards
from rlhf_cli.training.output import OUTPUT_FILES, holds_run, prepare_output_dir, write_run_files

TINY = "builtin:tiny-gpt2"


def make_config(stage: str, out: Path, model: str = TINY, **sections):
    raw = {"model": {"model_name_or_path": model}, "training": {"output_dir": str(out)}, **sections}
    if stage in ("ppo", "grpo", "rloo"):
        raw.setdefault("reward", {"function": "builtin:sentiment"})
    return build_stage(stage, raw)


def run_folder(out: Path, stage: str, config, model, tokenizer, peft: PeftConfig | None = None) -> Path:
    """What a finished run leaves: config.yaml, run_info.json, metrics.jsonl and the final model."""
    out.mkdir(parents=True, exist_ok=True)
    write_run_files(out, stage, config)
    metrics = MetricsWriter(out)
    metrics.log(0, {"eval_loss": 8.3})
    metrics.log(2, {"loss": 7.9, "mean_token_accuracy": 0.11, "epoch": 0.5})
    metrics.log(4, {"loss": 7.5, "mean_token_accuracy": 0.2, "epoch": 1.0})
    metrics.log(4, {"eval_loss": 7.4})
    save_final_model(model, tokenizer, out, peft or PeftConfig())
    return out


def card_of(folder: Path) -> tuple[dict, str]:
    """(metadata header as the Hub reads it, the whole text)."""
    text = (folder / CARD).read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert metadata_load(folder / CARD) == header
    return header, text


def run_snippet(folder: Path, capsys) -> dict:
    """Execute the card's python block as a user would paste it; its variables."""
    (code,) = re.findall(r"```python\n(.*?)```", (folder / CARD).read_text(), re.S)
    namespace: dict = {}
    exec(compile(code, str(folder / CARD), "exec"), namespace)
    capsys.readouterr()  # the generated text it prints
    return namespace


def logits(model, ids=((5, 6, 7, 8),)) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids)).logits


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY, task="causal-lm", seed=42), load_tokenizer(TINY)


def test_full_weights_card_header_body_and_a_snippet_that_loads(tmp_path, tiny, capsys):
    model, tokenizer = tiny
    config = make_config("sft", tmp_path / "sft", data={"dataset_name": "builtin:reviews", "max_train_samples": 400},
                         training={"output_dir": str(tmp_path / "sft"), "learning_rate": 3e-3, "max_steps": 4})
    out = run_folder(tmp_path / "sft", "sft", config, model, tokenizer)
    assert write_model_cards(out, "sft", config) == [out / CARD]

    header, text = card_of(out)
    # a built-in is on no Hub: no base_model, no dataset; nothing says what its license would be
    assert header == {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["rlhf", "sft"]}
    assert MARKER in text
    assert "| `training.learning_rate` | 0.003 |" in text and "| `training.max_steps` | 4 |" in text
    assert "`train`, at most 400 rows" in text
    assert "| `loss` | 7.5 | 4 |  |" in text and "| `eval_loss` | 7.4 | 4 | 8.3 |" in text  # last value, before
    assert "rlhf sft config.yaml --output-dir NEW_FOLDER" in text
    assert "8 x 1 (accumulation) x 1 = 8 sequences per optimizer step" in text

    loaded = run_snippet(out, capsys)
    assert type(loaded["model"]).__name__ == "GPT2LMHeadModel"
    assert torch.allclose(logits(loaded["model"]), logits(model), atol=1e-5)


def test_a_seq2seq_policy_is_text2text_and_loads_as_seq2seq(tmp_path, capsys):
    model, tokenizer = load_model("builtin:tiny-t5", task="seq2seq-lm", seed=42), load_tokenizer("builtin:tiny-t5")
    config = make_config("ppo", tmp_path / "t5", model="builtin:tiny-t5")
    out = run_folder(tmp_path / "t5", "ppo", config, model, tokenizer)
    write_model_cards(out, "ppo", config)
    assert card_of(out)[0]["pipeline_tag"] == "text2text-generation"
    loaded = run_snippet(out, capsys)["model"]
    assert type(loaded).__name__ == "T5ForConditionalGeneration"


def test_a_hub_start_and_a_hub_dataset_are_named_in_the_header(tmp_path, tiny, monkeypatch):
    """Names only (nothing is downloaded): a Hub model id is base_model; a Hub dataset goes in datasets."""
    monkeypatch.chdir(tmp_path)  # no local folder of those names
    model, tokenizer = tiny
    config = make_config("dpo", tmp_path / "dpo", model="Qwen/Qwen2.5-0.5B-Instruct",
                         data={"dataset_name": "trl-lib/ultrafeedback_binarized"}, dpo={"beta": 0.2})
    out = run_folder(tmp_path / "dpo", "dpo", config, model, tokenizer)
    write_model_cards(out, "dpo", config)
    header, text = card_of(out)
    assert header["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert header["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert header["tags"] == ["rlhf", "dpo"] and header["library_name"] == "transformers"
    assert "| `dpo.beta` | 0.2 |" in text and "Hugging Face Hub model" in text

    # a local file is data, not a Hub dataset
    config = make_config("dpo", out, data={"dataset_name": "pairs.jsonl"})
    write_model_cards(out, "dpo", config)
    assert "datasets" not in card_of(out)[0]


def test_a_local_start_names_the_hub_model_at_the_root_of_its_chain(tmp_path, tiny, monkeypatch):
    """PPO from a local SFT folder that started from a Hub model: base_model is that Hub model (read from
    the SFT folder's own card); a local folder of unknown origin names none."""
    monkeypatch.chdir(tmp_path)
    model, tokenizer = tiny
    sft_config = make_config("sft", tmp_path / "sft", model="gpt2")
    sft = run_folder(tmp_path / "sft", "sft", sft_config, model, tokenizer)
    write_model_cards(sft, "sft", sft_config)
    ppo_config = make_config("ppo", tmp_path / "ppo", model=str(sft), ppo={"kl_coef": 0.07})
    ppo = run_folder(tmp_path / "ppo", "ppo", ppo_config, model, tokenizer)
    write_model_cards(ppo, "ppo", ppo_config)
    header, text = card_of(ppo)
    assert header["base_model"] == "gpt2" and header["tags"] == ["rlhf", "ppo"]
    assert "| `ppo.kl_coef` | 0.07 |" in text and "| `ppo.cliprange` | 0.2 |" in text
    assert "ppo.target_kl" not in text  # only with adaptive_kl
    assert "Reward: function `builtin:sentiment`" in text

    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    config = make_config("ppo", ppo, model=str(plain))
    write_model_cards(ppo, "ppo", config)
    assert "base_model" not in card_of(ppo)[0]


def test_a_lora_folder_says_peft_and_merged_says_transformers_and_both_load(tmp_path, tiny, capsys):
    """An adapter on a built-in base (peft cannot rebuild it; rlhf's loader can) with save_merged; the
    card replaces the blank template peft writes into the adapter folder."""
    _, tokenizer = tiny
    peft = PeftConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["c_attn"], save_merged=True)
    policy = apply_lora(load_model(TINY, task="causal-lm", seed=42), peft, task_type="CAUSAL_LM")
    with torch.no_grad():  # a trained adapter: not zero
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    expected = logits(policy)
    config = make_config("ppo", tmp_path / "out", peft=vars(peft))
    out = run_folder(tmp_path / "out", "ppo", config, policy, tokenizer, peft)
    assert "Model Card for Model ID" in (out / CARD).read_text()  # peft's blank template, before ours
    assert write_model_cards(out, "ppo", config) == [out / CARD, out / "merged" / CARD]

    header, text = card_of(out)
    assert header["library_name"] == "peft" and header["tags"] == ["rlhf", "ppo", "lora"]
    assert "base_model" not in header
    assert "LoRA: r 4, alpha 8, dropout 0.05, target modules `c_attn`" in text
    assert "Model Card for Model ID" not in text
    adapter = run_snippet(out, capsys)["model"]
    assert hasattr(adapter, "peft_config") and torch.allclose(logits(adapter), expected, atol=1e-5)

    header, text = card_of(out / "merged")
    assert header["library_name"] == "transformers" and header["tags"] == ["rlhf", "ppo", "lora", "merged"]
    assert "rlhf ppo ../config.yaml" in text
    merged = run_snippet(out / "merged", capsys)["model"]
    assert not hasattr(merged, "peft_config") and torch.allclose(logits(merged), expected, atol=1e-5)


def test_adapters_on_a_loadable_base_load_through_peft(tmp_path, tiny, capsys):
    """A base peft can load by name (a Hub id; here a local folder): AutoPeftModelForCausalLM for a
    policy, PeftModel over a 1-label classifier for a reward model (its score head trained in full)."""
    _, tokenizer = tiny
    peft = PeftConfig(use_peft=True, lora_r=4)
    base = tmp_path / "base"
    load_model(TINY, task="causal-lm", seed=3).save_pretrained(base)
    policy = apply_lora(load_model(str(base), task="causal-lm"), peft, task_type="CAUSAL_LM")
    config = make_config("sft", tmp_path / "sft", model=str(base), peft=vars(peft))
    out = run_folder(tmp_path / "sft", "sft", config, policy, tokenizer, peft)
    write_model_cards(out, "sft", config)
    assert "AutoPeftModelForCausalLM" in card_of(out)[1]
    loaded = run_snippet(out, capsys)["model"]
    assert torch.allclose(logits(loaded), logits(policy), atol=1e-5)

    scorer = tmp_path / "scorer"
    classifier = load_model(TINY, task="sequence-classification", seed=3)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    classifier.save_pretrained(scorer)
    reward = apply_lora(load_model(str(scorer), task="sequence-classification"), peft, task_type="SEQ_CLS",
                        modules_to_save=["score"])
    config = make_config("reward", tmp_path / "rm", model=str(scorer), peft=vars(peft))
    out = run_folder(tmp_path / "rm", "reward", config, reward, tokenizer, peft)
    (out / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "num_responses": 64, "split": "test"}))
    write_model_cards(out, "reward", config)
    header, text = card_of(out)
    assert header["pipeline_tag"] == "text-classification" and header["tags"] == ["rlhf", "reward-model", "lora"]
    assert "mean 0.5, std 2 over 64 `test` responses" in text
    namespace = run_snippet(out, capsys)
    assert isinstance(namespace["reward"], float)
    assert torch.allclose(logits(namespace["model"]), logits(reward), atol=1e-5)


def test_a_users_readme_is_left_alone_and_a_card_makes_no_run(tmp_path, tiny):
    model, tokenizer = tiny
    config = make_config("sft", tmp_path / "out")
    out = run_folder(tmp_path / "out", "sft", config, model, tokenizer)
    (out / CARD).write_text("# my notes\n")
    assert write_model_cards(out, "sft", config) == []
    assert (out / CARD).read_text() == "# my notes\n"

    # a card is no run and no rlhf output of its own: README.md of a user's folder never makes it deletable
    assert CARD not in OUTPUT_FILES
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / CARD).write_text(f"---\ntags: [rlhf]\n---\n{MARKER}\n")
    assert not holds_run(alone)
    prepare_output_dir(alone, resume=False, overwrite=False)  # not refused as "already holds a run"
    with pytest.raises(UserError, match="no rlhf run"):
        prepare_output_dir(alone, resume=False, overwrite=True)


def test_a_folder_without_a_model_gets_no_card(tmp_path):
    config = make_config("sft", tmp_path)
    write_run_files(tmp_path, "sft", config)
    assert write_model_cards(tmp_path, "sft", config) == [] and not (tmp_path / CARD).exists()
