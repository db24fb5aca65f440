"""training/signals.py and the pieces around it, in-process: the flag, the handlers put back, the
resume command the CLI prints, and the warning for a save that never finished."""

import logging
import os
import signal

import pytest

from rlhf_cli.cli import resume_command
from rlhf_cli.errors import Interrupted
from rlhf_cli.training import signals
from rlhf_cli.training.checkpoint_scan import STATE_FILE, list_checkpoints


class OneProcess:
    num_processes = 1


def test_signal_sets_flag_and_restore_puts_handlers_back():
    before = signal.getsignal(signal.SIGTERM)
    signals.install()
    try:
        assert signals.stop_requested(OneProcess()) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_requested(OneProcess()) == signal.SIGTERM
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_stops_at_once():
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.restore()


def test_interrupted_exit_codes_and_message():
    assert Interrupted(signal.SIGTERM, 3, "out/checkpoint-3").exit_code == 143
    err = Interrupted(signal.SIGINT, 3, "out/checkpoint-3")
    assert err.exit_code == 130 and "SIGINT" in str(err) and "out/checkpoint-3" in str(err)


@pytest.mark.parametrize(("argv", "expected"), [
    (["rlhf", "sft", "a.yaml"], "rlhf sft a.yaml --resume"),
    (["rlhf", "ppo", "my config.yaml", "--set", "x.y=1", "--overwrite"], "rlhf ppo 'my config.yaml' --set x.y=1 --resume"),
    (["rlhf", "reward", "a.yaml", "--resume"], "rlhf reward a.yaml --resume"),
    (["rlhf", "run", "recipe.yaml"], "rlhf run recipe.yaml"),
])
def test_resume_command(argv, expected):
    assert resume_command(argv) == expected


def test_unfinished_save_is_reported_and_skipped(tmp_path, caplog):
    # only the listing is tested here; a listed checkpoint with damaged files is tests/training/test_checkpoint.py's
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-6").mkdir()  # no trainer_state.json
    with caplog.at_level(logging.WARNING):
        assert list_checkpoints(tmp_path) == [(2, tmp_path / "checkpoint-2")]
    assert "checkpoint-4.tmp" in caplog.text and "checkpoint-6" in caplog.text
