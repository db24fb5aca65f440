"""tests/forked_cli.py, which runs the CLI tests' `python -m rlhf_cli` processes: a forked run gives what a new
interpreter gives (exit status, output, files, signals), and the runs it cannot fork go to a real interpreter."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


# --- the ranks of a multi-process launch (tests/forked_rank.py) -------------------------------------------


RANK_REWARD = """\
import os
from pathlib import Path


def reward(prompts, responses, **_):
    # who runs this rank: its pid and its parent's (the server's, if forked)
    Path(os.environ["RANKS"], os.environ["RANK"]).write_text(f"{os.getpid()} {os.getppid()}")
    return [len(response) / 10 for response in responses]
"""


def launch_ppo(folder: Path, forked: bool, *sets: str, processes: int = 2) -> subprocess.Popen:
    """A tiny PPO run on `processes` processes under torchrun, its reward function recording each rank's pids
    in `folder`/ranks; `forked`: ranks started through PYTHON_EXEC (conftest.py), or real interpreters."""
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "rank_reward.py").write_text(RANK_REWARD)
    (folder / "ranks").mkdir()
    env = environment(PYTHONPATH=str(folder / "lib"), RANKS=str(folder / "ranks"), PYTHON_EXEC=str(FORKED_CLI.rank_python))
    if not forked:
        del env["PYTHON_EXEC"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "rlhf_cli", "ppo", str(REPO / "configs" / "quickstart-ppo.yaml"), "--output-dir", str(folder / "out"),
               *TINY_PPO, "--set", "reward.sources=[{function: 'rank_reward:reward'}]", *sets]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pids(folder: Path) -> dict[str, tuple[int, int]]:
    """rank -> (pid, parent pid) of the process that ran it, as its reward function recorded them."""
    return {path.name: tuple(map(int, path.read_text().split())) for path in (folder / "ranks").iterdir()}


def forking_ranks() -> bool:
    """Ranks fork where the server has the OMP_NUM_THREADS=1 torchrun gives them (`pytest -n N`, conftest.py);
    elsewhere the server refuses them (a variable read on import differs) and they run in real interpreters."""
    return FORKED_CLI.base_env.get("OMP_NUM_THREADS") == "1"


@pytest.mark.multiprocess
def test_the_ranks_of_a_launch_fork_and_give_what_real_ranks_give(tmp_path):
    if not forking_ranks():
        pytest.skip("the ranks fork under `pytest -n N` only")
    runs = {}
    for name, forked in (("forked", True), ("real", False)):
        process = launch_ppo(tmp_path / name, forked)
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0 and "(2 processes, cpu" in stderr, stderr[-3000:]
        runs[name] = rank_pids(tmp_path / name)
    # forked: each rank a child of the server; real: of the launcher, a new interpreter each
    assert sorted(runs["forked"]) == ["0", "1"] and {ppid for _, ppid in runs["forked"].values()} == {FORKED_CLI.server.pid}
    assert sorted(runs["real"]) == ["0", "1"] and FORKED_CLI.server.pid not in {ppid for _, ppid in runs["real"].values()}
    metrics = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s") and not k.startswith("time/")}
                for line in (tmp_path / name / "out" / "metrics.jsonl").read_text().splitlines()] for name in runs]
    assert metrics[0] == metrics[1] and len(metrics[0]) >= 2
    for file in ("model.safetensors", "value_head.safetensors"):
        assert (tmp_path / "forked" / "out" / file).read_bytes() == (tmp_path / "real" / "out" / file).read_bytes()


@pytest.mark.multiprocess
def test_a_signal_to_a_rank_reaches_its_forked_run_and_a_killed_rank_takes_it_along(tmp_path):
    """One-process launches, so that nothing else stops the run: SIGTERM to the process the launcher started
    for the rank reaches the forked run (the stage saves a checkpoint and stops, as a real rank does); after
    SIGKILL, which that process cannot pass on, the server kills the run (the real rank would have died)."""
    if not forking_ranks():
        pytest.skip("the ranks fork under `pytest -n N` only")
    for signum in (signal.SIGTERM, signal.SIGKILL):
        folder = tmp_path / signum.name
        launcher = launch_ppo(folder, True, "--set", "ppo.total_episodes=100000", "--set", "training.save_steps=1000",
                              processes=1)
        deadline = time.monotonic() + 120
        while not (folder / "ranks" / "0").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.1)
        (run, server), (rank,) = rank_pids(folder)["0"], children(launcher.pid)
        assert server == FORKED_CLI.server.pid
        try:
            os.kill(rank, signum)
            _, stderr = launcher.communicate(timeout=120)
            assert launcher.returncode != 0
            deadline = time.monotonic() + 10
            while Path(f"/proc/{run}").exists():
                assert time.monotonic() < deadline, f"the forked run of a rank killed by {signum.name} still runs"
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run, signal.SIGKILL)
        if signum == signal.SIGTERM:
            assert "SIGTERM received" in stderr and list((folder / "out").glob("checkpoint-*")), stderr[-3000:]


def children(pid: int) -> list[int]:
    """The pids of `pid`'s child processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found
