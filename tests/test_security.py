"""Security: weights only as safetensors, optimizer state loaded with weights_only=True,
trust_remote_code off by default and announced when on, YAML through safe_load, reward functions
imported only from the explicit `module:callable` of the config."""

import ast
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml

import rlhf_cli
from rlhf_cli import cli as cli_module
from rlhf_cli.config.sections import ModelConfig
from rlhf_cli.errors import UserError

PACKAGE = Path(rlhf_cli.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def calls(name: str):
    """(file, ast.Call) for every call of `name` (a dotted attribute like torch.load) in the package."""
    module, _, attr = name.rpartition(".")
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if module and isinstance(f, ast.Attribute) and f.attr == attr and (
                    isinstance(f.value, ast.Name) and f.value.id == module
                ) or not module and isinstance(f, ast.Name) and f.id == attr:
                    yield path, node


def test_every_torch_load_is_weights_only():
    found = list(calls("torch.load"))
    assert found, "expected the checkpoint loader to call torch.load"
    for path, node in found:
        kwargs = {k.arg: k.value for k in node.keywords}
        assert isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True, path


def test_no_unsafe_yaml_pickle_eval_or_exec():
    for name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads", "eval", "exec"):
        assert not list(calls(name)), name
    assert list(calls("yaml.safe_load"))


def test_python_tag_in_config_is_refused(monkeypatch, capsys, tmp_path):
    marker = tmp_path / "owned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    monkeypatch.setattr(sys, "argv", ["rlhf", "validate", str(config)])
    with pytest.raises(SystemExit) as exit_:
        cli_module.main()
    assert exit_.value.code == 2 and not marker.exists()
    assert "no `!!` tags" in capsys.readouterr().err


def test_trust_remote_code_off_by_default_and_announced(tmp_path, caplog):
    from rlhf_cli.models.loading import load_tokenizer

    assert ModelConfig().trust_remote_code is False
    load_tokenizer("builtin:tiny-gpt2").save_pretrained(tmp_path / "tok")
    with caplog.at_level(logging.WARNING):
        load_tokenizer(str(tmp_path / "tok"))
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_tokenizer(str(tmp_path / "tok"), trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text and str(tmp_path / "tok") in caplog.text


def test_reward_functions_come_only_from_module_colon_callable(tmp_path, monkeypatch):
    from rlhf_cli.config.loader import build_stage
    from rlhf_cli.rewards.function import import_callable

    base = {"model": {"model_name_or_path": "builtin:tiny-gpt2"}, "data": {"dataset_name": "builtin:review-prompts"}}
    for spec in ("os", "os.system", "builtin:os.system"):
        with pytest.raises(UserError, match="reward.function"):
            build_stage("ppo", {**base, "reward": {"function": spec}}, "x.yaml")
            import_callable(spec)
    (tmp_path / "judge.py").write_text("def score(prompts, responses, **columns):\n    return [1.0] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "judge", raising=False)  # this file's judge, not one an earlier test imported
    fn = import_callable("judge:score")
    assert fn(["p"], ["r"]) == [1.0]


def test_outputs_hold_weights_only_as_safetensors(monkeypatch, capsys, tmp_path):
    """A short SFT run with a checkpoint, resumed: no pickled weights anywhere, optimizer/scheduler
    state read back with weights_only=True."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"a fine film {i}"}) + "\n" for i in range(16)))
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "sft", "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        "data": {"dataset_name": str(data), "dataset_test_split": None, "max_length": 16},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "save_steps": 1, "save_total_limit": None},
    }))

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["rlhf", "sft", str(config), *args])
        with pytest.raises(SystemExit) as exit_:
            cli_module.main()
        logging.getLogger().handlers.clear()
        assert exit_.value.code in (0, None), capsys.readouterr().err[-3000:]

    run()
    import shutil

    shutil.rmtree(tmp_path / "out" / "checkpoint-2")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    run("--resume")
    assert loads and all(k.get("weights_only") is True for k in loads)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    pickled = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert all(p.name in ("optimizer.pt", "scheduler.pt") for p in pickled), pickled
