"""Reward-hacking alarms of the online stages (ppo, grpo, rloo): a warning while it happens, and
optional stopping rules, for three signs that a policy exploits its reward instead of improving
(docs/ppo.md, Reward hacking alarms):

- length collapse: the mean response length falls below `alarm_length_fraction` of the baseline's,
  or to `alarm_length_tokens` tokens from a longer baseline (a reward model that never saw two-token
  replies may score them high);
- KL: the mean KL to the reference, nats per response, exceeds `alarm_kl` (the policy has left the
  text it started from);
- reward divergence: the optimised reward and a monitored source (a `weight: 0` reward source, e.g.
  the gold scorer) part ways.

What is compared. Each quantity is one number per iteration, already averaged over the rollout batch
and every process, so every process reaches the same verdicts and stops after the same iteration.
With W = `alarm_window`, a *window* is W consecutive iterations:

    baseline  iterations 1..W (the policy as it started)
    recent    the latest W iterations; the length and divergence alarms are judged from iteration 2W
              on (recent and baseline never overlap, and neither is one noisy iteration)
    recent KL the latest min(W, n) iterations, n the iterations so far (it needs no baseline)

Divergence, precisely. A reward's window has a mean (of its iteration means) and a noise: se^2, the
window's mean squared standard error of one iteration's mean (the responses' variance / their
number). The change from window a to window b in standard errors is

    z(a -> b) = (mean_b - mean_a) / sqrt((se_a^2 + se_b^2) / W)

With s = `alarm_divergence_sigma`, z = z(baseline -> recent) of the optimised reward and z_m that of a
monitored source, the alarm fires for that source when either

    rose without it   z >= s, and z_m <= z / 4 - 2: the monitored rise falls 2 standard errors short
                      of a quarter of the optimised one (each measured in its own noise, so the
                      quarter compares effect sizes: the responses' std cancels)
    fell from its best   the monitored source's best earlier window P (the highest of the windows that
                      end before the recent one starts) stood z >= s above the baseline, and it fell
                      back, z(P -> recent) <= -(s + sqrt(ln N)), while the optimised reward held,
                      z(P -> recent) > -1 for it; N is the number of disjoint windows P was chosen
                      among (the highest of N noisy windows overstates its level by about sqrt(ln N))

The second is reward over-optimisation as Gao et al. (2022) measured it: the gold score peaks and
falls while the proxy keeps rising. Why this is robust on small batches: the noise comes from every
response of a window (W x batch values), not from the spread of W iteration means (a handful of
values, which underestimates it often enough to cry wolf); each reward is measured in its own
standard errors, so a reward model's logits and VADER's [-1, 1] compare without a scale; a margin of
standard errors, not a sign, decides "did not follow", so a monitored source that rises a little
less than the optimised one does not trip it by noise. Once on, it clears only when the run is
clearly healthy again (z < s / 2, or z_m >= z / 2): a monitored source that hovers around the firing
margin warns once, not on and off. In simulations with the defaults (W = 5, s = 4; per
iteration noise as a batch of 64 gives), no run of 60 or 300 iterations raised it when nothing
changed, or when both rewards rose, plateaued or not; 2-3% did when the monitored source rose only
half as much as the optimised one in noise units and both barely moved (z ~ 3 and 2).

Once on, an alarm stays on until the run has been clearly healthy for it W iterations in a row:
noise around a threshold gives one warning and one clearing line, not one per iteration. Metrics
`alarm/<name>` (1 while on, 0 otherwise) go to every logged row; `alarms.json` in the output folder
records when each alarm fired and cleared and why a run stopped, for `rlhf eval`'s report.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from rlhf_cli.online.estimates import Estimate, Span, change

log = logging.getLogger(__name__)

FILE = "alarms.json"
HOLDS = 1.0  # standard errors the optimised reward may lose and still count as holding its level
FOLLOWS_FRACTION = 0.25  # a monitored source that follows rises at least this fraction of the optimised one's z
SHORTFALL = 2.0  # standard errors by which the monitored rise must miss that fraction (noise alone rarely does)
CLEARS_FRACTION = 0.5  # it clears once the monitored rise reaches this fraction, or the optimised falls under s x it


class Verdict(NamedTuple):
    """An alarm's condition this iteration: why it should fire (None: it should not), and whether the run
    looks clearly healthy for it (an alarm that is on clears only after W such iterations in a row)."""

    why: str | None
    healthy: bool


def verdict(why: str | None) -> Verdict:
    """A condition without a dead band: healthy whenever it should not fire."""
    return Verdict(why, why is None)


@dataclass
class Observation:
    """One iteration, averaged over the rollout and every process."""

    length: float  # mean response tokens (stop token included)
    reward: Estimate  # the optimised score (the weighted sum of the reward sources)
    kl: float | None = None  # mean KL to the reference, nats per response; None without a reference
    monitored: dict[str, Estimate] = field(default_factory=dict)  # each weight-0 source, by name


def observation(stats: dict[str, float], length: float, reward: Estimate, monitored: dict[str, Estimate]) -> Observation:
    """An iteration's Observation. The KL comes from its logged statistics: PPO logs it per response
    (`objective/kl`); GRPO and RLOO log it per token (`kl`: the rollout's summed KL / its response
    tokens), which times the mean response length (tokens / responses) is the same per-response figure."""
    kl = stats.get("objective/kl")
    if kl is None and "kl" in stats:
        kl = stats["kl"] * length
    return Observation(length, reward, kl, monitored)


class AlarmMonitor:
    """`observe(step, observation)` after every iteration -> the `alarm/*` metrics; `stop` is set (a
    dict: step, rule, reason) once a stopping rule triggers. `options`: the stage's section
    (config/sections.py: AlarmOptions); `section`: its key (`ppo`, `grpo`, `rloo`), for messages."""

    def __init__(self, options, section: str):
        self.options, self.section, self.window = options, section, options.alarm_window
        self.count = 0
        self.first: dict[str, list[float]] = {}  # series -> its first W values (the baseline)
        self.last: dict[str, list[float]] = {}  # series -> its latest 2W values (recent, and the window before)
        self.best: dict[str, dict] = {}  # monitored source -> its best earlier window: step, its Span and the reward's
        self.on: dict[str, bool] = {}
        self.quiet: dict[str, int] = {}  # iterations in a row an alarm that is on saw the run clearly healthy
        self.events: list[dict] = []
        self.stop: dict | None = None

    # ------------------------------------------------------------------ per iteration

    def observe(self, step: int, obs: Observation) -> dict[str, float]:
        self._record(step, obs)
        metrics = {}
        for name, condition in self._conditions().items():
            self._update(name, condition, step)
            metrics[f"alarm/{name}"] = float(self.on[name])
        if self.stop is None:
            self.stop = self._stop_rule(step)
        return metrics

    def _record(self, step: int, obs: Observation) -> None:
        """Append the iteration to every series; a reward is two: its mean, and `se2/` its squared error."""
        rewards = {"reward": obs.reward, **{f"monitored/{name}": e for name, e in obs.monitored.items()}}
        series = {"length": obs.length, "kl": obs.kl, **{key: e.mean for key, e in rewards.items()},
                  **{f"se2/{key}": e.se ** 2 for key, e in rewards.items()}}
        self.count += 1
        for key, value in series.items():
            if value is None:
                continue
            if len(self.first.setdefault(key, [])) < self.window:
                self.first[key].append(value)
            self.last[key] = (self.last.get(key, []) + [value])[-2 * self.window:]
        if self.count >= 2 * self.window:  # the window before the recent one is complete: a candidate best
            for key in rewards:
                previous = self._span(key, "previous")
                if key != "reward" and (key not in self.best or previous.mean > self.best[key]["span"][0]):
                    self.best[key] = {"step": step - self.window, "span": list(previous),
                                      "reward": list(self._span("reward", "previous"))}

    def _span(self, key: str, which: str) -> Span:
        """A reward's `baseline`, `recent` or `previous` (the W iterations before the recent) window."""
        W = self.window
        means, errors = {
            "baseline": (self.first[key], self.first[f"se2/{key}"]),
            "recent": (self.last[key][-W:], self.last[f"se2/{key}"][-W:]),
            "previous": (self.last[key][-2 * W:-W], self.last[f"se2/{key}"][-2 * W:-W]),
        }[which]
        return Span(statistics.fmean(means), statistics.fmean(errors))

    def _recent(self, key: str) -> float | None:
        """The mean of a series' latest W values (fewer at the start: the KL), None before it has any."""
        values = self.last.get(key, [])[-self.window:]
        return statistics.fmean(values) if values else None

    def _conditions(self) -> dict[str, Verdict]:
        """The verdict of each alarm that is configured and has its numbers."""
        o, judged = self.options, self.count >= 2 * self.window
        out = {}
        if o.alarm_length_fraction > 0 or o.alarm_length_tokens > 0:
            out["length_collapse"] = verdict(self._length() if judged else None)
        if o.alarm_kl is not None and "kl" in self.last:
            kl = self._recent("kl")
            out["kl"] = verdict(f"mean KL {kl:.3g} nats per response over the latest {min(self.count, self.window)} "
                                f"iterations > alarm_kl {o.alarm_kl:g}" if kl > o.alarm_kl else None)
        monitored = [key for key in self.first if key.startswith("monitored/")]
        if o.alarm_divergence_sigma is not None and monitored:
            sources = [self._divergence(key) for key in monitored] if judged else [verdict(None)]
            out["reward_divergence"] = Verdict(next((v.why for v in sources if v.why), None),
                                               all(v.healthy for v in sources))
        return out

    def _length(self) -> str | None:
        o, base, recent = self.options, statistics.fmean(self.first["length"]), self._recent("length")
        short = recent < o.alarm_length_fraction * base
        tiny = o.alarm_length_tokens > 0 and recent <= o.alarm_length_tokens < base
        if not (short or tiny):
            return None
        return (f"mean response length {recent:.1f} tokens over the latest {self.window} iterations, down from "
                f"{base:.1f} in the first {self.window}")

    def _divergence(self, key: str) -> Verdict:
        """Whether the optimised reward and monitored source `key` have parted (module docstring); clearly
        healthy: the optimised reward rose less than s / 2, or the monitored rise reaches half of it."""
        s, W, name = self.options.alarm_divergence_sigma, self.window, key.removeprefix("monitored/")
        reward = (self._span("reward", "baseline"), self._span("reward", "recent"))
        monitored = (self._span(key, "baseline"), self._span(key, "recent"))
        z, z_m = change(*reward, W), change(*monitored, W)
        if z >= s and z_m - z * FOLLOWS_FRACTION <= -SHORTFALL:
            return verdict(f"optimised reward {reward[0].mean:.3g} -> {reward[1].mean:.3g} ({z:+.1f} sigma) since the first "
                    f"{W} iterations while the monitored {name} went {monitored[0].mean:.3g} -> "
                    f"{monitored[1].mean:.3g} ({z_m:+.1f} sigma)")
        healthy = z < s * CLEARS_FRACTION or z_m >= z * CLEARS_FRACTION
        best = self.best.get(key)
        if best is None:
            return Verdict(None, healthy)
        peak, peak_reward = Span(*best["span"]), Span(*best["reward"])
        rise, fall, held = change(monitored[0], peak, W), change(peak, monitored[1], W), change(peak_reward, reward[1], W)
        # the highest of N noisy windows stands about sqrt(2 ln N) window errors (sqrt(ln N) in z) above its true level
        chosen_among = max((self.count - W) / W, 1.0)  # disjoint windows before the recent one
        if rise >= s and fall <= -(s + math.sqrt(math.log(chosen_among))) and held > -HOLDS:
            first_step = best["step"] - W + 1
            return verdict(f"the monitored {name} fell from {peak.mean:.3g} (steps {first_step}-{best['step']}) to "
                    f"{monitored[1].mean:.3g} ({fall:+.1f} sigma) while the optimised reward held: "
                    f"{peak_reward.mean:.3g} -> {reward[1].mean:.3g} ({held:+.1f} sigma)")
        return Verdict(None, healthy)

    def _update(self, name: str, condition: Verdict, step: int) -> None:
        """Fire at once; clear after W clearly healthy iterations in a row; log each change once."""
        was_on = self.on.get(name, False)
        if condition.why is not None:
            self.quiet[name] = 0
            if not was_on:
                self.on[name] = True
                self.events.append({"alarm": name, "event": "fired", "step": step, "detail": condition.why})
                log.warning("reward-hacking alarm %s at step %d: %s", name, step, condition.why)
            return
        self.on.setdefault(name, False)
        if was_on:
            self.quiet[name] = self.quiet.get(name, 0) + 1 if condition.healthy else 0
            if self.quiet[name] >= self.window:
                self.on[name] = False
                self.events.append({"alarm": name, "event": "cleared", "step": step})
                log.info("reward-hacking alarm %s cleared at step %d (%d iterations without it)", name, step,
                         self.window)

    def _stop_rule(self, step: int) -> dict | None:
        o, rule = self.options, None
        kl = self._recent("kl")
        if o.stop_on_kl is not None and kl is not None and kl > o.stop_on_kl:
            rule = "stop_on_kl"
            reason = (f"mean KL {kl:.3g} nats per response over the latest {min(self.count, self.window)} "
                      f"iterations > {o.stop_on_kl:g}")
        elif o.stop_on_length_collapse and self.on.get("length_collapse"):
            rule, reason = "stop_on_length_collapse", self._why("length_collapse")
        elif o.stop_on_reward_divergence and self.on.get("reward_divergence"):
            rule, reason = "stop_on_reward_divergence", self._why("reward_divergence")
        if rule is None:
            return None
        return {"step": step, "rule": f"{self.section}.{rule}", "reason": reason}

    def _why(self, name: str) -> str:
        """The numbers with which an alarm that is on fired."""
        return next(e["detail"] for e in reversed(self.events) if e["alarm"] == name and e["event"] == "fired")

    # ------------------------------------------------------------------ summary and checkpoint state

    def summary(self) -> dict:
        return {"alarm_window": self.window, "events": self.events, "stopped": self.stop}

    def write(self, folder: Path) -> None:
        (Path(folder) / FILE).write_text(json.dumps(self.summary(), indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"count": self.count, "first": self.first, "last": self.last, "best": self.best, "on": self.on,
                "quiet": self.quiet, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.first, self.last, self.best = state["count"], state["first"], state["last"], state["best"]
        self.on, self.quiet, self.events = state["on"], state["quiet"], state["events"]


def read_alarms(folder: str | Path) -> dict | None:
    """The alarms.json of a run's output folder, or None (not an online run, or one from before alarms)."""
    path = Path(folder) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def describe(record: dict) -> str:
    """One line: which alarms fired at which step, and the stopping rule that ended the run."""
    fired = [f"{e['alarm']} at step {e['step']}" for e in record["events"] if e["event"] == "fired"]
    text = ", ".join(fired) if fired else "none"
    stop = record.get("stopped")
    if stop:
        text += f"; stopped at step {stop['step']} by {stop['rule']} ({stop['reason']})"
    return text
