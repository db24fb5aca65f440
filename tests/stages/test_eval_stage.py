"""`rlhf eval` end to end through the real CLI, on built-in tiny models and a fake `rlhf` run folder."""

import json
import textwrap
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from rlhf_cli.builtin.models import build_builtin
from rlhf_cli.config.loader import build_stage
from rlhf_cli.errors import UserError
from rlhf_cli.evaluation.metrics import distinct_n
from rlhf_cli.evaluation.sampling import model_path
from rlhf_cli.models.value_head import ValueHead
from rlhf_cli.stages.eval import repeat_rows, run, short_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = [
    {"step": 1, "objective/scores": 0.1, "objective/kl": 0.0, "objective/entropy": 30.5, "loss/policy_avg": -0.02,
     "loss/value_avg": 0.7, "lr": 1e-5, "reward/builtin:sentiment": 0.1},
    {"step": 2, "objective/scores": 0.25, "objective/kl": "nan", "objective/entropy": 29.0, "loss/policy_avg": -0.01,
     "loss/value_avg": 0.4, "lr": 1e-5, "reward/builtin:sentiment": 0.25},
    {"step": 2, "eval/scores": 0.3},
    {"step": 3, "objective/scores": 0.4, "objective/kl": 0.8, "objective/entropy": 27.5, "loss/policy_avg": 0.0,
     "loss/value_avg": 0.2, "lr": 1e-5, "reward/builtin:sentiment": 0.4},
]


@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A folder shaped like a PPO output: the weights of builtin:tiny-gpt2?seed=1, a value head, metrics.jsonl."""
    folder = tmp_path / "ppo-run"
    model, tokenizer = build_builtin("builtin:tiny-gpt2?seed=1", "causal-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ValueHead(64).save(folder)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in METRICS))
    return folder


def eval_config(tmp_path: Path, models: list[str], reward: str = "function: builtin:sentiment") -> str:
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                             ["I loved this film.", "The plot was slow but the cast was great.", "Not for me."]))
    return textwrap.dedent(f"""\
        stage: eval
        eval:
          models: {json.dumps(models)}
          baseline_model: builtin:tiny-gpt2?seed=1
          reference_model: builtin:tiny-gpt2?seed=1
          num_prompts: 4
          samples_per_prompt: 2
          batch_size: 3
          perplexity_dataset: {texts}
          output_dir: {tmp_path / 'eval'}
        data:
          dataset_name: builtin:review-prompts
        generation:
          response_length: 8
        reward:
          sources:
            - {reward}
            - function: eval_test_rewards:word_count
              weight: 0.5
        """)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_end_to_end(cli, tmp_path, write_yaml, fake_run):
    (tmp_path / "eval_test_rewards.py").write_text(
        "def word_count(prompts, responses, **columns):\n    return [float(len(r.split())) for r in responses]\n"
    )
    config = write_yaml("eval.yaml", eval_config(tmp_path, [str(fake_run), "builtin:tiny-gpt2?seed=2"]))
    result = cli("eval", str(config), env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = tmp_path / "eval"

    # eval.json: the settings and every figure for each model; the baseline (not in models) comes first
    report = json.loads((out / "eval.json").read_text())
    assert list(report["models"]) == ["tiny-gpt2?seed=1", "ppo-run", "tiny-gpt2?seed=2"]
    assert report["settings"]["reward_sources"] == ["builtin:sentiment", "eval_test_rewards:word_count"]
    assert report["settings"]["win_rate_source"] == "builtin:sentiment"
    assert report["settings"]["perplexity_split"] == "train"  # a .jsonl file is one `train` split
    for figures in report["models"].values():
        assert set(figures) >= {"model", "rewards", "reward", "kl_to_reference", "win_rate", "response_length",
                                "stop_rate", "distinct_1", "distinct_2", "perplexity", "num_samples"}
        assert figures["num_samples"] == 8 and figures["perplexity"] > 1.0

    # samples.jsonl: one row per (model, prompt, sample), with each reward; the figures follow from the rows
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 3 * 8
    by_model = {label: [r for r in rows if r["model"] == label] for label in report["models"]}
    baseline = by_model["tiny-gpt2?seed=1"]
    for label, model_rows in by_model.items():
        figures = report["models"][label]
        assert [r["prompt_index"] for r in model_rows] == repeat_rows([0, 1, 2, 3], 2)
        for source in ("builtin:sentiment", "eval_test_rewards:word_count"):
            values = [r["rewards"][source] for r in model_rows]
            assert figures["rewards"][source]["mean"] == pytest.approx(sum(values) / len(values))
        assert all(r["reward"] == pytest.approx(r["rewards"]["builtin:sentiment"] + 0.5 * r["rewards"]["eval_test_rewards:word_count"])
                   for r in model_rows)
        wins = [1.0 if r["rewards"]["builtin:sentiment"] > b["rewards"]["builtin:sentiment"] else
                0.5 if r["rewards"]["builtin:sentiment"] == b["rewards"]["builtin:sentiment"] else 0.0
                for r, b in zip(model_rows, baseline, strict=True)]
        assert figures["win_rate"] == pytest.approx(sum(wins) / len(wins))
        assert figures["distinct_2"] == pytest.approx(distinct_n([r["response"] for r in model_rows], 2))
        assert figures["kl_to_reference"] == pytest.approx(sum(r["kl"] for r in model_rows) / len(model_rows))

    # the same seeds for every model: the saved copy of the baseline's weights samples exactly what the
    # baseline samples, so it ties every pair and has no KL to it
    assert [r["response"] for r in by_model["ppo-run"]] == [r["response"] for r in baseline]
    assert report["models"]["ppo-run"]["win_rate"] == 0.5 and report["models"]["ppo-run"]["kl_to_reference"] == 0.0
    assert report["models"]["tiny-gpt2?seed=2"]["kl_to_reference"] != 0.0

    # plots: valid PNGs, and the data behind the curves is the run folder's metrics.jsonl
    for name in ("reward_distribution.png", "curves_ppo-run.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(out / name).ndim == 3
    drawn = json.loads((out / "plots.json").read_text())
    assert set(drawn) == {"reward_distribution.png", "curves_ppo-run.png"}
    series = drawn["curves_ppo-run.png"]["series"]
    assert series["objective/scores"] == {"step": [1, 2, 3], "value": [0.1, 0.25, 0.4]}
    assert series["objective/kl"] == {"step": [1, 3], "value": [0.0, 0.8]}  # the "nan" row is left out
    assert series["eval/scores"] == {"step": [2], "value": [0.3]}
    assert set(series) == {"objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg",
                           "loss/value_avg", "reward/builtin:sentiment", "eval/scores"}
    panel = drawn["reward_distribution.png"]["panels"]["builtin:sentiment"]
    assert panel["values"]["ppo-run"] == [r["rewards"]["builtin:sentiment"] for r in by_model["ppo-run"]]
    assert all(sum(counts) == 8 for counts in panel["counts"].values())

    # the table is printed on stdout
    assert "win rate" in result.stdout and "distinct-2" in result.stdout


def test_missing_model_folder_exits_2(cli, tmp_path, write_yaml):
    missing = tmp_path / "no-such-run"
    config = write_yaml("eval.yaml", eval_config(tmp_path, [str(missing)]))
    result = cli("eval", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: eval.models[0]: ") and str(missing) in error
    # nothing that marks a run was written, so the fixed config runs without --overwrite
    assert not (tmp_path / "eval" / "config.yaml").exists()


def test_user_errors_reward_win_rate_source_reference_vocabulary_earlier_run(tmp_path):
    raw = yaml.safe_load(eval_config(tmp_path, ["builtin:tiny-gpt2?seed=1"], reward="function: no_such_module:f"))
    with pytest.raises(UserError, match="reward.sources\\[0\\].function: cannot import module 'no_such_module'"):
        run(build_stage("eval", raw))
    raw["reward"] = {"function": "builtin:sentiment"}
    raw["eval"]["win_rate_source"] = 1
    with pytest.raises(UserError, match="eval.win_rate_source: 1 is not a reward source; the reward has 1 source "):
        build_stage("eval", raw)
    raw["eval"]["win_rate_source"] = 0
    raw["eval"]["reference_model"] = "builtin:minilm"  # another tokenizer: token log-probs do not compare
    with pytest.raises(UserError, match="eval.reference_model: 'builtin:minilm' has another vocabulary"):
        run(build_stage("eval", raw))
    (tmp_path / "eval" / "eval.json").write_text("{}")  # an earlier evaluation lives there
    with pytest.raises(UserError, match="already holds a run.*--overwrite"):
        run(build_stage("eval", raw))


def test_short_labels_are_unique():
    assert short_labels(["builtin:tiny-gpt2", "outputs/a/final", "outputs/b/final", "runs/ppo/"]) == {
        "builtin:tiny-gpt2": "tiny-gpt2", "outputs/a/final": "outputs/a/final", "outputs/b/final": "outputs/b/final",
        "runs/ppo/": "ppo",
    }


def test_a_checkpoint_folder_loads_its_model_subfolder(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint-3"
    (checkpoint / "model").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert model_path(str(checkpoint)) == str(checkpoint / "model")
    assert model_path(str(tmp_path / "run")) == str(tmp_path / "run")
    assert model_path("builtin:tiny-gpt2") == "builtin:tiny-gpt2"
