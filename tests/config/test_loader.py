"""The YAML -> dataclass path: unknown keys, types, ranges, extends, overrides, round trip."""

import pytest
import yaml

from rlhf_cli.config.loader import apply_overrides, build_stage, dump_config, load_config, parse_override
from rlhf_cli.config.schema import STAGES
from rlhf_cli.errors import UserError

PPO_MIN = "reward:\n  function: builtin:sentiment\n"


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_defaults_build_for_every_stage_that_needs_nothing():
    assert build_stage("sft", {}).training.learning_rate == 5e-5
    assert build_stage("reward", {}).data.dataset_name == "builtin:review-preferences"


def test_typo_names_full_path_and_closest_key(write_yaml):
    path = write_yaml("c.yaml", PPO_MIN + "ppo:\n  kl_coeff: 0.1\n")
    assert error_of(load_config, "ppo", path) == "ppo.kl_coeff: unknown key; did you mean ppo.kl_coef?"


def test_unknown_section_lists_valid_sections(write_yaml):
    path = write_yaml("c.yaml", "modle:\n  model_name_or_path: x\n")
    assert error_of(load_config, "sft", path) == "modle: unknown key; did you mean model?"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("training:\n  per_device_train_batch_size: eight\n",
         "training.per_device_train_batch_size: expected integer, got 'eight' (str)."),
        ("training:\n  bf16: 'yes'\n", "training.bf16: expected boolean, got 'yes' (str)."),
        ("training:\n  learning_rate: fast\n", "training.learning_rate: expected number, got 'fast' (str)."),
        ("training:\n  learning_rate: -1.0\n", "training.learning_rate: -1.0 must be > 0.0."),
        ("training:\n  lr_scheduler_type: cosine_restarts\n",
         "training.lr_scheduler_type: 'cosine_restarts' is not allowed; choose one of: linear, cosine, constant, constant_with_warmup."),
        ("peft:\n  lora_dropout: 1.5\n", "peft.lora_dropout: 1.5 is too large; it must be <= 1.0."),
        ("training: [1, 2]\n", "training: expected a mapping of keys, got [1, 2] (list)."),
        ("peft:\n  lora_target_modules: {a: 1}\n",
         "peft.lora_target_modules: expected list of string or null, got {'a': 1} (dict)."),
        ("training:\n  bf16: true\n  fp16: true\n", "training.bf16 and training.fp16 are both true; choose at most one."),
    ],
)
def test_wrong_types_and_ranges_name_the_key(write_yaml, text, message):
    assert error_of(load_config, "sft", write_yaml("c.yaml", text)) == message


def test_scientific_notation_without_dot_is_a_number(write_yaml):
    # PyYAML reads `1e-5` as a string; a float field accepts it.
    cfg = load_config("sft", write_yaml("c.yaml", "training:\n  learning_rate: 1e-5\n"))
    assert cfg.training.learning_rate == 1e-5


def test_missing_file_and_bad_yaml(tmp_path, write_yaml):
    assert "config file not found" in error_of(load_config, "sft", tmp_path / "nope.yaml")
    bad = write_yaml("bad.yaml", "training:\n  seed: [1,\n")
    message = error_of(load_config, "sft", bad)
    assert message.startswith(f"{bad} (line") and "invalid YAML" in message
    assert "not list" in error_of(load_config, "sft", write_yaml("l.yaml", "- a\n- b\n"))


def test_extends_chain_child_wins_paths_relative_to_file(write_yaml):
    write_yaml("base/root.yaml", "training:\n  seed: 1\n  learning_rate: 0.1\n  logging_steps: 3\n")
    write_yaml("base/mid.yaml", "extends: root.yaml\ntraining:\n  seed: 2\n  learning_rate: 0.2\n")
    child = write_yaml("child.yaml", "extends: base/mid.yaml\ntraining:\n  seed: 3\n")
    cfg = load_config("sft", child)
    assert (cfg.training.seed, cfg.training.learning_rate, cfg.training.logging_steps) == (3, 0.2, 3)


def test_extends_errors(write_yaml):
    a = write_yaml("a.yaml", "extends: b.yaml\n")
    write_yaml("b.yaml", "extends: a.yaml\n")
    assert "cycle" in error_of(load_config, "sft", a)
    c = write_yaml("c.yaml", "extends: missing.yaml\n")
    assert "extends: 'missing.yaml' not found" in error_of(load_config, "sft", c)


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("training.learning_rate=1e-3", lambda c: c.training.learning_rate, 1e-3),
        ("training.max_steps=7", lambda c: c.training.max_steps, 7),
        ("training.bf16=true", lambda c: c.training.bf16, True),
        ("peft.lora_target_modules=[c_attn, c_proj]", lambda c: c.peft.lora_target_modules, ["c_attn", "c_proj"]),
        ("peft.lora_target_modules=c_attn", lambda c: c.peft.lora_target_modules, ["c_attn"]),
        ("data.dataset_test_split=null", lambda c: c.data.dataset_test_split, None),
        ("model.revision=123", lambda c: c.model.revision, "123"),
        ("training.report_to=[]", lambda c: c.training.report_to, []),
    ],
)
def test_set_overrides_parse_to_field_type(write_yaml, override, getter, expected):
    cfg = load_config("sft", write_yaml("c.yaml", "training:\n  seed: 1\n"), [override])
    assert getter(cfg) == expected


def test_override_errors():
    assert "expected key.path=value" in error_of(parse_override, "training.seed")
    assert error_of(
        build_stage, "sft", apply_overrides({}, ["training.sed=3"])
    ) == "training.sed: unknown key; did you mean training.seed?"


def test_set_reaches_into_a_list_of_sources(write_yaml):
    """`--set` takes the same `[i]` key paths as a recipe's `set:`."""
    path = write_yaml("p.yaml", "reward:\n  sources:\n    - function: builtin:sentiment\n    - model: a\n")
    cfg = load_config("ppo", path, ["reward.sources[1].model=b", "reward.sources[1].weight=0.5"])
    assert (cfg.reward.sources[1].model, cfg.reward.sources[1].weight) == ("b", 0.5)
    assert "has 2 item(s)" in error_of(load_config, "ppo", path, ["reward.sources[2].model=c"])


def test_stage_key_must_match_the_subcommand(write_yaml):
    path = write_yaml("c.yaml", "stage: reward\n")
    assert "written for `rlhf reward`" in error_of(load_config, "sft", path)


def test_reward_sources_rules(write_yaml):
    assert "exactly one of reward.model" in error_of(load_config, "ppo", write_yaml("a.yaml", "reward: {}\n"))
    both = "reward:\n  function: builtin:sentiment\n  sources:\n    - function: builtin:sentiment\n"
    assert "not both" in error_of(load_config, "ppo", write_yaml("b.yaml", both))
    many = "reward:\n  sources:\n    - function: builtin:sentiment\n      weight: 2\n    - model: some/rm\n"
    cfg = load_config("ppo", write_yaml("c.yaml", many))
    assert [s.weight for s in cfg.reward.sources] == [2.0, 1.0]
    bad_fn = "reward:\n  function: my_module.fn\n"
    assert "package.module:callable" in error_of(load_config, "ppo", write_yaml("d.yaml", bad_fn))


@pytest.mark.parametrize("stage", list(STAGES))
def test_resolved_config_round_trip(tmp_path, write_yaml, stage):
    text = {
        "sft": "training:\n  seed: 5\npeft:\n  use_peft: true\n",
        "reward": "reward:\n  center_rewards_coefficient: 0.01\n",
        "ppo": PPO_MIN + "ppo:\n  kl_coef: 0.3\n",
        "eval": PPO_MIN + "eval:\n  models: [builtin:tiny-gpt2]\n",
        "dpo": "data:\n  max_prompt_length: 32\ndpo:\n  beta: 0.2\n  loss_type: ipo\n",
        "grpo": PPO_MIN + "grpo:\n  num_generations: 4\n  epsilon_high: 0.28\n  loss_type: dr_grpo\n",
        "rloo": PPO_MIN + "rloo:\n  beta: 0.0\n  kl_in_reward: false\n",
        "ddpo": "reward:\n  sources: [builtin:alignment, {function: builtin:jpeg_compressibility, weight: 0.5}]\n"
                "peft:\n  lora_target_modules: [to_q]\nddpo:\n  train_timesteps_per_call: null\n  grid_seeds: [3]\n",
    }[stage]
    cfg = load_config(stage, write_yaml("c.yaml", text), ["data.max_length=77"])
    dump_config(stage, cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["stage"] == stage
    assert load_config(stage, tmp_path / "resolved.yaml") == cfg


def test_min_response_length_cannot_exceed_response_length(write_yaml):
    path = write_yaml("p.yaml", "reward:\n  function: builtin:sentiment\ngeneration:\n  response_length: 16\n  min_response_length: 24\n")
    assert error_of(load_config, "ppo", path) == (
        "generation.min_response_length (24) is larger than generation.response_length (16); "
        "lower it or raise response_length."
    )


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_refused(write_yaml, text):
    path = write_yaml("c.yaml", text)
    message = error_of(load_config, "sft", path)
    assert message.startswith(f"{path}: the config file is empty") and "stage: <stage>" in message
    assert load_config("sft", write_yaml("d.yaml", "stage: sft\n")).training.seed == 42  # all defaults, on purpose


def test_an_empty_parent_is_refused_too(write_yaml):
    write_yaml("base.yaml", "")
    path = write_yaml("c.yaml", "extends: base.yaml\ntraining:\n  seed: 1\n")
    assert "base.yaml: the config file is empty" in error_of(load_config, "sft", path)


def test_a_key_written_twice_is_refused(write_yaml):
    path = write_yaml("c.yaml", "training:\n  seed: 1\n  learning_rate: 0.1\n  seed: 2\n")
    message = error_of(load_config, "sft", path)
    assert message.startswith(f"{path} (line 4, column 3): invalid YAML") and "'seed' appears twice" in message
    assert "line 2" in message and "!!" not in message
    path = write_yaml("s.yaml", "training:\n  seed: 1\nmodel:\n  dtype: float32\ntraining:\n  max_steps: 2\n")
    assert "'training' appears twice" in error_of(load_config, "sft", path)


def test_merge_keys_may_be_overridden():
    """A key merged in with `<<: *anchor` and set again beside it is an override, not a duplicate."""
    from rlhf_cli.config.loader import safe_load_unique

    data = safe_load_unique("base: &b\n  seed: 1\n  max_steps: 2\ntraining:\n  <<: *b\n  seed: 3\n")
    assert data["training"] == {"seed": 3, "max_steps": 2}


def test_a_folder_or_a_binary_file_as_config(tmp_path):
    assert "is a folder, not a config file" in error_of(load_config, "sft", tmp_path)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 8)
    assert error_of(load_config, "sft", binary) == f"{binary}: not a text file (not UTF-8); a config is a YAML text file."


def test_home_in_output_dir_is_expanded(write_yaml, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config("sft", write_yaml("c.yaml", "training:\n  output_dir: ~/runs/a\n")).training.output_dir == str(
        tmp_path / "runs" / "a")
    eval_config = "eval:\n  models: [builtin:tiny-gpt2]\n  output_dir: ~/ev\nreward:\n  function: builtin:sentiment\n"
    assert load_config("eval", write_yaml("e.yaml", eval_config)).eval.output_dir == str(tmp_path / "ev")


def test_an_empty_output_dir_is_refused(write_yaml):
    """Path("") is the current folder: the run would land among the user's own files."""
    assert error_of(load_config, "sft", write_yaml("c.yaml", "training:\n  output_dir: ''\n")).startswith(
        "training.output_dir: empty")
