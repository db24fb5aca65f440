"""tests/forked_cli.py, which runs the CLI tests' `python -m rlhf_cli` processes: a forked run gives what a new
interpreter gives (exit status, output, files, signals), and the runs it cannot fork go to a real interpreter."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import FORKED_CLI, REPO, run_cli
from forked_cli import ForkedProcess

TINY_SFT = ["--set", "model.model_name_or_path=builtin:tiny-gpt2", "--set", "training.max_steps=3",
            "--set", "training.eval_steps=3", "--set", "data.max_train_samples=64", "--set", "data.max_eval_samples=8",
            "--set", "training.per_device_train_batch_size=8"]
TINY_PPO = ["--set", "model.model_name_or_path=builtin:tiny-gpt2", "--set", "ppo.total_episodes=16",
            "--set", "training.per_device_train_batch_size=8", "--set", "data.max_eval_samples=4"]


def environment(**changes: str) -> dict[str, str]:
    """The worker's environment as it started (what run_cli passes, less anything an earlier test left)."""
    return {**FORKED_CLI.base_env, **changes}


def without_clock(text: str) -> list[str]:
    """Log lines without their time stamps and wall-clock figures."""
    return [line.split(" ", 1)[1] if line[:2].isdigit() else line for line in text.splitlines()
            if "_per_s" not in line and "eta " not in line]


def test_a_forked_run_gives_what_a_new_interpreter_gives(tmp_path):
    """The same tiny SFT run forked and in a real `python -m rlhf_cli`: the same exit status, log, metrics and
    weights (the same machine, so bit for bit)."""
    config = str(REPO / "configs" / "quickstart-sft.yaml")
    forked = FORKED_CLI.run(["sft", config, "--output-dir", str(tmp_path / "forked"), *TINY_SFT], REPO,
                            environment(), 600)
    real = subprocess.run([sys.executable, "-m", "rlhf_cli", "sft", config, "--output-dir", str(tmp_path / "real"),
                           *TINY_SFT], cwd=REPO, capture_output=True, text=True, timeout=600, env=environment())
    assert forked is not None, f"not forked: {FORKED_CLI.refused_for}"
    assert forked.returncode == real.returncode == 0, forked.stderr[-3000:]
    assert without_clock(forked.stderr.replace(str(tmp_path / "forked"), str(tmp_path / "real"))) == without_clock(real.stderr)
    rows = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s") and not k.startswith("time/")}
             for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("forked", "real")]
    assert rows[0] == rows[1] and len(rows[0]) >= 3
    assert (tmp_path / "forked" / "model.safetensors").read_bytes() == (tmp_path / "real" / "model.safetensors").read_bytes()


def test_exit_statuses_output_working_directory_and_python_path(tmp_path):
    (tmp_path / "config.yaml").write_text("stage: ppo\nreward:\n  function: builtin:sentiment\n")
    result = FORKED_CLI.run(["validate", "config.yaml"], tmp_path, environment(), 60)
    assert result is not None, f"not forked: {FORKED_CLI.refused_for}"
    assert result.returncode == 0 and "config.yaml: valid `rlhf ppo` config" in result.stdout, result.stderr
    # the reward function comes from the run's own PYTHONPATH and reads the run's environment; its error is
    # reported as a user's
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "user_code.py").write_text(
        "import os\n\ndef reward(prompts, responses, **_):\n    raise KeyError(os.environ['REWARD_MARKER'])\n")
    result = FORKED_CLI.run(["ppo", str(REPO / "configs" / "quickstart-ppo.yaml"), "--output-dir", "out",
                             "--set", "reward.sources=[{function: 'user_code:reward'}]", *TINY_PPO], tmp_path,
                            environment(PYTHONPATH=str(tmp_path / "lib"), REWARD_MARKER="a"), 300)
    assert result.returncode == 2 and "KeyError: 'a'" in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "out").is_dir()
    result = FORKED_CLI.run(["validate", "missing.yaml"], tmp_path, environment(), 60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: missing.yaml"), result.stderr
    result = FORKED_CLI.run(["no-such-command"], tmp_path, environment(), 60)
    assert result.returncode == 2 and "No such command" in result.stderr


def test_signals_reach_the_run_and_its_status_says_so(tmp_path):
    """A started run as tests use a Popen: poll, send_signal, communicate; SIGKILL reads as -9."""
    process = FORKED_CLI.start(["sft", str(REPO / "configs" / "quickstart-sft.yaml"), "--output-dir",
                                str(tmp_path / "out"), *TINY_SFT, "--set", "training.max_steps=100000"], REPO, environment())
    assert isinstance(process, ForkedProcess), f"not forked: {FORKED_CLI.refused_for}"
    assert process.poll() is None
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "metrics.jsonl").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL and "before training" in stderr  # written before, read back


def test_an_environment_a_library_reads_on_import_gets_a_new_interpreter(tmp_path):
    assert FORKED_CLI.start(["--help"], REPO, environment(HF_HOME=str(tmp_path))) is None
    assert FORKED_CLI.refused_for == ["HF_HOME"]
    result = run_cli("--help", env={"HF_HOME": str(tmp_path)})  # the fallback: a real `python -m rlhf_cli`
    assert result.returncode == 0 and "Usage" in result.stdout


def test_no_earlier_test_left_a_variable_read_on_import_behind():
    """run_cli passes this worker's environment on. environment_restored undoes what a test sets, but not what
    collection, a module or session fixture, or code outside a test sets: such a variable, read on import,
    would send every later CLI run of this worker to a real interpreter (correct, ~10 s slower each)."""
    _, refused = FORKED_CLI.child_environment({**os.environ, "PYTHONUNBUFFERED": "1"})
    assert refused == []


def test_the_installed_rlhf_command_runs():
    """The console script (pyproject's [project.scripts]) in a real interpreter: every other CLI test forks."""
    rlhf = Path(sys.executable).with_name("rlhf")
    result = subprocess.run([str(rlhf), "validate", "configs/quickstart-ppo.yaml"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=environment())
    assert result.returncode == 0 and "valid `rlhf ppo` config" in result.stdout, result.stderr
