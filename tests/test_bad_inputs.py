"""The bad-inputs catalogue: malformed configs and malformed datasets.

Every case must exit with status 2 and ONE `error: ...` line on stderr that names the key, file or row
at fault, and never a traceback. The cases run in-process (`rlhf_cli.cli.main()` with `sys.argv`
patched) because a subprocess per case would take minutes; a few real subprocesses at the end show
that the installed CLI behaves the same.
"""

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli, run_in_process

from rlhf_cli import cli as cli_module

TINY = "builtin:tiny-gpt2"



def assert_user_error(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, f"exit {code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


# --- malformed configs ---------------------------------------------------------------------------

SFT_BASE = {
    "stage": "sft",
    "model": {"model_name_or_path": TINY},
    "data": {"dataset_name": "builtin:reviews", "dataset_format": "text", "max_length": 32},
    "training": {"output_dir": "OUT", "max_steps": 1, "per_device_train_batch_size": 2},
}
PPO_BASE = {
    "stage": "ppo",
    "model": {"model_name_or_path": TINY},
    "data": {"dataset_name": "builtin:review-prompts"},
    "reward": {"function": "builtin:sentiment"},
    "training": {"output_dir": "OUT", "per_device_train_batch_size": 2},
    "ppo": {"total_episodes": 2},
}


def with_value(base: dict, dotted: str, value) -> dict:
    config = json.loads(json.dumps(base))
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return config


def yaml_text(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


# (id, stage command, config text or dict, extra args, substrings of the message)
CONFIG_CASES = [
    ("yaml-syntax", "sft", "model:\n  model_name_or_path: [unclosed\n", [], ["invalid YAML", "line"]),
    ("yaml-tab-indent", "sft", "model:\n\tmodel_name_or_path: x\n", [], ["invalid YAML"]),
    ("top-level-list", "sft", "- a\n- b\n", [], ["must be a mapping"]),
    ("top-level-scalar", "sft", "just words\n", [], ["must be a mapping"]),
    ("python-object-tag", "sft", "model: !!python/object/apply:os.system ['echo owned']\n", [], ["invalid YAML", "no `!!` tags"]),
    ("unknown-section", "sft", with_value(SFT_BASE, "trainer.max_steps", 1), [], ["trainer"]),
    ("typo-key", "sft", with_value(SFT_BASE, "training.learning_rat", 1e-4), [], ["training.learning_rat", "learning_rate"]),
    ("wrong-type-float", "sft", with_value(SFT_BASE, "training.learning_rate", "fast"), [], ["training.learning_rate"]),
    ("negative-lr", "sft", with_value(SFT_BASE, "training.learning_rate", -1.0), [], ["training.learning_rate"]),
    ("zero-batch", "sft", with_value(SFT_BASE, "training.per_device_train_batch_size", 0), [], ["per_device_train_batch_size"]),
    ("float-batch", "sft", with_value(SFT_BASE, "training.per_device_train_batch_size", 2.5), [], ["per_device_train_batch_size"]),
    ("max-steps-below-minus-one", "sft", with_value(SFT_BASE, "training.max_steps", -5), [], ["training.max_steps"]),
    ("bad-scheduler", "sft", with_value(SFT_BASE, "training.lr_scheduler_type", "zigzag"), [], ["lr_scheduler_type", "choose"]),
    ("bad-dtype", "sft", with_value(SFT_BASE, "model.dtype", "float13"), [], ["model.dtype"]),
    ("lora-r-zero", "sft", with_value(with_value(SFT_BASE, "peft.use_peft", True), "peft.lora_r", 0), [], ["peft.lora_r"]),
    ("lora-dropout-2", "sft", with_value(SFT_BASE, "peft.lora_dropout", 2.0), [], ["peft.lora_dropout"]),
    ("bad-format", "sft", with_value(SFT_BASE, "data.dataset_format", "poetry"), [], ["data.dataset_format"]),
    ("logging-steps-zero", "sft", with_value(SFT_BASE, "training.logging_steps", 0), [], ["training.logging_steps"]),
    ("negative-seed", "sft", with_value(SFT_BASE, "training.seed", -1), [], ["training.seed"]),
    ("warmup-ratio", "sft", with_value(SFT_BASE, "training.warmup_ratio", 1.5), [], ["training.warmup_ratio"]),
    ("epochs-zero", "sft", with_value(SFT_BASE, "training.num_train_epochs", 0), [], ["training.num_train_epochs"]),
    ("max-length-1", "sft", with_value(SFT_BASE, "data.max_length", 1), [], ["data.max_length"]),
    ("section-not-mapping", "sft", with_value(SFT_BASE, "training", "fast please"), [], ["training"]),
    ("bool-as-words", "sft", with_value(SFT_BASE, "data.packing", "yes please"), [], ["data.packing"]),
    ("bad-stage-key", "sft", with_value(SFT_BASE, "stage", "dpo"), [], ["stage"]),
    ("both-precisions", "sft", with_value(with_value(SFT_BASE, "training.bf16", True), "training.fp16", True), [], ["bf16", "fp16"]),
    ("ppo-gamma", "ppo", with_value(PPO_BASE, "ppo.gamma", 2.0), [], ["ppo.gamma"]),
    ("ppo-lam", "ppo", with_value(PPO_BASE, "ppo.lam", -0.1), [], ["ppo.lam"]),
    ("ppo-kl-estimator", "ppo", with_value(PPO_BASE, "ppo.kl_estimator", "k9"), [], ["ppo.kl_estimator"]),
    ("ppo-cliprange", "ppo", with_value(PPO_BASE, "ppo.cliprange", 0), [], ["ppo.cliprange"]),
    ("ppo-typo", "ppo", with_value(PPO_BASE, "ppo.kl_coeff", 0.1), [], ["ppo.kl_coeff", "kl_coef"]),
    ("top-p-zero", "ppo", with_value(PPO_BASE, "generation.top_p", 0.0), [], ["generation.top_p"]),
    ("no-reward", "ppo", {k: v for k, v in PPO_BASE.items() if k != "reward"}, [], ["reward"]),
    ("reward-function-no-colon", "ppo", with_value(PPO_BASE, "reward.function", "mymodule"), [], ["reward.function"]),
    ("long-prompts-choice", "ppo", with_value(PPO_BASE, "data.long_prompts", "shorten"), [], ["data.long_prompts"]),
    ("set-unknown-key", "sft", SFT_BASE, ["--set", "training.lr=1e-3"], ["training.lr"]),
    ("set-without-equals", "sft", SFT_BASE, ["--set", "training.learning_rate"], ["--set"]),
    ("set-wrong-type", "sft", SFT_BASE, ["--set", "training.max_steps=many"], ["training.max_steps"]),
    ("extends-missing", "sft", {"extends": "nowhere.yaml", **SFT_BASE}, [], ["extends", "nowhere.yaml"]),
    ("empty-file", "sft", "", [], ["config.yaml", "the config file is empty", "stage: <stage>"]),
    ("comments-only", "sft", "# model: builtin:tiny-gpt2\n", [], ["config.yaml", "the config file is empty"]),
    ("duplicate-key", "sft", "training:\n  max_steps: 1\n  seed: 1\n  max_steps: 5\n", [],
     ["config.yaml (line 4", "'max_steps' appears twice", "line 2"]),
    ("binary-file", "sft", "\udcff\udcfe garbage", [], ["config.yaml", "not a text file"]),
    ("allow-change-without-resume", "sft", SFT_BASE, ["--allow-config-change"], ["--allow-config-change", "--resume"]),
    ("empty-output-dir", "sft", SFT_BASE, ["--output-dir", ""], ["training.output_dir: empty"]),
    ("reward-long-pairs", "reward", {
        "stage": "reward", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": "builtin:review-preferences", "long_pairs": "squash"},
        "training": {"output_dir": "OUT"},
    }, [], ["data.long_pairs"]),
    ("eval-no-models", "eval", {"stage": "eval", "eval": {"models": [], "output_dir": "OUT"},
                                 "reward": {"function": "builtin:sentiment"},
                                 "data": {"dataset_name": "builtin:review-prompts"}}, [], ["eval.models"]),
]


@pytest.mark.parametrize(("stage", "config", "args", "needles"), [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_malformed_config_exits_2(monkeypatch, capsys, tmp_path, stage, config, args, needles):
    path = tmp_path / "config.yaml"
    text = config if isinstance(config, str) else yaml_text(config)
    path.write_text(text.replace("OUT", str(tmp_path / "out")), errors="surrogateescape")
    code, stderr = run_in_process(monkeypatch, capsys, stage, str(path), *args)
    assert_user_error(code, stderr, *needles)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_missing_and_directory_config(monkeypatch, capsys, tmp_path):
    code, stderr = run_in_process(monkeypatch, capsys, "sft", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in stderr and "Traceback" not in stderr
    code, stderr = run_in_process(monkeypatch, capsys, "sft", str(tmp_path))
    assert code == 2 and "Traceback" not in stderr


def test_catalogue_is_big_enough():
    assert len(CONFIG_CASES) >= 30
    assert len(DATA_CASES) >= 15


# --- malformed datasets --------------------------------------------------------------------------


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD_TEXT = [{"text": f"a fine film number {i} with a good cast"} for i in range(8)]
GOOD_PAIRS = [{"chosen": f"great film {i}", "rejected": f"awful film {i}"} for i in range(8)]
GOOD_PROMPTS = [{"prompt": f"The film {i} was"} for i in range(8)]


def sft_data_config(data_file: str, **data) -> dict:
    return {
        "stage": "sft", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": data_file, "dataset_test_split": None, "max_length": 32, **data},
        "training": {"output_dir": "OUT", "max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 100},
    }


def reward_data_config(data_file: str, **data) -> dict:
    return {
        "stage": "reward", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": data_file, "dataset_test_split": None, "max_length": 32, **data},
        "training": {"output_dir": "OUT", "max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 100},
    }


def ppo_data_config(data_file: str, reward: str = "builtin:sentiment", **data) -> dict:
    return {
        "stage": "ppo", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": data_file, "dataset_test_split": None, **data},
        "generation": {"response_length": 4},
        "reward": {"function": reward},
        "training": {"output_dir": "OUT", "per_device_train_batch_size": 2, "save_steps": 100},
        "ppo": {"total_episodes": 2, "num_ppo_epochs": 1},
    }


REWARD_MODULE = textwrap.dedent("""\
    def raises(prompts, responses, **columns):
        raise RuntimeError("the judge is asleep")
    def short(prompts, responses, **columns):
        return [0.0]
    def nan(prompts, responses, **columns):
        return [float("nan")] * len(responses)
    def words(prompts, responses, **columns):
        return ["good"] * len(responses)
    """)

LONG_PROMPT = " ".join(["the film was long and slow"] * 60)

# (id, stage, file name, file content, config builder kwargs, substrings of the message)
DATA_CASES = [
    ("empty-file", "sft", "d.jsonl", "", {}, ["d.jsonl", "empty"]),
    ("invalid-json-line", "sft", "d.jsonl", jsonl(GOOD_TEXT) + "{not json\n", {}, ["d.jsonl"]),
    ("unsupported-suffix", "sft", "d.txt", "hello\n", {}, ["d.txt", "unsupported"]),
    ("missing-file", "sft", None, None, {}, ["data.dataset_name", "not found"]),
    ("missing-text-column", "sft", "d.jsonl", jsonl([{"body": "x"}] * 8), {"dataset_format": "text"}, ["text"]),
    ("non-string-text", "sft", "d.jsonl", jsonl([{"text": 5}] * 8), {"dataset_format": "text"}, ["row"]),
    ("empty-text", "sft", "d.jsonl", jsonl(GOOD_TEXT[:3] + [{"text": ""}] + GOOD_TEXT[3:]), {"dataset_format": "text"}, ["row 3"]),
    ("null-completion", "sft", "d.jsonl", jsonl([{"prompt": "a", "completion": None}] * 8),
     {"dataset_format": "prompt-completion"}, ["row"]),
    ("messages-not-list", "sft", "d.jsonl", jsonl([{"messages": "hello"}] * 8), {"dataset_format": "messages"}, ["row"]),
    ("messages-bad-role", "sft", "d.jsonl",
     jsonl([{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 8),
     {"dataset_format": "messages"}, ["row"]),
    ("no-such-split", "sft", "d.jsonl", jsonl(GOOD_TEXT), {"dataset_train_split": "training"}, ["data.dataset_train_split"]),
    ("pairs-missing-rejected", "reward", "p.jsonl", jsonl([{"chosen": "a"}] * 8), {}, ["rejected"]),
    ("pairs-identical", "reward", "p.jsonl", jsonl(GOOD_PAIRS[:3] + [{"chosen": "same", "rejected": "same"}] + GOOD_PAIRS[3:]),
     {}, ["data row 3", "same text"]),
    # sides equal only after the cut to max_length: dropped and counted; when that leaves nothing, exit 2
    ("pairs-identical-after-cut", "reward", "p.jsonl",
     jsonl([{"chosen": f"same start {i} good", "rejected": f"same start {i} bad"} for i in range(8)]),
     {"max_length": 2}, ["none of the 8 pairs", "identical"]),
    ("pairs-non-string", "reward", "p.jsonl", jsonl([{"chosen": 1, "rejected": 2}] * 8), {}, ["row 0"]),
    ("pairs-empty-chosen", "reward", "p.jsonl", jsonl([{"chosen": "", "rejected": "bad"}] + GOOD_PAIRS), {}, ["row 0"]),
    ("pairs-nan-margin", "reward", "p.jsonl",
     jsonl([{**p, "margin": 1.0} for p in GOOD_PAIRS] + [{"chosen": "x", "rejected": "y", "margin": float("nan")}]),
     {"margin_column": "margin"}, ["margin"]),
    ("pairs-text-margin", "reward", "p.jsonl",
     jsonl([{**p, "margin": "big"} for p in GOOD_PAIRS]), {"margin_column": "margin"}, ["margin"]),
    ("prompts-missing-column", "ppo", "q.jsonl", jsonl([{"query": "x"}] * 8), {}, ["data.prompt_column"]),
    ("prompt-empty", "ppo", "q.jsonl", jsonl([{"prompt": ""}] + GOOD_PROMPTS), {}, ["row 0"]),
    ("prompt-number", "ppo", "q.jsonl", jsonl([{"prompt": 7}] * 8), {}, ["row 0"]),
    ("prompt-too-long-reject", "ppo", "q.jsonl", jsonl(GOOD_PROMPTS + [{"prompt": LONG_PROMPT}]),
     {"long_prompts": "reject", "max_prompt_length": 16}, ["row 8", "max_prompt_length"]),
    ("reward-fn-raises", "ppo", "q.jsonl", jsonl(GOOD_PROMPTS), {"reward": "bad_rewards:raises"},
     ["reward.function", "RuntimeError"]),
    ("reward-fn-wrong-count", "ppo", "q.jsonl", jsonl(GOOD_PROMPTS), {"reward": "bad_rewards:short"},
     ["reward.function", "returned 1 values"]),
    ("reward-fn-nan", "ppo", "q.jsonl", jsonl(GOOD_PROMPTS), {"reward": "bad_rewards:nan"}, ["reward.function", "nan"]),
    ("reward-fn-strings", "ppo", "q.jsonl", jsonl(GOOD_PROMPTS), {"reward": "bad_rewards:words"}, ["reward.function"]),
    ("reward-fn-missing-module", "ppo", "q.jsonl", jsonl(GOOD_PROMPTS), {"reward": "no_such_module_xyz:fn"},
     ["reward.function", "no_such_module_xyz"]),
]
BUILDERS = {"sft": sft_data_config, "reward": reward_data_config, "ppo": ppo_data_config}


@pytest.mark.parametrize(("stage", "name", "content", "options", "needles"), [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_malformed_dataset_exits_2(monkeypatch, capsys, tmp_path, stage, name, content, options, needles):
    (tmp_path / "bad_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data_file = tmp_path / (name or "absent.jsonl")
    if content is not None:
        data_file.write_text(content)
    config = BUILDERS[stage](str(data_file), **options)
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text(config).replace("OUT", str(tmp_path / "out")))
    code, stderr = run_in_process(monkeypatch, capsys, stage, str(path))
    assert_user_error(code, stderr, *needles)
    # the data (and a reward function's import) are checked before any model is loaded; a reward function
    # that fails when called fails once the policy has generated
    called = options.get("reward", "").startswith("bad_rewards:")
    assert ("model: class" in stderr) == called, stderr[-2000:]


# --- tokenizers without a pad token --------------------------------------------------------------


def saved_tokenizer(folder: Path, drop: tuple[str, ...]) -> Path:
    """The built-in tokenizer saved to `folder` with the named special tokens removed."""
    from rlhf_cli.models.loading import load_tokenizer

    tokenizer = load_tokenizer(TINY)
    tokenizer.save_pretrained(folder)
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / file
        if path.exists():
            data = json.loads(path.read_text())
            for key in drop:
                data.pop(key, None)
            path.write_text(json.dumps(data))
    return folder


def test_tokenizer_without_pad_falls_back_to_eos(tmp_path, caplog):
    from rlhf_cli.models.loading import load_tokenizer

    folder = saved_tokenizer(tmp_path / "tok", ("pad_token",))
    with caplog.at_level(logging.INFO):
        tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token is not None
    assert "pad" in caplog.text.lower()


def test_tokenizer_without_pad_or_eos_exits_2(monkeypatch, capsys, tmp_path):
    folder = saved_tokenizer(tmp_path / "tok", ("pad_token", "eos_token"))
    config = with_value(SFT_BASE, "model.tokenizer_name_or_path", str(folder))
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text(config).replace("OUT", str(tmp_path / "out")))
    code, stderr = run_in_process(monkeypatch, capsys, "sft", str(path))
    assert_user_error(code, stderr, str(folder))


# --- the real CLI behaves the same ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["typo-key", "python-object-tag"])
def test_real_cli_config_errors(tmp_path, case):
    _, stage, config, args, needles = next(c for c in CONFIG_CASES if c[0] == case)
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml_text(config).replace("OUT", str(tmp_path / "out")))
    result = run_cli(stage, str(path), *args)
    assert_user_error(result.returncode, result.stderr, *needles)


def test_real_cli_dataset_error(tmp_path):
    data_file = tmp_path / "p.jsonl"
    data_file.write_text(jsonl(GOOD_PAIRS[:2] + [{"chosen": "", "rejected": "bad"}] + GOOD_PAIRS[2:]))
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text(reward_data_config(str(data_file))).replace("OUT", str(tmp_path / "out")))
    result = run_cli("reward", str(path))
    assert_user_error(result.returncode, result.stderr, "row 2")


# --- the output folder and --resume --------------------------------------------------------------


EVAL_BASE = {"stage": "eval", "eval": {"models": [TINY], "output_dir": "OUT"}, "reward": {"function": "builtin:sentiment"}}


@pytest.mark.parametrize("config", [SFT_BASE, EVAL_BASE], ids=["sft", "eval"])
def test_output_dir_under_a_file_exits_2(monkeypatch, capsys, tmp_path, config):
    blocker = tmp_path / "some_file"
    blocker.write_text("not a folder\n")
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text(config).replace("OUT", str(tmp_path / "out")))
    code, stderr = run_in_process(monkeypatch, capsys, config["stage"], str(path), "--output-dir", str(blocker / "out"))
    assert_user_error(code, stderr, f"{blocker / 'out'} cannot be created", f"{blocker} is a file")


def test_overwrite_of_a_folder_without_a_run_exits_2(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text("print('mine')\n")
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text(SFT_BASE).replace("OUT", str(folder)))
    code, stderr = run_in_process(monkeypatch, capsys, "sft", str(path), "--overwrite")
    assert_user_error(code, stderr, str(folder), "no rlhf run", "--overwrite deletes only earlier runs")
    assert (folder / "train.py").exists()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A tiny sft run with checkpoint-1 and checkpoint-2, trained in this process; tests copy its folder."""
    root = tmp_path_factory.mktemp("sft-run")
    (root / "d.jsonl").write_text(jsonl(GOOD_TEXT))
    config = sft_data_config(str(root / "d.jsonl"))
    config["training"].update(max_steps=2, save_steps=1, logging_steps=1, save_total_limit=None)
    (root / "config.yaml").write_text(yaml_text(config).replace("OUT", str(root / "out")))
    argv = sys.argv
    sys.argv = ["rlhf", "sft", str(root / "config.yaml")]
    try:
        with pytest.raises(SystemExit) as exit_:
            cli_module.main()
        assert exit_.value.code in (0, None)
    finally:
        sys.argv = argv
        logging.getLogger().handlers.clear()
    assert sorted(p.name for p in (root / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    return root


def resume_copy(sft_run: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the run to resume, and the arguments of `rlhf sft CONFIG --output-dir COPY --resume`."""
    import shutil

    out = shutil.copytree(sft_run / "out", tmp_path / "out")
    return out, ["sft", str(sft_run / "config.yaml"), "--output-dir", str(out), "--resume"]


def test_resume_skips_a_damaged_checkpoint_for_the_previous_one(monkeypatch, capsys, tmp_path, sft_run):
    out, args = resume_copy(sft_run, tmp_path)
    weights = out / "checkpoint-2" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short; trainer_state.json intact
    code, stderr = run_in_process(monkeypatch, capsys, *args, "--set", "training.max_steps=3")
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert f"{weights} is truncated" in stderr and "skipping it" in stderr
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in stderr
    assert (out / "checkpoint-2.damaged").is_dir() and (out / "checkpoint-3" / "trainer_state.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_resume_with_every_checkpoint_damaged_exits_2(tmp_path, sft_run):
    """Through the real CLI: a safetensors error used to end in a traceback (exit 1)."""
    out, args = resume_copy(sft_run, tmp_path)
    for step in (1, 2):
        weights = out / f"checkpoint-{step}" / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli(*args)
    assert_user_error(result.returncode, result.stderr, f"no checkpoint in {out} can be resumed from",
                      f"{out / 'checkpoint-2' / 'model' / 'model.safetensors'} is truncated",
                      f"{out / 'checkpoint-1' / 'model' / 'model.safetensors'} is truncated", "--overwrite")
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()  # nothing was set aside


def test_resume_with_a_changed_seed_exits_2_unless_allowed(monkeypatch, capsys, tmp_path, sft_run):
    out, args = resume_copy(sft_run, tmp_path)
    before = (out / "config.yaml").read_text()
    code, stderr = run_in_process(monkeypatch, capsys, *args, "--set", "training.seed=7")
    assert_user_error(code, stderr, "training.seed: 42 -> 7", "data order", str(out / "config.yaml"),
                      "--allow-config-change")
    assert (out / "config.yaml").read_text() == before  # refused before anything was written
    code, stderr = run_in_process(monkeypatch, capsys, *args, "--set", "training.seed=7", "--allow-config-change",
                                  "--set", "training.max_steps=3")
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "training.seed: 42 -> 7" in stderr and "training.max_steps: 2 -> 3" in stderr
    assert (out / "config.checkpoint-2.yaml").read_text() == before  # the config the run had up to there
    assert "seed: 7" in (out / "config.yaml").read_text()


def test_resume_with_a_changed_learning_rate_says_so_and_applies_it(monkeypatch, capsys, tmp_path, sft_run):
    out, args = resume_copy(sft_run, tmp_path)
    code, stderr = run_in_process(monkeypatch, capsys, *args, "--set", "training.learning_rate=1e-3",
                                  "--set", "training.max_steps=3")
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "training.learning_rate: 5e-05 -> 0.001" in stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step3 = next(r for r in rows if r["step"] == 3 and "loss" in r)
    assert step3["learning_rate"] == pytest.approx(1e-3 * (3 - 2) / 3)  # linear decay, the new peak


def test_resume_of_another_stages_run_exits_2(monkeypatch, capsys, tmp_path, sft_run):
    out, _ = resume_copy(sft_run, tmp_path)
    path = tmp_path / "reward.yaml"
    path.write_text(yaml_text(reward_data_config("builtin:review-preferences")).replace("OUT", str(out)))
    code, stderr = run_in_process(monkeypatch, capsys, "reward", str(path), "--resume")
    assert_user_error(code, stderr, f"{out} holds an `rlhf sft` run, not `rlhf reward`")
