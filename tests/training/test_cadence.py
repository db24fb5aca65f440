"""training/cadence.py: the run skeleton every loop shares -- what happens after each step, and that
every way out (done, a stop signal, a fault) puts the signal handlers back."""

import os
import signal
from types import SimpleNamespace

import pytest

from rlhf_cli.errors import Interrupted, UserError
from rlhf_cli.training.cadence import RunCadence


class Recorder:
    def __init__(self):
        self.events = []

    def log(self, step, row):
        self.events.append(("log", step))

    def update(self, step, metrics=None, log_line=False):
        self.events.append(("show", step, log_line))

    def close(self):
        self.events.append(("close",))


def cadence(total=6, **training):
    record = Recorder()
    settings = SimpleNamespace(**{"logging_steps": 2, "eval_steps": 3, "save_steps": 4, **training})
    c = RunCadence(total=total, training=settings, accelerator=SimpleNamespace(num_processes=1),
                   metrics=record, progress=record, save=lambda s: record.events.append(("save", s)) or f"ckpt-{s}",
                   evaluate=lambda s: record.events.append(("eval", s)))
    return c, record


def test_log_evaluate_and_save_when_due_but_not_after_the_last_step():
    before = signal.getsignal(signal.SIGTERM)
    c, record = cadence()
    for step in range(1, 7):
        c.after_step(step, {"x": 1.0} if c.log_due(step) else None)
    c.close()
    assert [e for e in record.events if e[0] in ("log", "eval", "save")] == [
        ("log", 2), ("eval", 3), ("log", 4), ("save", 4), ("log", 6)]  # step 6: the caller's final eval/save
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_signal_saves_and_raises_with_the_handlers_put_back():
    before = signal.getsignal(signal.SIGTERM)
    c, record = cadence()
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        c.after_step(1, None)
    assert ("save", 1) in record.events and "ckpt-1" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_fault_tears_down_before_the_error():
    before = signal.getsignal(signal.SIGTERM)
    c, record = cadence()
    error = c.fail("step 1: the loss is nan")
    assert isinstance(error, UserError) and record.events[-1] == ("close",)
    assert signal.getsignal(signal.SIGTERM) is before
