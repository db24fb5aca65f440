"""Reward-hacking alarms (rlhf_cli/online/alarms.py): the alarm logic on hand-made metric sequences,
then one run through the real CLI that a stopping rule ends, and `rlhf eval`'s line about it."""

import dataclasses
import json
import logging
import random
import textwrap

import pytest
import torch
import yaml

from rlhf_cli.config.loader import build_stage
from rlhf_cli.config.sections import AlarmOptions
from rlhf_cli.errors import UserError
from rlhf_cli.evaluation.report import alarm_lines, table_rows
from rlhf_cli.online.alarms import AlarmMonitor, Observation, describe, observation, read_alarms
from rlhf_cli.online.estimates import Estimate, batch_estimates
from rlhf_cli.training.metrics import read_metrics

LOGGER = "rlhf_cli.online.alarms"


def monitor(**options) -> AlarmMonitor:
    return AlarmMonitor(dataclasses.replace(AlarmOptions(), **options), "ppo")


def feed(alarms: AlarmMonitor, observations, start: int = 1) -> list[dict[str, float]]:
    """The alarm metrics of each iteration, steps numbered from `start`."""
    return [alarms.observe(step, obs) for step, obs in enumerate(observations, start)]


def series(rows: list[dict], name: str) -> list[float]:
    return [row[f"alarm/{name}"] for row in rows]


FLAT = Estimate(0.0, 0.1)


def sampled(rng: random.Random, mean: float, se: float) -> Estimate:
    """One iteration's mean of a reward whose true mean is `mean`, as its batch measures it."""
    return Estimate(rng.gauss(mean, se), se)


def noisy(rng: random.Random, n: int, length=(20.0, 3.0), reward=(0.1, 0.1), gold=(0.1, 0.05), kl=None):
    """n iterations of a run where nothing changes: every quantity is noise around a fixed level."""
    return [Observation(length=rng.gauss(*length), reward=sampled(rng, *reward), kl=None if kl is None else kl(i),
                        monitored={"gold": sampled(rng, *gold)}) for i in range(n)]


# ------------------------------------------------------------------ length collapse


def test_length_collapse_fires_once_and_clears_after_a_window_of_normal_lengths(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    alarms = monitor(alarm_window=3)
    lengths = [30, 29, 31] + [28, 12, 10, 9, 11] + [25, 27, 29, 30]  # baseline 30, collapse, recovery
    rows = feed(alarms, [Observation(length=x, reward=FLAT) for x in lengths])
    # judged from step 6 (2 x alarm_window) on, the mean of the latest 3 steps against half the
    # baseline (15): 16.7, then 10.3 at step 7 (fires), 10; 15 at step 9 is no longer under it, nor
    # are 21 and 27: the third step in a row without the condition (11) clears it
    assert series(rows, "length_collapse") == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert [(e["alarm"], e["event"], e["step"]) for e in alarms.events] == [
        ("length_collapse", "fired", 7), ("length_collapse", "cleared", 11)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "length_collapse at step 7" in warnings[0].getMessage()
    assert "10.3 tokens" in warnings[0].getMessage() and "30.0" in warnings[0].getMessage()
    assert sum("cleared at step 11" in r.getMessage() for r in caplog.records) == 1
    assert alarms.stop is None  # stopping rules are off by default


def test_length_collapse_to_a_tiny_absolute_length():
    """From a 3-token baseline a fall to 1.8 tokens is not under half of it, but it is at most
    alarm_length_tokens; a run that is that short from the start raises nothing."""
    collapsing = monitor(alarm_window=2)
    rows = feed(collapsing, [Observation(length=x, reward=FLAT) for x in (3.0, 3.0, 1.8, 1.8)])
    assert series(rows, "length_collapse") == [0, 0, 0, 1]
    short_from_the_start = monitor(alarm_window=2)
    rows = feed(short_from_the_start, [Observation(length=x, reward=FLAT) for x in (2.0, 1.9, 1.8, 2.0, 1.9)])
    assert series(rows, "length_collapse") == [0] * 5
    off = monitor(alarm_window=2, alarm_length_fraction=0.0, alarm_length_tokens=0.0)
    assert "alarm/length_collapse" not in feed(off, [Observation(length=1.0, reward=FLAT)])[0]


def test_stop_on_length_collapse_stops_where_the_alarm_fires():
    alarms = AlarmMonitor(dataclasses.replace(AlarmOptions(), alarm_window=2, stop_on_length_collapse=True), "rloo")
    feed(alarms, [Observation(length=x, reward=FLAT) for x in (30.0, 30.0, 30.0, 20.0)])
    assert alarms.stop is None  # 25 is not under 15
    alarms.observe(5, Observation(length=3.0, reward=FLAT))
    assert alarms.stop == {"step": 5, "rule": "rloo.stop_on_length_collapse",
                           "reason": "mean response length 11.5 tokens over the latest 2 iterations, down from 30.0 in the first 2"}


# ------------------------------------------------------------------ KL


def test_kl_alarm_on_the_windowed_mean_and_the_stop_rule():
    alarms = monitor(alarm_window=2, alarm_kl=5.0, stop_on_kl=8.0)
    kls = [0.0, 2.0, 4.0, 7.0, 8.0, 9.0, 10.0]
    rows = feed(alarms, [Observation(length=20.0, reward=FLAT, kl=k) for k in kls])
    # means of the latest 2: 0, 1, 3, 5.5 (> 5: fires at step 4), 7.5, 8.5 (> 8: the stop rule at step 6)
    assert series(rows, "kl")[:4] == [0, 0, 0, 1]
    assert alarms.stop == {"step": 6, "rule": "ppo.stop_on_kl",
                           "reason": "mean KL 8.5 nats per response over the latest 2 iterations > 8"}
    no_reference = feed(monitor(), [Observation(length=20.0, reward=FLAT, kl=None)])  # GRPO with beta 0
    assert "alarm/kl" not in no_reference[0]


# ------------------------------------------------------------------ reward divergence


def run(rng: random.Random, n: int, reward, gold, **options) -> AlarmMonitor:
    """A monitor fed n iterations whose true reward and gold means are reward(i), gold(i) (i from 0),
    measured with the noise of a batch of 64 (standard errors 0.1 and 0.05)."""
    alarms = monitor(**options)
    feed(alarms, [Observation(length=20.0, reward=sampled(rng, reward(i), 0.1), monitored={"gold": sampled(rng, gold(i), 0.05)})
                  for i in range(n)])
    return alarms


def fired(alarms: AlarmMonitor, name: str = "reward_divergence") -> list[dict]:
    return [e for e in alarms.events if e["alarm"] == name and e["event"] == "fired"]


def test_divergence_when_the_optimised_reward_rises_and_the_monitored_one_does_not():
    alarms = run(random.Random(0), 20, reward=lambda i: 0.1 + 0.1 * max(i - 4, 0), gold=lambda i: 0.1,
                 stop_on_reward_divergence=True)
    (event,) = fired(alarms)
    assert 10 <= event["step"] <= 20  # judged from step 10 (2 x alarm_window) on
    assert "since the first 5 iterations while the monitored gold went" in event["detail"]
    assert alarms.stop == {"step": event["step"], "rule": "ppo.stop_on_reward_divergence", "reason": event["detail"]}


def test_divergence_when_the_monitored_one_falls_from_its_best_while_the_optimised_holds():
    """Over-optimisation: the gold score rises with the reward, then falls while the reward holds."""
    alarms = run(random.Random(1), 40, reward=lambda i: 0.1 + 0.1 * min(i, 15),
                 gold=lambda i: 0.05 + 0.04 * min(i, 12) - 0.04 * max(i - 20, 0))
    (event,) = fired(alarms)
    assert 25 <= event["step"] <= 40
    assert event["detail"].startswith("the monitored gold fell from") and "while the optimised reward held" in event["detail"]


@pytest.mark.parametrize("gold", [lambda i: 0.05 * min(i, 20), lambda i: 0.025 * min(i, 20)],
                         ids=["gold rises half as much", "gold rises a quarter as much"])
def test_no_divergence_when_both_rise_and_plateau(gold):
    """Both rise (in their own noise units the gold by half or a quarter of the reward's), then plateau
    for 280 iterations: the highest of many noisy gold windows does not count as a peak it fell from."""
    for seed in range(5):
        alarms = run(random.Random(seed), 300, reward=lambda i: 0.1 * min(i, 20), gold=gold)
        assert fired(alarms) == [], seed


def test_nothing_fires_on_noise():
    """Fifty seeds of 60 noisy iterations each, every quantity at a fixed level: no alarm at all."""
    for seed in range(50):
        alarms = monitor()
        rng = random.Random(seed)
        feed(alarms, noisy(rng, 60, length=(20.0, 4.0), kl=lambda i, r=rng: r.uniform(2.0, 6.0)))
        assert alarms.events == [], (seed, alarms.events)


def test_a_divergence_that_lasts_warns_once():
    """The reward climbs for 30 iterations while the gold stays flat, then both stay put: one warning
    over 300 iterations, however the gold's noise swings around the firing margin."""
    for seed in range(5):
        alarms = run(random.Random(seed), 300, reward=lambda i: 0.1 + 0.02 * min(i, 30), gold=lambda i: 0.05)
        assert len(fired(alarms)) == 1 and [e["event"] for e in alarms.events] == ["fired"], (seed, alarms.events)


# ------------------------------------------------------------------ plumbing


def test_a_resumed_monitor_continues_exactly():
    rng = random.Random(3)
    observations = noisy(rng, 6) + [Observation(length=4.0, reward=Estimate(1.0, 0.1), monitored={"gold": FLAT})] * 6
    whole = monitor(alarm_window=3)
    expected = feed(whole, observations)
    first = monitor(alarm_window=3)
    feed(first, observations[:7])
    resumed = monitor(alarm_window=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as the checkpoint stores it
    assert expected[7:] == feed(resumed, observations[7:], start=8)
    assert resumed.events == whole.events


def test_observation_reads_ppo_and_group_statistics():
    ppo = observation({"objective/kl": 3.0}, length=10.0, reward=FLAT, monitored={"gold": FLAT})
    assert ppo == Observation(length=10.0, reward=FLAT, kl=3.0, monitored={"gold": FLAT})
    grpo = observation({"kl": 0.25}, length=12.0, reward=FLAT, monitored={})  # per token x tokens per response
    assert grpo.kl == 3.0
    assert observation({}, length=12.0, reward=FLAT, monitored={}).kl is None  # no reference


def test_batch_estimates(one_process):
    scores, gold = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.zeros(4)
    (mean, se), zero = batch_estimates([scores, gold], one_process.accelerator)
    assert mean == pytest.approx(3.0) and se == pytest.approx(scores.std().item() / 2)
    assert zero == Estimate(0.0, 0.0)


@pytest.mark.parametrize("stage, options, reward, message", [
    ("grpo", {"stop_on_kl": 1.0, "beta": 0.0}, {"function": "builtin:sentiment"}, "grpo.beta is 0"),
    ("ppo", {"stop_on_reward_divergence": True}, {"function": "builtin:sentiment"}, "weight: 0"),
    ("ppo", {"stop_on_length_collapse": True, "alarm_length_fraction": 0.0, "alarm_length_tokens": 0.0},
     {"function": "builtin:sentiment"}, "the length alarm is off"),
])
def test_a_stop_rule_that_could_never_fire_is_refused(stage, options, reward, message):
    with pytest.raises(UserError, match=message):
        build_stage(stage, {"stage": stage, "reward": reward, stage: options})


def test_eval_report_lines():
    record = {"alarm_window": 5, "stopped": {"step": 9, "rule": "ppo.stop_on_length_collapse", "reason": "mean response length 3.1 tokens"},
              "events": [{"alarm": "length_collapse", "event": "fired", "step": 9, "detail": "..."},
                         {"alarm": "kl", "event": "fired", "step": 12, "detail": "..."},
                         {"alarm": "kl", "event": "cleared", "step": 20}]}
    assert describe(record) == ("length_collapse at step 9, kl at step 12; stopped at step 9 by "
                                "ppo.stop_on_length_collapse (mean response length 3.1 tokens)")
    report = {"settings": {"reward_sources": [], "baseline_model": None, "reference_model": None,
                           "perplexity_dataset": None},
              "models": {"sft": {"training_alarms": None}, "ppo": {"training_alarms": record},
                         "calm": {"training_alarms": {"events": [], "stopped": None}}}}
    for model in report["models"].values():
        model.update(response_length=1.0, stop_rate=1.0, distinct_1=1.0, distinct_2=1.0)
    assert dict(table_rows(report))["training alarms"] == ["-", "length_collapse@9, kl@12, stopped@9", "none"]
    assert alarm_lines(report) == [f"ppo: reward-hacking alarms during training: {describe(record)}"]


# ------------------------------------------------------------------ through the CLI


def test_a_stop_rule_ends_the_run_cleanly_and_eval_reports_it(monkeypatch, capsys, tmp_path):
    from conftest import run_in_process

    out = tmp_path / "ppo"
    (tmp_path / "ppo.yaml").write_text(textwrap.dedent(f"""\
        stage: ppo
        model:
          model_name_or_path: builtin:tiny-gpt2
        data:
          dataset_name: builtin:review-prompts
          max_eval_samples: 4
        generation:
          response_length: 6
        reward:
          sources:
            - function: builtin:sentiment
            - function: builtin:sentiment
              weight: 0
        training:
          output_dir: {out}
          learning_rate: 1e-3
          per_device_train_batch_size: 4
          logging_steps: 1
          save_steps: 100
        ppo:
          total_episodes: 40
          num_ppo_epochs: 1
          stop_on_kl: 1.0e-6
        """))
    code, stderr = run_in_process(monkeypatch, capsys, "ppo", str(tmp_path / "ppo.yaml"))
    assert code == 0, stderr[-3000:]
    # iteration 1 has KL ~0 (the policy is the reference); the updates move it: stopped long before step 10
    stop = read_alarms(out)["stopped"]
    step = stop["step"]
    assert stop["rule"] == "ppo.stop_on_kl" and 2 <= step < 10
    assert f"stopping after step {step}: ppo.stop_on_kl" in stderr
    assert f"reward-hacking alarms in this run: none; stopped at step {step} by ppo.stop_on_kl" in stderr
    rows = read_metrics(out)
    train = [r for r in rows if "objective/kl" in r]
    assert [r["step"] for r in train] == list(range(1, step + 1))
    assert all("alarm/length_collapse" in r and "alarm/kl" in r and "alarm/reward_divergence" in r for r in train)
    assert rows[-1]["step"] == step and "eval/scores" in rows[-1]  # the normal end: held-out score, saves
    for name in ("model.safetensors", "value_head.safetensors", f"checkpoint-{step}"):
        assert (out / name).exists(), name

    # `rlhf eval` of that folder prints the line (its stage function, so that the test reads stdout)
    from rlhf_cli.stages.eval import run as run_eval

    run_eval(build_stage("eval", yaml.safe_load(textwrap.dedent(f"""\
        stage: eval
        eval:
          models: [{out}]
          num_prompts: 2
          plots: false
          output_dir: {tmp_path / 'eval'}
        data:
          dataset_name: builtin:review-prompts
        generation:
          response_length: 4
        reward:
          function: builtin:sentiment
        """))))
    printed = capsys.readouterr().out
    assert "training alarms" in printed and f"stopped@{step}" in printed
    assert f"ppo: reward-hacking alarms during training: none; stopped at step {step} by ppo.stop_on_kl" in printed
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["models"]["ppo"]["training_alarms"]["stopped"]["step"] == step
