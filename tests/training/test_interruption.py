"""Reproducibility and interruption, through real CLI processes on the built-in tiny model.

- The same config and seed give an identical metrics.jsonl (wall-clock keys aside) and weights.
- SIGTERM (a preemptible cluster) and Ctrl-C save a checkpoint, say how to resume and exit 143 / 130;
  `--resume` then ends exactly where an uninterrupted run ends.
- SIGKILL at several moments, one inside a checkpoint save (RLHF_TEST_SLOW_SAVE), loses at most the
  steps since the last complete checkpoint: the half-written one is reported and skipped, and the
  resumed run still ends with the uninterrupted run's metrics and weights (sft, reward and ppo).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import start_cli
from safetensors.torch import load_file

from rlhf_cli.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = "builtin:tiny-gpt2"


def wall_clock(key: str) -> bool:
    return key.startswith("time/") or key.endswith("_per_s")


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not wall_clock(k)} for row in rows]


def same_weights(a: Path, b: Path, name: str = "model.safetensors") -> bool:
    wa, wb = load_file(a / name), load_file(b / name)
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return start_cli(*args, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})})


def finish(process: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def run_to_end(*args: str, env: dict | None = None) -> str:
    code, stderr = finish(start(*args, env=env))
    assert code == 0, f"exit {code}\n{stderr[-4000:]}"
    return stderr


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before the moment to interrupt it:\n"
                                 f"{process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the moment to interrupt"
        time.sleep(0.05)


def metric_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# --- configs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    words = ["good", "bad", "great", "film", "plot", "actor", "slow", "funny", "dull", "moving"]
    rows = [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(6 + i % 5))} for i in range(96)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_config(folder: Path, text_file: Path, max_steps: int = 6, save_steps: int = 2) -> Path:
    config = {
        "stage": "sft", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": str(text_file), "dataset_test_split": None, "max_length": 24},
        "training": {"output_dir": str(folder / "out"), "max_steps": max_steps, "per_device_train_batch_size": 4,
                     "learning_rate": 3e-3, "logging_steps": 1, "save_steps": save_steps},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


SLOW_REWARD = textwrap.dedent("""\
    import time
    def slow_length(prompts, responses, **columns):
        time.sleep(0.3)  # gives a test time to interrupt the run between iterations
        return [len(r) / 20 for r in responses]
    """)


def ppo_config(folder: Path, iterations: int = 4, save_steps: int = 2) -> tuple[Path, dict]:
    (folder / "slow_reward.py").parent.mkdir(parents=True, exist_ok=True)
    (folder / "slow_reward.py").write_text(SLOW_REWARD)
    config = {
        "stage": "ppo", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": "builtin:review-prompts", "max_eval_samples": 8},
        "generation": {"response_length": 6},
        "reward": {"function": "slow_reward:slow_length"},
        "training": {"output_dir": str(folder / "out"), "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                     "logging_steps": 1, "save_steps": save_steps},
        "ppo": {"total_episodes": 8 * iterations, "num_mini_batches": 2, "num_ppo_epochs": 1, "sample_steps": 1},
    }
    path = folder / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, {"PYTHONPATH": str(folder)}


# --- reproducibility -----------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_same_seed_same_metrics_and_run_info(tmp_path, text_file):
    a, b = sft_config(tmp_path / "a", text_file), sft_config(tmp_path / "b", text_file)
    run_to_end("sft", str(a))
    run_to_end("sft", str(b))
    rows_a, rows_b = read_metrics(tmp_path / "a" / "out"), read_metrics(tmp_path / "b" / "out")
    assert len(rows_a) == 6 and comparable(rows_a) == comparable(rows_b)
    assert same_weights(tmp_path / "a" / "out", tmp_path / "b" / "out")
    info = json.loads((tmp_path / "a" / "out" / "run_info.json").read_text())
    import rlhf_cli
    from rlhf_cli.cli import load_stage_config
    from rlhf_cli.training.output import config_hash

    assert info["versions"]["rlhf-cli"] == rlhf_cli.__version__
    for package in ("torch", "transformers", "python"):
        assert info["versions"].get(package, "not installed") != "not installed", info
    # the hash is of the resolved config (output_dir included): the run's config.yaml gives it back
    assert info["config_hash"] == config_hash("sft", load_stage_config("sft", a, None, None))
    assert info["config_hash"] == config_hash("sft", load_stage_config("sft", tmp_path / "a" / "out" / "config.yaml", None, None))


@pytest.mark.slow
def test_ppo_same_seed_same_metrics(tmp_path):
    a, env_a = ppo_config(tmp_path / "a", iterations=2)
    b, env_b = ppo_config(tmp_path / "b", iterations=2)
    run_to_end("ppo", str(a), env=env_a)
    run_to_end("ppo", str(b), env=env_b)
    rows_a, rows_b = read_metrics(tmp_path / "a" / "out"), read_metrics(tmp_path / "b" / "out")
    assert len(rows_a) >= 3 and comparable(rows_a) == comparable(rows_b)
    assert same_weights(tmp_path / "a" / "out", tmp_path / "b" / "out")
    assert same_weights(tmp_path / "a" / "out", tmp_path / "b" / "out", "value_head.safetensors")


# --- SIGTERM / Ctrl-C ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, text_file) -> Path:
    """An uninterrupted 40-step SFT run."""
    folder = tmp_path_factory.mktemp("sft-ref")
    run_to_end("sft", str(sft_config(folder, text_file, max_steps=40, save_steps=10)))
    return folder / "out"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sft_signal_saves_checkpoint_and_resume_matches(tmp_path, text_file, sft_reference, signum, status):
    config = sft_config(tmp_path, text_file, max_steps=40, save_steps=10)
    out = tmp_path / "out"
    process = start("sft", str(config))
    wait_for(lambda: metric_rows(out) >= 1, process)
    process.send_signal(signum)
    code, stderr = finish(process)
    assert code == status, stderr[-3000:]
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("interrupted:") and f"rlhf sft {config} --resume" in message, message
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    stopped_at = metric_rows(out)
    assert stopped_at < 40 and stopped_at in checkpoints, (stopped_at, checkpoints)
    run_to_end("sft", str(config), "--resume")
    assert comparable(read_metrics(out)) == comparable(read_metrics(sft_reference))
    assert same_weights(out, sft_reference)


@pytest.mark.slow
def test_ppo_sigterm_saves_checkpoint_and_resume_matches(tmp_path):
    ref_config, env = ppo_config(tmp_path / "ref", iterations=4, save_steps=100)
    run_to_end("ppo", str(ref_config), env=env)
    config, env = ppo_config(tmp_path / "cut", iterations=4, save_steps=100)
    out = tmp_path / "cut" / "out"
    process = start("ppo", str(config), env=env)
    # row 0 is the held-out score before training; row 1 is iteration 1
    wait_for(lambda: metric_rows(out) >= 2, process)
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process)
    assert code == 143, stderr[-3000:]
    assert "--resume" in stderr.strip().splitlines()[-1]
    assert any(out.glob("checkpoint-*/trainer_state.json"))
    run_to_end("ppo", str(config), "--resume", env=env)
    ref = tmp_path / "ref" / "out"
    assert comparable(read_metrics(out)) == comparable(read_metrics(ref))
    assert same_weights(out, ref) and same_weights(out, ref, "value_head.safetensors")


# --- SIGKILL, including inside a checkpoint save -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["after-first-checkpoint", "inside-save", "before-any-checkpoint"])
def test_sft_sigkill_and_resume_matches(tmp_path, text_file, sft_reference, moment):
    config = sft_config(tmp_path, text_file, max_steps=40, save_steps=10)
    out = tmp_path / "out"
    env = {"RLHF_TEST_SLOW_SAVE": "30"} if moment == "inside-save" else None
    process = start("sft", str(config), env=env)
    if moment == "after-first-checkpoint":
        wait_for(lambda: (out / "checkpoint-10" / "trainer_state.json").exists(), process)
    elif moment == "inside-save":
        wait_for(lambda: (out / "checkpoint-10.tmp" / "optimizer.pt").exists(), process)
        time.sleep(0.5)
    else:
        wait_for(lambda: metric_rows(out) >= 1, process)
    process.kill()
    finish(process)
    if moment == "inside-save":
        assert (out / "checkpoint-10.tmp").is_dir() and not (out / "checkpoint-10").exists()
    stderr = run_to_end("sft", str(config), "--resume")
    if moment == "inside-save":
        assert "checkpoint-10.tmp" in stderr and "skipping" in stderr
    assert comparable(read_metrics(out)) == comparable(read_metrics(sft_reference))
    assert same_weights(out, sft_reference)


@pytest.mark.slow
def test_ppo_sigkill_inside_save_and_resume_matches(tmp_path):
    ref_config, env = ppo_config(tmp_path / "ref", iterations=4, save_steps=1)
    run_to_end("ppo", str(ref_config), env=env)
    config, env = ppo_config(tmp_path / "cut", iterations=4, save_steps=1)
    out = tmp_path / "cut" / "out"
    # killed after checkpoint-1, then killed again inside the save of checkpoint-2
    process = start("ppo", str(config), env=env)
    wait_for(lambda: (out / "checkpoint-1" / "trainer_state.json").exists(), process)
    process.kill()
    finish(process)
    process = start("ppo", str(config), "--resume", env={**env, "RLHF_TEST_SLOW_SAVE": "30"})
    wait_for(lambda: (out / "checkpoint-2.tmp" / "value_head.safetensors").exists(), process)
    time.sleep(0.5)
    process.kill()
    finish(process)
    assert not (out / "checkpoint-2").exists()
    stderr = run_to_end("ppo", str(config), "--resume", env=env)
    assert "checkpoint-2.tmp" in stderr
    ref = tmp_path / "ref" / "out"
    assert comparable(read_metrics(out)) == comparable(read_metrics(ref))
    assert same_weights(out, ref) and same_weights(out, ref, "value_head.safetensors")


# --- two processes: a signal that reaches one worker stops both after the same step --------------


def torchrun(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rlhf_cli", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the torchrun worker with LOCAL_RANK `rank` (a child of the launcher)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"LOCAL_RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker with LOCAL_RANK={rank} under pid {launcher.pid}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_sft_sigterm_to_one_worker_stops_both_and_resumes(tmp_path, text_file):
    """SIGTERM to rank 1 only: the ranks agree to stop after the same step (no hang), one complete
    checkpoint is written, and `--resume` under torchrun ends as an uninterrupted two-process run."""
    ref_config = sft_config(tmp_path / "ref", text_file, max_steps=30, save_steps=100)
    code, stderr = finish(torchrun("sft", str(ref_config)))
    assert code == 0, stderr[-3000:]
    config = sft_config(tmp_path / "cut", text_file, max_steps=30, save_steps=100)
    out = tmp_path / "cut" / "out"
    launcher = torchrun("sft", str(config))
    wait_for(lambda: metric_rows(out) >= 2, launcher)
    os.kill(worker_pid(launcher, rank=1), signal.SIGTERM)
    code, stderr = finish(launcher, timeout=300)
    assert code != 0 and "Traceback" not in stderr.split("interrupted:")[0], stderr[-3000:]
    assert "SIGTERM received" in stderr and "interrupted:" in stderr, stderr[-3000:]
    checkpoints = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    assert len(checkpoints) == 1 and not list(out.glob("checkpoint-*.tmp")), checkpoints
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert stopped_at < 30 and metric_rows(out) == stopped_at
    code, stderr = finish(torchrun("sft", str(config), "--resume"))
    assert code == 0, stderr[-3000:]
    ref = tmp_path / "ref" / "out"
    assert comparable(read_metrics(out)) == comparable(read_metrics(ref))
    assert same_weights(out, ref)


# --- reward: the same loop as SFT, killed and resumed ----------------------------------------------


def reward_config(folder: Path, pairs_file: Path) -> Path:
    config = {
        "stage": "reward", "model": {"model_name_or_path": TINY},
        "data": {"dataset_name": str(pairs_file), "dataset_test_split": None, "max_length": 32},
        "training": {"output_dir": str(folder / "out"), "max_steps": 30, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 10},
        "reward": {"center_rewards_coefficient": 0.01},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reward.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_reward_sigkill_and_resume_matches(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    words = ["great", "fine", "superb", "lovely", "awful", "dull", "poor", "bad"]
    pairs.write_text("".join(json.dumps({"prompt": f"Film {i} was", "chosen": f" {words[i % 4]} indeed.",
                                         "rejected": f" {words[4 + i % 4]} indeed."}) + "\n" for i in range(80)))
    run_to_end("reward", str(reward_config(tmp_path / "ref", pairs)))
    config = reward_config(tmp_path / "cut", pairs)
    out = tmp_path / "cut" / "out"
    process = start("reward", str(config))
    wait_for(lambda: (out / "checkpoint-10" / "trainer_state.json").exists(), process)
    process.kill()
    finish(process)
    assert metric_rows(out) < 30
    run_to_end("reward", str(config), "--resume")
    ref = tmp_path / "ref" / "out"
    assert comparable(read_metrics(out)) == comparable(read_metrics(ref))
    assert same_weights(out, ref)
