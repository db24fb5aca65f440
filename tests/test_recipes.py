"""`rlhf run RECIPE`: the whole recipe is checked first, finished stages are skipped on a re-run, an
interrupted one resumes, `--from` reruns; and a reduced quickstart learns end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, SHORT_SFT

from rlhf_cli.config.loader import set_key
from rlhf_cli.errors import UserError
from rlhf_cli.recipe import load_recipe, plan
from rlhf_cli.recipe.runner import MARKER, SUMMARY, write_marker
from rlhf_cli.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

TINY_SFT = """\
stage: sft
model:
  model_name_or_path: builtin:tiny-gpt2
data:
  dataset_name: builtin:reviews
  dataset_format: text
  max_length: 64
  max_train_samples: 128
  max_eval_samples: 16
training:
  output_dir: outputs/not-used-by-a-recipe
  learning_rate: 5.0e-3
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 16
  max_steps: 4
  logging_steps: 2
  save_steps: 2
  save_total_limit: null
"""

TINY_PPO = """\
stage: ppo
model:
  model_name_or_path: builtin:tiny-gpt2
data:
  dataset_name: builtin:review-prompts
  max_prompt_length: 16
  max_train_samples: 64
  max_eval_samples: 16
generation:
  response_length: 8
reward:
  sources:
    - function: builtin:sentiment
      weight: 1.0
training:
  output_dir: outputs/not-used-by-a-recipe
  per_device_train_batch_size: 8
  logging_steps: 1
ppo:
  total_episodes: 16
  num_ppo_epochs: 1
"""

TINY_EVAL = """\
stage: eval
eval:
  models: [builtin:tiny-gpt2]
  num_prompts: 8
  batch_size: 8
  plots: false
  output_dir: outputs/not-used-by-a-recipe
data:
  dataset_name: builtin:review-prompts
  max_prompt_length: 16
generation:
  response_length: 8
reward:
  function: builtin:sentiment
"""

RECIPE = """\
output_dir: {out}
stages:
  - name: sft
    command: sft
    config: sft.yaml
  - name: ppo
    command: ppo
    config: ppo.yaml
    set:
      model.model_name_or_path: ${{sft}}
  - name: eval
    command: eval
    config: eval.yaml
    set:
      eval.models: ["${{sft}}", "${{ppo}}"]
      eval.baseline_model: ${{sft}}
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """A recipe folder with tiny stage configs; returns a function that writes recipe.yaml from text."""
    for name, text in (("sft.yaml", TINY_SFT), ("ppo.yaml", TINY_PPO), ("eval.yaml", TINY_EVAL)):
        (tmp_path / name).write_text(text)

    def write(text: str = RECIPE, **fmt) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(text.format(out=tmp_path / "out", **fmt))
        return path

    return write


# ---------------------------------------------------------------------------------------------
# Reading and checking a recipe (no training)
# ---------------------------------------------------------------------------------------------


def test_placeholders_resolve_to_earlier_stage_folders(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe())
    out = tmp_path / "out"
    assert [s.name for s in recipe.stages] == ["sft", "ppo", "eval"]
    sft, ppo, ev = recipe.stages
    assert sft.config.training.output_dir == str(out / "sft")  # the runner owns every stage's folder
    assert ppo.config.model.model_name_or_path == str(out / "sft")
    assert ev.config.eval.models == [str(out / "sft"), str(out / "ppo")]
    assert ev.config.eval.baseline_model == str(out / "sft")
    assert ev.config.eval.output_dir == str(out / "eval")


def test_output_dir_option_wins_and_placeholders_follow(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(), output_dir=tmp_path / "elsewhere")
    assert recipe.stages[1].config.model.model_name_or_path == str(tmp_path / "elsewhere" / "sft")


def test_set_forms_list_index_and_embedded_placeholder(tiny_recipe):
    text = RECIPE.replace(
        "      model.model_name_or_path: ${{sft}}\n",
        "      - model.model_name_or_path=${{sft}}/merged\n      - reward.sources[0].weight=2.5\n",
    ).replace("    set:\n      - model", "    set:\n      - model")
    recipe = load_recipe(tiny_recipe(text))
    ppo = recipe.stages[1].config
    assert ppo.model.model_name_or_path.endswith("sft/merged")
    assert ppo.reward.sources[0].weight == 2.5
    assert ppo.reward.sources[0].function == "builtin:sentiment"  # the rest of the item is kept


def test_whole_list_value_replaces_the_list(tiny_recipe):
    text = RECIPE + "      reward.function: null\n      reward.sources:\n        - function: builtin:sentiment\n        - model: ${{ppo}}\n          weight: 0.0\n"
    recipe = load_recipe(tiny_recipe(text))
    sources = recipe.stages[2].config.reward.sources
    assert [s.function for s in sources] == ["builtin:sentiment", None]
    assert sources[1].model.endswith("ppo")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("model.model_name_or_path: ${{sft}}", "model.model_name_or_path: ${{sfd}}"), "stage 'ppo'"),
        (("model.model_name_or_path: ${{sft}}", "model.model_name_or_path: ${{sfd}}"), "${sfd} names no earlier stage; did you mean sft?"),
        (("model.model_name_or_path: ${{sft}}", "model.model_name_or_path: ${{eval}}"), "runs later"),
        (("model.model_name_or_path: ${{sft}}", "model.model_name_or_path: ${{ppo}}"), "own folder"),
        (("model.model_name_or_path: ${{sft}}", "ppo.kl_coeff: 0.1"), "ppo.kl_coeff: unknown key; did you mean ppo.kl_coef?"),
        (("model.model_name_or_path: ${{sft}}", "training.output_dir: x"), "the recipe sets every stage's folder"),
        (("model.model_name_or_path: ${{sft}}", "reward.sources[3].weight: 1"), "has 1 item(s)"),
        (("model.model_name_or_path: ${{sft}}", "ppo.total_episodes: many"), "ppo.total_episodes: expected integer"),
        (("- name: eval", "- name: sft"), "'sft' is used twice"),
        (("command: ppo", "command: distill"), "'distill' is not a subcommand"),
        (("config: ppo.yaml", "config: missing.yaml"), "missing.yaml not found"),
        (("config: eval.yaml", "config: eval.yaml\n    sett: {{}}"), "stages[2].sett: unknown key; did you mean set?"),
        (("output_dir:", "stage: sft\noutput_dir:"), "unknown recipe key"),
    ],
)
def test_recipe_errors_name_the_stage_and_key(tiny_recipe, edit, message):
    with pytest.raises(UserError) as err:
        load_recipe(tiny_recipe(RECIPE.replace(*edit)))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_broken_later_stage_fails_before_anything_runs(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe(RECIPE + "      eval.num_prompts: -1\n")
    result = cli("run", str(recipe))
    assert result.returncode == 2, result.stderr
    assert "stage 'eval'" in result.stderr and "eval.num_prompts" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written: the first stage never started


def test_set_key_creates_mappings_but_not_list_items():
    raw = {"reward": {"sources": [{"model": "a"}]}}
    set_key(raw, "training.learning_rate", 1e-3)
    set_key(raw, "reward.sources[0].model", "b")
    assert raw == {"reward": {"sources": [{"model": "b"}]}, "training": {"learning_rate": 1e-3}}
    with pytest.raises(UserError, match="not a list"):
        set_key(raw, "training[0]", 1)


def test_every_repository_recipe_validates_with_every_stage():
    recipes = sorted((REPO / "recipes").rglob("recipe*.yaml"))
    assert {p.parent.name for p in recipes} >= {"quickstart", "imdb", "stack-llama", "detoxify"}
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.stages, path


# ---------------------------------------------------------------------------------------------
# The plan: skip / resume / run, decided from the folders (no training)
# ---------------------------------------------------------------------------------------------


def _fake_finished(stage, upstream):
    """A folder as a finished stage leaves it (config.yaml + marker)."""
    from rlhf_cli.training.output import write_run_files

    stage.output_dir.mkdir(parents=True, exist_ok=True)
    write_run_files(stage.output_dir, stage.command, stage.config)
    return write_marker(stage, upstream, 1.0, resumed=False)


def test_plan_skips_finished_resumes_interrupted_and_refuses_changed(tiny_recipe, tmp_path):
    path = tiny_recipe()
    recipe = load_recipe(path)
    sft, ppo, ev = recipe.stages
    assert [s.action for s in plan(recipe)] == ["run", "run", "run"]
    marker = _fake_finished(sft, {})
    (ppo.output_dir / "checkpoint-2").mkdir(parents=True)  # interrupted: a run, no marker
    assert [s.action for s in plan(recipe)] == ["skip", "resume", "run"]
    assert [s.action for s in plan(recipe, from_stage="ppo")] == ["skip", "run", "run"]
    assert [s.action for s in plan(recipe, from_stage="sft")] == ["run", "run", "run"]
    with pytest.raises(UserError, match="no such stage"):
        plan(recipe, from_stage="rm")
    # --until: the stages after it are not planned
    assert [s.action for s in plan(recipe, until="ppo")] == ["skip", "resume"]
    assert [s.action for s in plan(recipe, from_stage="ppo", until="ppo")] == ["skip", "run"]
    with pytest.raises(UserError, match="--until rm: the recipe has no such stage"):
        plan(recipe, until="rm")
    with pytest.raises(UserError, match="stage 'eval' comes after 'ppo'; nothing would run"):
        plan(recipe, from_stage="eval", until="ppo")

    # a finished stage whose config changed is not replaced unless asked (--from)
    changed = load_recipe(tiny_recipe(RECIPE.replace("config: sft.yaml", "config: sft.yaml\n    set: {{training.max_steps: 5}}")))
    with pytest.raises(UserError, match=r"another config \(training.max_steps: 4 -> 5\).*--from sft"):
        plan(changed)
    assert [s.action for s in plan(changed, from_stage="sft")] == ["run", "run", "run"]

    # a finished stage after one that runs again is stale
    shutil.rmtree(ppo.output_dir)
    _fake_finished(ppo, {"sft": marker["run_id"]})
    assert [s.action for s in plan(recipe)] == ["skip", "skip", "run"]
    (sft.output_dir / MARKER).unlink()
    with pytest.raises(UserError, match="stage 'sft' before it runs again.*--from sft"):
        plan(recipe)


# ---------------------------------------------------------------------------------------------
# Running: skip on re-run, resume an interrupted stage, --from
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_skips_finished_resumes_interrupted_and_reruns_from(cli, tiny_recipe, tmp_path):
    recipe, out = tiny_recipe(), tmp_path / "out"

    # 1. --until ppo: sft and ppo run, eval is left for later
    first = cli("run", str(recipe), "--until", "ppo")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[2/3] ppo: done" in first.stderr and "eval: rlhf eval" not in first.stderr, first.stderr[-3000:]
    assert "not run: after --until ppo" in first.stderr and "stopped after ppo (--until); not run: eval" in first.stderr
    assert (out / "ppo" / MARKER).is_file() and not (out / "eval").exists()

    # 2. the same command without --until goes on from there; each stage gets its folder and a completion marker
    rest = cli("run", str(recipe))
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert rest.stderr.count("skipped") == 2 and "[3/3] eval: rlhf eval" in rest.stderr
    for name in ("sft", "ppo", "eval"):
        assert (out / name / MARKER).is_file(), name
    assert (out / "eval" / "eval.json").is_file()
    evaluated = json.loads((out / "eval" / "eval.json").read_text())["settings"]["models"]
    assert evaluated == [str(out / "sft"), str(out / "ppo")]
    markers = {n: json.loads((out / n / MARKER).read_text()) for n in ("sft", "ppo", "eval")}
    assert markers["ppo"]["upstream"] == {"sft": markers["sft"]["run_id"]}

    # 3. a re-run skips every finished stage
    again = cli("run", str(recipe))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped") == 3 and "rlhf sft ->" not in again.stderr
    assert {n: json.loads((out / n / MARKER).read_text()) for n in markers} == markers

    # 4. sft "killed" after checkpoint-2 (no marker, no final model, ppo/eval never started): it resumes
    for path in (out / "sft").iterdir():
        if path.name not in ("config.yaml", "run_info.json", "metrics.jsonl", "checkpoint-2"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(out / "ppo")
    shutil.rmtree(out / "eval")
    full_metrics = read_metrics(tmp_path / "out" / "sft")
    resumed = cli("run", str(recipe))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert json.loads((out / "sft" / MARKER).read_text())["resumed"] is True
    assert [r["step"] for r in read_metrics(out / "sft")] == [r["step"] for r in full_metrics]
    assert (out / "eval" / MARKER).is_file()

    # 5. --from ppo: sft is kept, ppo and eval run again from scratch
    sft_marker = (out / "sft" / MARKER).read_text()
    rerun = cli("run", str(recipe), "--from", "ppo")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rlhf sft ->" not in rerun.stderr and "rlhf ppo ->" in rerun.stderr and "resumed from" not in rerun.stderr
    assert (out / "sft" / MARKER).read_text() == sft_marker
    runs = [json.loads(line) for line in (out / SUMMARY).read_text().splitlines()]
    assert [[s["action"] for s in r["stages"]] for r in runs] == [
        ["run", "run"], ["skip", "skip", "run"], ["skip", "skip", "skip"], ["resume", "run", "run"], ["skip", "run", "run"]]

    # 6. a changed finished stage: refused before anything runs, with the --from that replaces it
    changed = tiny_recipe(RECIPE + "      eval.num_prompts: 4\n")
    refused = cli("run", str(changed))
    assert refused.returncode == 2
    assert "eval.num_prompts: 8 -> 4" in refused.stderr and "--from eval" in refused.stderr
    # ... unless it comes after --until, which leaves it alone
    before = cli("run", str(changed), "--until", "ppo")
    assert before.returncode == 0 and before.stderr.count("skipped") == 2, before.stderr[-3000:]


def test_validate_and_dry_run_on_a_recipe(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    result = cli("validate", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "valid recipe" in result.stdout and "ppo (rlhf ppo)" in result.stdout
    dry = cli("run", str(recipe), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "not run yet" in dry.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_run_every_stage_data_parallel(tiny_recipe, tmp_path):
    """Under torchrun the process group lives across the stages; each stage gets a fresh Accelerator."""
    recipe = tiny_recipe()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rlhf_cli", "run", str(recipe)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("(2 processes, cpu") == 2  # sft and ppo, each on both processes
    assert result.stderr.count("all 2 processes hold identical weights") >= 2
    for name in ("sft", "ppo", "eval"):
        assert (tmp_path / "out" / name / MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# The main job itself, shortened: PPO against the learned reward model raises the GOLD score
# ---------------------------------------------------------------------------------------------

SHORTER_QUICKSTART = [  # after the SFT stage of the sft_model fixture (conftest.SHORT_SFT: 150 steps of 300)
    "reward.training.max_steps=100", "reward.training.warmup_steps=10", "reward.training.eval_steps=100",
    "reward.data.max_eval_samples=200",
    "ppo.training.learning_rate=2e-4", "ppo.ppo.total_episodes=1536", "ppo.training.eval_steps=24",
    "ppo.data.max_eval_samples=64",
    "eval.eval.num_prompts=64", "eval.eval.perplexity_max_samples=50",
]


@pytest.mark.slow(minutes=7)
def test_shortened_quickstart_raises_the_gold_score(cli, sft_model):
    """`rlhf run recipes/quickstart/recipe.yaml` with half the SFT steps (the sft_model fixture's run,
    `--until sft`, which this run goes on from), a third of the reward steps and 24 PPO iterations: the
    reward model is learned, not given, and PPO against it must raise the gold score (VADER, never trained
    on) on held-out prompts. (The full recipe's figures: recipes/quickstart/README.md.)"""
    out = sft_model.parent
    overrides = [a for o in SHORT_SFT + SHORTER_QUICKSTART for a in ("--set", o)]
    result = cli("run", str(QUICKSTART), "--output-dir", str(out), *overrides, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[1/4] sft: skipped" in result.stderr, result.stderr[-4000:]
    held_out = [r for r in read_metrics(out / "ppo") if "eval/builtin:sentiment" in r]
    before, after = held_out[0]["eval/builtin:sentiment"], held_out[-1]["eval/builtin:sentiment"]
    assert held_out[0]["step"] == 0 and after > before + 0.3, (before, after)
    report = json.loads((out / "eval" / "eval.json").read_text())["models"]
    assert report["ppo"]["rewards"]["builtin:sentiment"]["mean"] > report["sft"]["rewards"]["builtin:sentiment"]["mean"] + 0.3
    assert report["ppo"]["win_rate"] > 0.7, report["ppo"]
    for name in ("reward_distribution.png", "curves_ppo.png", "curves_sft.png", "curves_reward.png"):
        assert (out / "eval" / name).stat().st_size > 0


def test_the_resume_hint_of_an_interrupted_recipe_drops_from():
    """`rlhf run` resumes by itself; repeating --from would restart the interrupted stage instead."""
    from rlhf_cli.cli import resume_command

    assert resume_command(["rlhf", "run", "r.yaml", "--from", "ppo", "--set", "ppo.a=1"]) == "rlhf run r.yaml --set ppo.a=1"
