"""`rlhf reward`: the Bradley–Terry loss by hand, one forward per pair batch, padding-free scores,
save/reload (full and LoRA), the CLI end to end, and learning on the built-in preferences."""

import json
import math
import time

import pytest
import torch
from huggingface_hub import metadata_load
from transformers import AutoModelForSequenceClassification

from rlhf_cli.config.schema import RewardModelConfig
from rlhf_cli.data.preferences import PairCollator
from rlhf_cli.models.adapters import save_final_model
from rlhf_cli.models.loading import load_model, load_tokenizer
from rlhf_cli.stages.reward import RewardObjective, head_module_names, load_reward_model, pair_rewards
from rlhf_cli.training.bradley_terry import bradley_terry_loss
from rlhf_cli.training.metrics import read_metrics

TEXTS = ["The film is a joy.", "Dull.", "I watched it twice and loved every minute of it.", "Not great, not bad."]


def neg_log_sigmoid(x: float) -> float:
    return math.log(1 + math.exp(-x))


# --- the loss ------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, -1.0])
    # -log sigmoid(d) = log(1 + e^-d) with d = r_c - r_r = 1, -1, 3
    plain = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)), math.log(1 + math.exp(-3))]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(plain, abs=1e-6)
    # margin m: d - m = 1 - 0.5, -1 - 0, 3 - 2
    with_margin = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1)), math.log(1 + math.exp(-1))]
    margin = torch.tensor([0.5, 0.0, 2.0])
    assert bradley_terry_loss(chosen, rejected, margin).tolist() == pytest.approx(with_margin, abs=1e-6)
    # centring 0.1 * (r_c + r_r)^2: sums 1, 0, 1
    centred = [with_margin[0] + 0.1, with_margin[1], with_margin[2] + 0.1]
    assert bradley_terry_loss(chosen, rejected, margin, 0.1).tolist() == pytest.approx(centred, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, None, 0.1).tolist() == pytest.approx(
        [plain[0] + 0.1, plain[1], plain[2] + 0.1], abs=1e-6
    )


class LookupModel(torch.nn.Module):
    """A 'model' whose score of a row is its first token id / 10: rewards known exactly."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return type("Out", (), {"logits": input_ids[:, :1].float() / 10})()


def test_objective_sums_and_metrics_by_hand():
    rows = [{"chosen_input_ids": [10, 3], "rejected_input_ids": [0]}, {"chosen_input_ids": [-20], "rejected_input_ids": [5, 5]}]
    batch = PairCollator(pad_token_id=0)(rows)  # rewards: chosen 1.0, -2.0; rejected 0.0, 0.5
    objective = RewardObjective(center_rewards_coefficient=None)
    assert objective.num_items(batch) == 2
    loss_sum, sums = objective.loss(LookupModel(), batch)
    assert loss_sum.item() == pytest.approx(neg_log_sigmoid(1.0) + neg_log_sigmoid(-2.5), abs=1e-6)
    row = objective.finalize(sums)
    assert row == pytest.approx({
        "loss": loss_sum.item() / 2, "accuracy": 0.5, "margin": (1.0 - 2.5) / 2,
        "reward_mean": (1.0 - 2.0 + 0.0 + 0.5) / 4, "reward_min": -2.0, "reward_max": 1.0,
    })
    assert sums["num_pairs"] == 2 and sums["num_tokens"] == 6


# --- the model: one forward per batch, scores independent of padding ------------------------------


@pytest.fixture(scope="module")
def gpt2():
    tokenizer = load_tokenizer("builtin:tiny-gpt2")
    model = load_reward_model(RewardModelConfig(), tokenizer).eval()
    return model, tokenizer


def encode(tokenizer, texts):
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def lone_scores(model, sequences):
    """Each sequence scored alone (a batch of one, no padding at all)."""
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([s])).logits[:, 0] for s in sequences])


def test_chosen_and_rejected_go_through_one_forward(gpt2):
    model, tokenizer = gpt2
    seqs = encode(tokenizer, TEXTS)
    batch = PairCollator(tokenizer.pad_token_id)([
        {"chosen_input_ids": seqs[0], "rejected_input_ids": seqs[1]},
        {"chosen_input_ids": seqs[2], "rejected_input_ids": seqs[3]},
    ])
    calls = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                       with_kwargs=True)
    try:
        chosen, rejected = pair_rewards(model, batch)
    finally:
        hook.remove()
    assert calls == [(4, batch["input_ids"].shape[1])]  # one call, 2B rows
    expected = lone_scores(model, seqs)
    assert torch.allclose(chosen, expected[[0, 2]], atol=1e-5)
    assert torch.allclose(rejected, expected[[1, 3]], atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_a_causal_score(gpt2, side):
    model, tokenizer = gpt2
    seqs = encode(tokenizer, TEXTS)
    rows = [{"chosen_input_ids": seqs[0], "rejected_input_ids": seqs[2]},
            {"chosen_input_ids": seqs[1], "rejected_input_ids": seqs[3]}]
    batch = PairCollator(tokenizer.pad_token_id, padding_side=side, pad_to_multiple_of=32)(rows)
    with torch.no_grad():
        chosen, rejected = pair_rewards(model, batch)
    # the score is read at each row's last real token, whatever the padding around it
    assert torch.allclose(torch.cat([chosen, rejected]), lone_scores(model, [seqs[i] for i in (0, 1, 2, 3)]), atol=1e-5)


def test_padding_does_not_change_an_encoder_score():
    tokenizer = load_tokenizer("builtin:minilm")
    config = RewardModelConfig()
    config.model.model_name_or_path = "builtin:minilm"
    model = load_reward_model(config, tokenizer).eval()
    seqs = encode(tokenizer, TEXTS)
    batch = PairCollator(tokenizer.pad_token_id)([{"chosen_input_ids": seqs[0], "rejected_input_ids": seqs[2]}])
    with torch.no_grad():
        chosen, rejected = pair_rewards(model, batch)  # BERT pools [CLS]: right padding leaves it in place
    assert torch.allclose(torch.cat([chosen, rejected]), lone_scores(model, [seqs[0], seqs[2]]), atol=1e-5)


def test_score_head_found_per_architecture(gpt2):
    assert head_module_names(gpt2[0]) == ["score"]
    assert head_module_names(load_model("builtin:minilm", task="sequence-classification")) == ["classifier"]


# --- save and reload ------------------------------------------------------------------------------


def train_a_little(model, tokenizer, steps=3):
    """A few real updates, so the reloaded weights (LoRA, score head) are not their initial values."""
    seqs = encode(tokenizer, TEXTS)
    batch = PairCollator(tokenizer.pad_token_id)([{"chosen_input_ids": seqs[0], "rejected_input_ids": seqs[1]},
                                                 {"chosen_input_ids": seqs[2], "rejected_input_ids": seqs[3]}])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        loss, _ = RewardObjective(0.01).loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), batch


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_save_and_reload_give_the_same_scores(tmp_path, use_peft):
    config = RewardModelConfig()
    config.peft.use_peft = use_peft
    tokenizer = load_tokenizer("builtin:tiny-gpt2")
    model = load_reward_model(config, tokenizer)
    head_before = model.get_submodule("score" if not use_peft else "base_model.model.score").weight.detach().clone()
    model, batch = train_a_little(model, tokenizer)
    with torch.no_grad():
        before = torch.cat(pair_rewards(model, batch))
    if use_peft:  # the head trains in full beside the LoRA weights, and is saved with the adapter
        head = model.base_model.model.score.modules_to_save["default"].weight
        assert head.requires_grad and not torch.equal(head, head_before)
    save_final_model(model, tokenizer, tmp_path, config.peft)

    reloaded = load_model(str(tmp_path), task="sequence-classification").eval()
    if not use_peft:  # a plain transformers folder
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.allclose(torch.cat(pair_rewards(plain, batch)), before, atol=1e-6)
    assert hasattr(reloaded, "peft_config") == use_peft
    with torch.no_grad():
        assert torch.allclose(torch.cat(pair_rewards(reloaded, batch)), before, atol=1e-6)


def test_starting_from_a_causal_lm_adapter_merges_it(tmp_path):
    """The LoRA adapter of an SFT run is merged into its base; its backbone gets a new scalar head."""
    from rlhf_cli.config.sections import PeftConfig
    from rlhf_cli.models.adapters import apply_lora

    tokenizer = load_tokenizer("builtin:tiny-gpt2")
    lm = apply_lora(load_model("builtin:tiny-gpt2", task="causal-lm"), PeftConfig(use_peft=True), "CAUSAL_LM")
    for name, param in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # lora_B starts at 0: make the adapter change something
    save_final_model(lm, tokenizer, tmp_path, PeftConfig(use_peft=True))
    merged = lm.merge_and_unload()
    config = RewardModelConfig()
    config.model.model_name_or_path = str(tmp_path)
    model = load_reward_model(config, tokenizer)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, merged.transformer.h[0].attn.c_attn.weight)


# --- the command ----------------------------------------------------------------------------------


TINY_REWARD = """\
stage: reward
model:
  model_name_or_path: builtin:tiny-gpt2
data:
  dataset_name: builtin:review-preferences
  max_train_samples: 256
  max_eval_samples: 32
  max_length: 64
training:
  output_dir: {out}
  max_steps: 4
  per_device_train_batch_size: 8
  logging_steps: 2
  eval_steps: 2
  save_steps: 2
  learning_rate: 1.0e-3
"""
TRAIN_METRICS = {"loss", "accuracy", "margin", "reward_mean", "reward_min", "reward_max", "learning_rate", "epoch",
                 "pairs_per_s", "num_pairs"}
EVAL_METRICS = {"eval_loss", "eval_accuracy", "eval_margin", "eval_reward_mean", "eval_reward_std"}


@pytest.mark.slow
def test_cli_end_to_end(cli, tmp_path, write_yaml):
    out = tmp_path / "rm"
    # the pairs tokenized by two processes (data.dataset_num_proc), as a large dataset would be
    result = cli("reward", str(write_yaml("reward.yaml", TINY_REWARD.format(out=out))), "--set", "data.dataset_num_proc=2")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "config.json", "model.safetensors", "tokenizer.json",
                 "reward_stats.json", "checkpoint-4"):
        assert (out / name).exists(), name
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4] and [r["step"] for r in eval_rows] == [2, 4]
    assert not TRAIN_METRICS - set(train_rows[-1]) and not EVAL_METRICS - set(eval_rows[-1])
    assert train_rows[-1]["num_pairs"] == 32

    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(eval_rows[-1]["eval_reward_mean"])
    assert stats["std"] == pytest.approx(eval_rows[-1]["eval_reward_std"]) and stats["std"] > 0
    assert stats["num_responses"] == 64 and stats["split"] == "test"

    # the folder is a plain transformers reward model that scores as the run did
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == load_tokenizer(str(out)).pad_token_id
    card = metadata_load(out / "README.md")  # the model card's header, as the Hub reads it
    assert card["tags"] == ["rlhf", "reward-model"] and card["pipeline_tag"] == "text-classification"


LOCAL_LORA = """\
stage: reward
model:
  model_name_or_path: builtin:tiny-gpt2
peft:
  use_peft: true
data:
  dataset_name: {data}
  prompt_column: null
  margin_column: gap
  dataset_test_split: null
training:
  output_dir: {out}
  max_steps: 3
  per_device_train_batch_size: 8
  logging_steps: 1
  save_steps: 100
"""


def write_pairs(path, n=24, chosen="chosen", rejected="rejected"):
    words = ["great", "lovely", "superb", "moving"], ["awful", "dull", "boring", "weak"]
    rows = [{chosen: f"Film {i} was {words[0][i % 4]}.", rejected: f"Film {i} was {words[1][i % 4]}.", "gap": i % 2}
            for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_cli_lora_on_a_local_file_without_held_out_split(cli, tmp_path, write_yaml):
    out = tmp_path / "rm"
    data = write_pairs(tmp_path / "pairs.jsonl")
    result = cli("reward", str(write_yaml("lora.yaml", LOCAL_LORA.format(data=data, out=out))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["split"] == "train" and stats["num_responses"] == 48  # no held-out split: training pairs
    assert "no held-out split" in result.stderr
    model = load_model(str(out), task="sequence-classification")
    assert hasattr(model, "peft_config")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_cli_missing_column_is_a_user_error(cli, tmp_path, write_yaml):
    data = write_pairs(tmp_path / "pairs.jsonl", chosen="good", rejected="bad")
    result = cli("reward", str(write_yaml("bad.yaml", LOCAL_LORA.format(data=data, out=tmp_path / "rm"))))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.chosen_column: column 'chosen' not found" in result.stderr
    assert "model: class" not in result.stderr  # the data is read before the model is loaded


LEARN = """\
stage: reward
model:
  model_name_or_path: builtin:minilm
data:
  dataset_name: builtin:review-preferences
  max_eval_samples: 200
  max_length: 128
training:
  output_dir: {out}
  max_steps: 50
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 50
  learning_rate: 1.5e-4
  warmup_steps: 5
  logging_steps: 10
  save_steps: 1000
"""


@pytest.mark.slow(minutes=2)
def test_learns_the_built_in_preferences(cli, tmp_path, write_yaml):
    """Pretrained MiniLM + a scalar head: >= 0.9 held-out accuracy after 400 pairs (50 steps x 8).

    The work is bounded by the step count; the wall-clock limit (30 min) leaves room for a 2-core
    machine shared with other jobs (measured: 132 s at load average ~6, 741 s at ~12)."""
    out = tmp_path / "rm"
    start = time.perf_counter()
    result = cli("reward", str(write_yaml("learn.yaml", LEARN.format(out=out))), timeout=1800)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in read_metrics(out) if "eval_accuracy" in r][-1]
    print(f"held-out accuracy {final['eval_accuracy']:.3f} after {elapsed:.0f} s")
    assert final["eval_accuracy"] >= 0.9, final
