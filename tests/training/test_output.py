"""The output folder: a run is never clobbered by accident; config.yaml and run_info.json are written."""

import json

import pytest
import yaml

from rlhf_cli.config.loader import build_stage, load_config
from rlhf_cli.errors import UserError
from rlhf_cli.training.metrics import MetricsWriter, read_metrics
from rlhf_cli.training.output import prepare_output_dir, write_run_files


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = prepare_output_dir(tmp_path / "run", resume=False, overwrite=False)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        prepare_output_dir(out, resume=False, overwrite=False)
    assert (out / "metrics.jsonl").exists()  # the refusal touched nothing
    prepare_output_dir(out, resume=True, overwrite=False)
    assert (out / "metrics.jsonl").exists()
    prepare_output_dir(out, resume=False, overwrite=True)
    assert not (out / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="contradict"):
        prepare_output_dir(out, resume=True, overwrite=True)


def test_a_start_that_failed_before_training_is_not_a_run(monkeypatch, capsys, tmp_path):
    """A bad model path exits 2 after config.yaml and run_info.json are written; the corrected command,
    with no --overwrite, then runs in the same folder (it is not refused as "already holds a run")."""
    from conftest import run_in_process

    out = tmp_path / "out"
    config = {"stage": "sft", "model": {"model_name_or_path": str(tmp_path / "no-such-model")},
              "data": {"dataset_name": "builtin:reviews", "max_train_samples": 32, "dataset_test_split": None,
                       "max_length": 32},
              "training": {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": 4}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    code, stderr = run_in_process(monkeypatch, capsys, "sft", str(path))
    assert code == 2 and "no-such-model" in stderr, stderr[-2000:]
    assert (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
    code, stderr = run_in_process(monkeypatch, capsys, "sft", str(path), "--set", "model.model_name_or_path=builtin:tiny-gpt2")
    assert code == 0, stderr[-2000:]
    assert read_metrics(out) and yaml.safe_load((out / "config.yaml").read_text())["model"]["model_name_or_path"] == "builtin:tiny-gpt2"


def test_empty_existing_folder_is_fine(tmp_path):
    (tmp_path / "run").mkdir()
    prepare_output_dir(tmp_path / "run", resume=False, overwrite=False)


def test_run_files_round_trip(tmp_path):
    config = build_stage("sft", {"training": {"seed": 7, "output_dir": str(tmp_path)}})
    write_run_files(tmp_path, "sft", config)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["stage"] == "sft"
    assert load_config("sft", tmp_path / "config.yaml") == config
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["versions"]["rlhf-cli"] and info["versions"]["torch"] and len(info["config_hash"]) == 16


def test_metrics_jsonl_rows_have_step_and_truncate_on_resume(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.log(step, {"loss": 1.0 / step, "bad": float("nan")})
    writer.truncate_after(2)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["bad"] == "nan"


# --- output folders that cannot be used, and what --overwrite may delete ------------------------------


def test_output_dir_under_a_file_is_refused_naming_both(tmp_path):
    (tmp_path / "some_file").write_text("x")
    with pytest.raises(UserError, match=r"some_file/out cannot be created: .*some_file is a file"):
        prepare_output_dir(tmp_path / "some_file" / "out", resume=False, overwrite=False)
    with pytest.raises(UserError, match="some_file exists and is not a folder"):
        prepare_output_dir(tmp_path / "some_file", resume=False, overwrite=True)
    assert (tmp_path / "some_file").read_text() == "x"


def test_an_unwritable_output_dir_is_a_user_error(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    with pytest.raises(UserError, match=r"cannot write to .*run \(Permission denied\)"):
        prepare_output_dir(tmp_path / "run", resume=False, overwrite=False)


def test_overwrite_deletes_only_a_folder_that_holds_rlhf_output(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds files but no rlhf run"):
        prepare_output_dir(home, resume=False, overwrite=True)
    assert (home / "notes.txt").read_text() == "keep me"
    # an interrupted eval left only samples.jsonl: that is rlhf output, so --overwrite replaces it
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "samples.jsonl").write_text("{}\n")
    prepare_output_dir(tmp_path / "eval", resume=False, overwrite=True)
    assert not (tmp_path / "eval" / "samples.jsonl").exists()
    # the current folder (even one holding a run) is never deleted
    (home / "config.yaml").write_text("stage: sft\n")
    monkeypatch.chdir(home / "src")
    for folder in (".", ".."):
        with pytest.raises(UserError, match="current folder or contains it"):
            prepare_output_dir(folder, resume=False, overwrite=True)
    assert (home / "notes.txt").exists()


# --- --resume with another config than the run's -------------------------------------------------------


def sft_config(tmp_path, **training):
    return build_stage("sft", {"training": {"output_dir": str(tmp_path), "max_steps": 4, **training}})


def test_resume_config_changes_are_sorted_by_what_they_do(tmp_path):
    from rlhf_cli.config.loader import to_dict
    from rlhf_cli.training.output import resume_config_changes

    old = to_dict("sft", sft_config(tmp_path))
    new = build_stage("sft", {
        "model": {"model_name_or_path": "builtin:small-gpt2"},
        "data": {"dataset_name": "other.jsonl", "max_eval_samples": 5},
        "training": {"output_dir": str(tmp_path / "moved"), "max_steps": 8, "seed": 1, "learning_rate": 1e-3,
                     "logging_steps": 1, "save_steps": 2, "per_device_train_batch_size": 2},
    })
    changes = resume_config_changes(old, "sft", new)
    assert [c.split(":")[0] for c in changes.meaningless] == [
        "data.dataset_name", "model.model_name_or_path", "training.per_device_train_batch_size", "training.seed"]
    assert changes.run_length == ["training.max_steps: 4 -> 8"]
    assert changes.other == ["data.max_eval_samples: None -> 5", "training.learning_rate: 5e-05 -> 0.001"]
    assert not resume_config_changes(old, "sft", sft_config(tmp_path, logging_steps=3, save_total_limit=None))
    ppo = {"reward": {"function": "builtin:sentiment"}, "training": {"output_dir": str(tmp_path)}}
    ppo_changes = resume_config_changes(to_dict("ppo", build_stage("ppo", ppo)), "ppo",
                                        build_stage("ppo", {**ppo, "ppo": {"kl_coef": 0.2}}))
    assert ppo_changes.other == ["ppo.kl_coef: 0.05 -> 0.2"]  # a fixed coefficient: the new one applies
    adaptive = {**ppo, "ppo": {"adaptive_kl": True}}
    adaptive_changes = resume_config_changes(to_dict("ppo", build_stage("ppo", adaptive)), "ppo",
                                             build_stage("ppo", {**ppo, "ppo": {"adaptive_kl": True, "kl_coef": 0.2}}))
    assert adaptive_changes.other == ["ppo.kl_coef: 0.05 -> 0.2 (no effect: with ppo.adaptive_kl the checkpoint's "
                                      "adapted coefficient is restored (ppo/kl.py))"]
    # a key that one side lacks (another rlhf version) is no change
    assert not resume_config_changes({**old, "training": {**old["training"], "retired_key": 1}}, "sft", sft_config(tmp_path))


def test_check_resume_config_refuses_meaningless_changes_unless_allowed(tmp_path, caplog):
    from rlhf_cli.training.output import check_resume_config

    write_run_files(tmp_path, "sft", sft_config(tmp_path))
    checkpoint = tmp_path / "checkpoint-2"
    with pytest.raises(UserError) as info:
        check_resume_config(tmp_path, "sft", sft_config(tmp_path, seed=7, learning_rate=1e-3), checkpoint, False)
    message = str(info.value)
    assert "training.seed: 42 -> 7" in message and "--allow-config-change" in message
    assert "learning_rate" not in message and str(tmp_path / "config.yaml") in message
    with caplog.at_level("INFO"):
        changes = check_resume_config(tmp_path, "sft", sft_config(tmp_path, seed=7, learning_rate=1e-3, max_steps=9),
                                      checkpoint, True)
    assert changes.meaningless and "training.learning_rate: 5e-05 -> 0.001" in caplog.text
    assert "training.max_steps: 4 -> 9" in caplog.text
    ppo = build_stage("ppo", {"reward": {"function": "builtin:sentiment"}, "training": {"output_dir": str(tmp_path)}})
    with pytest.raises(UserError, match="holds an `rlhf sft` run, not `rlhf ppo`"):
        check_resume_config(tmp_path, "ppo", ppo, checkpoint, True)
