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
