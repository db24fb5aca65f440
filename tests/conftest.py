"""Shared fixtures. Built-in artifacts (the tokenizer) are cached once per test session."""

import atexit
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from forked_cli import ForkedCli, ForkedProcess

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: the N workers share the machine's cores, so each worker (and every CLI run it
    # starts) computes on one thread instead of each claiming all of them
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# this process's environment before any test changes it: the CLI server's (tests/forked_cli.py)
FORKED_CLI = ForkedCli({**os.environ, "PYTHONUNBUFFERED": "1"})
atexit.register(FORKED_CLI.close)
# torchrun (also under `accelerate launch`) starts each rank with this python: forked from the same server
os.environ["PYTHON_EXEC"] = str(FORKED_CLI.rank_python)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m rlhf_cli ARGS` as a user would, capturing output: a new process, forked from a server
    that has done the imports (tests/forked_cli.py) unless `env` changes what a library reads on import."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    forked = FORKED_CLI.run(list(args), cwd or REPO, full_env, timeout)
    return forked or subprocess.run(
        [sys.executable, "-m", "rlhf_cli", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


def start_cli(*args: str, env: dict | None = None) -> "ForkedProcess | subprocess.Popen":
    """Start `python -m rlhf_cli ARGS` (as run_cli does) and return at once: the Popen of a run whose
    output is captured as text, for a test that signals it or watches its files."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return FORKED_CLI.start(list(args), REPO, full_env) or subprocess.Popen(
        [sys.executable, "-m", "rlhf_cli", *args], cwd=REPO, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`rlhf ARGS` inside this process (no interpreter start, so monkeypatched faults reach the
    stage): (exit status, stderr)."""
    from rlhf_cli import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["rlhf", *args])
    code = 0
    try:
        cli_module.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        logging.getLogger().handlers.clear()  # stages install handlers that hold the captured stream
    return code, capsys.readouterr().err


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    """The order that keeps both cores of `pytest -n 2` busy. pyproject.toml asks for `--dist worksteal`: each
    worker starts on its own contiguous share of this list and, once done, takes tests from the end of the
    other's. So the tests that launch several processes (they take turns on the lock below) open the first
    share, the other slow tests the second, longest first (`slow(minutes=N)`), and the quick ones fill the
    rest of each share and are the first to move: one worker runs the multi-process tests while the other
    runs the slow single-process ones, and no long test is left to run alone at the end (the 7-minute
    quickstart is among the last tests collected; under `--dist load` the two workers also queued on the
    lock). A run without workers keeps the collection order."""
    if not hasattr(config, "workerinput"):
        return
    launches, slow, quick = [], [], []
    for item in items:
        marked = item.get_closest_marker
        (launches if marked("multiprocess") else slow if marked("slow") else quick).append(item)
    slow.sort(key=lambda item: -item.get_closest_marker("slow").kwargs.get("minutes", 0))  # stable
    share = max(len(items) // config.workerinput["workercount"] - len(launches), 0)
    items[:] = launches + quick[:share] + slow + quick[share:]


@pytest.fixture(autouse=True)
def environment_restored():
    """Each test starts from the same environment variables. Code a test runs in-process may set some (the
    vLLM Sampler sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* for its engine), and a later test's CLI
    subprocess inherited them: accelerate then read LOCAL_RANK and put a plain `rlhf sft` on "cpu:0"."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def one_multiprocess_launch_at_a_time(request, tmp_path_factory):
    """Tests marked `multiprocess` start several processes that wait on each other in collectives. In one
    CI run the SFT launch hung for its whole 900 s timeout (it passes alone in 14 s) while the other xdist
    worker ran such launches too; the cause is not pinned down, so under xdist they take turns through a
    lock file: never two multi-process jobs on the 2 cores at once. (pytest_collection_modifyitems
    gives them to one worker; the other takes one only when it has run out of other tests.)"""
    if request.node.get_closest_marker("multiprocess") is None or not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    from filelock import FileLock

    with FileLock(str(tmp_path_factory.getbasetemp().parent / "multiprocess.lock")):
        yield


@pytest.fixture(autouse=True)
def rank_server(request):
    """A test that launches several processes finds the CLI server running, so that its ranks fork from it
    (PYTHON_EXEC above) rather than start real interpreters while no run of this worker has started it yet."""
    if request.node.get_closest_marker("multiprocess") is not None:
        FORKED_CLI.ensure_server()


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def write_yaml(tmp_path):
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


# The SFT stage of recipes/quickstart cut to half its steps: the sft_model fixture's, and the shortened
# quickstart's (tests/test_recipes.py), which runs the rest of the recipe after it. (At 100 steps PPO raised
# the learned reward model's score there, -0.20 -> 1.68, but not the gold score, 0.12 -> 0.20.)
QUICKSTART = REPO / "recipes" / "quickstart" / "recipe.yaml"
SHORT_SFT = ["sft.training.max_steps=150", "sft.training.warmup_steps=15", "sft.training.eval_steps=150",
             "sft.data.max_eval_samples=64"]


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory) -> Path:
    """builtin:small-gpt2 taught the built-in reviews by the quickstart recipe's SFT stage, cut to 150 steps
    (~150 s on one core): a policy that writes review-like text, so RL tests start where real RLHF starts.
    (tiny-gpt2, 0.4M parameters, is too small for a LoRA adapter to learn PPO on.)
    Trained once per test run, by `rlhf run recipes/quickstart/recipe.yaml --until sft` into the run's
    shared folder: under `pytest -n N` the first worker to need it trains it while the others wait on a
    lock, then all read it."""
    from filelock import FileLock

    from rlhf_cli.recipe.runner import MARKER

    out = run_folder(tmp_path_factory) / "quickstart"  # the shortened quickstart's stages (tests/test_recipes.py)
    with FileLock(str(out.parent / "quickstart.lock")):
        if not (out / "sft" / MARKER).is_file():
            result = run_cli("run", str(QUICKSTART), "--output-dir", str(out), "--until", "sft",
                             *(arg for value in SHORT_SFT for arg in ("--set", value)), timeout=1800)
            assert result.returncode == 0, result.stderr[-3000:]
    return out / "sft"


def run_folder(tmp_path_factory) -> Path:
    """This test run's folder (.../pytest-N), which its xdist workers share. (The parent of a run without
    workers is every run's: what is kept there outlives the run.)"""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def read_head_in_chunks(monkeypatch, logits: int) -> None:
    """Make lm/head.py chunk any read above `logits` logits, in chunks of that many (its defaults
    are sized for real vocabularies, so tests on tiny ones would read in one piece)."""
    for name in ("WHOLE_LOGITS", "CHUNK_LOGITS", "CPU_CHUNK_LOGITS"):
        monkeypatch.setattr(f"rlhf_cli.lm.head.{name}", logits)


class OneProcess:
    """What an online algorithm reads from its trainer (online/trainer.py): reductions and the episode
    count, here for one CPU process."""

    accelerator = None

    def reduced(self, means, totals=None):
        return {**{k: v.float().mean().item() for k, v in means.items()},
                **{k: v.float().sum().item() for k, v in (totals or {}).items()}}

    def episodes(self, exp):
        return len(exp)


@pytest.fixture
def one_process():
    from accelerate import Accelerator

    context = OneProcess()
    context.accelerator = Accelerator(cpu=True)
    return context
