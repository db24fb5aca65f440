"""`rlhf run RECIPE`: plan what each stage needs (skip, resume, run), then run the stages in order.

The rules (docs/recipes.md):
- A stage that returned gets `<folder>/stage_complete.json` (its config hash, a run id, and the run
  ids of the stages before it). On a re-run it is skipped while its resolved config and the stages
  before it are unchanged.
- A folder that holds a run but no marker was interrupted: the stage resumes (`--resume`) from its
  latest checkpoint, provided its config is unchanged.
- `--from NAME` deletes the folders of NAME and every later stage first, then runs them from scratch.
- `--until NAME` stops after NAME: the later stages are neither planned nor run (their configs are still checked).
- A finished (or interrupted) stage whose config changed, or that comes after a stage that runs
  again, is never deleted on its own: the run stops before anything runs and says which `--from`
  reruns it.

Stages run in this process, through the same `run(config)` the subcommands call, so
`accelerate launch -m rlhf_cli run RECIPE` / `torchrun ... run RECIPE` runs every stage data-parallel.
Between stages the accelerate state and the environment variables are reset (a fresh Accelerator per stage,
what a stage set in os.environ gone with it); the process group of a
many-process launch lives until the last stage.
"""

import contextlib
import gc
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from rlhf_cli.config.loader import to_dict
from rlhf_cli.config.schema import STAGES
from rlhf_cli.errors import UserError
from rlhf_cli.recipe.spec import Recipe, RecipeStage, load_recipe
from rlhf_cli.training.checkpoint_scan import latest_checkpoint
from rlhf_cli.training.output import config_hash, holds_run
from rlhf_cli.training.progress import setup_logging

log = logging.getLogger(__name__)

MARKER = "stage_complete.json"
SUMMARY = "recipe_runs.jsonl"
StageRunner = Callable[[str, Any, bool, bool], None]  # (command, config, resume, overwrite)


@dataclass
class Step:
    stage: RecipeStage
    action: str  # skip | run | resume (an interrupted run, from its checkpoint) | restart (replace its folder)
    reason: str


# ---------------------------------------------------------------------------------------------
# Markers
# ---------------------------------------------------------------------------------------------


def read_marker(folder: Path) -> dict | None:
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; the stage counts as unfinished", path)
        return None


def write_marker(stage: RecipeStage, upstream: dict[str, str], seconds: float, resumed: bool, cpu_seconds: float = 0.0) -> dict:
    marker = {
        "stage": stage.name,
        "command": stage.command,
        "config_hash": config_hash(stage.command, stage.config),
        "run_id": uuid.uuid4().hex,
        "upstream": upstream,  # the run ids of the stages before this one, when it ran
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),  # wall time of this (last) run of the stage
        "cpu_seconds": round(cpu_seconds, 1),  # CPU time of this process (all its threads) in that run
        "resumed": resumed,
    }
    (stage.output_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def config_differences(stage: RecipeStage) -> list[str] | None:
    """`key: old -> new` for every key whose value differs between the folder's config.yaml and the
    recipe's config now; None when there is no readable config.yaml. Keys that only one side has (a
    key added or removed by another version of rlhf) do not count: a version upgrade is no change."""
    try:
        old = _flatten(yaml.safe_load((stage.output_dir / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return None
    new = _flatten(json.loads(json.dumps(to_dict(stage.command, stage.config), default=str)))
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def changed(stage: RecipeStage, recorded_hash: str | None) -> str | None:
    """None when the stage's folder holds this same config, else a description of what changed."""
    diffs = config_differences(stage)
    if diffs is None:  # no config.yaml to compare with: fall back to the recorded hash
        return None if recorded_hash in (None, config_hash(stage.command, stage.config)) else ""
    if not diffs:
        return None
    more = f", and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return f" ({'; '.join(diffs[:3])}{more})"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _run_info_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / "run_info.json").read_text()).get("config_hash")
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# The plan: what each stage needs, decided (and refused) before anything runs
# ---------------------------------------------------------------------------------------------


def plan(recipe: Recipe, from_stage: str | None = None, until: str | None = None) -> list[Step]:
    """What each stage up to `until` (every stage if None) needs; the later ones are not looked at."""
    names = recipe.names()
    for option, name in (("--from", from_stage), ("--until", until)):
        if name is not None and name not in names:
            raise UserError(f"{option} {name}: the recipe has no such stage; its stages are: {', '.join(names)}.")
    start = names.index(from_stage) if from_stage is not None else len(names)
    stop = names.index(until) + 1 if until is not None else len(names)
    if from_stage is not None and start >= stop:
        raise UserError(f"--from {from_stage} --until {until}: stage {from_stage!r} comes after {until!r}; nothing would run.")
    steps: list[Step] = []
    runs_again: str | None = None  # the first stage that (re)runs: every later one must run after it
    markers: dict[str, dict] = {}
    for i, stage in enumerate(recipe.stages[:stop]):
        folder = stage.output_dir
        if i >= start:
            steps.append(Step(stage, "run", f"--from {from_stage}: runs again from scratch"))
            runs_again = runs_again or stage.name
            continue
        marker = read_marker(folder)
        if marker is not None:
            recorded = marker.get("upstream", {})
            difference = changed(stage, marker.get("config_hash"))
            if difference is not None:
                raise _conflict(recipe, stage, f"finished earlier with another config{difference}")
            if runs_again is not None:
                raise _conflict(recipe, stage, f"finished earlier, but stage {runs_again!r} before it runs again now",
                                rerun=runs_again)
            stale = [n for n in recorded if markers.get(n, {}).get("run_id") != recorded[n]]
            if stale or set(recorded) != set(markers):
                raise _conflict(recipe, stage, f"finished after another run of stage {(stale or list(markers))[0]!r} "
                                               "than the one in its folder now")
            markers[stage.name] = marker
            steps.append(Step(stage, "skip", f"finished {marker.get('finished_at', 'earlier')}"))
        elif folder.is_dir() and holds_run(folder):
            difference = changed(stage, _run_info_hash(folder))
            if difference is None:
                steps.append(Step(stage, "resume", "interrupted: continues from its latest checkpoint"))
            elif latest_checkpoint(folder) is None:
                steps.append(Step(stage, "restart", f"interrupted before its first checkpoint; config changed{difference}"))
            else:
                raise _conflict(recipe, stage, f"was interrupted, and its config has changed since{difference}")
            runs_again = runs_again or stage.name
        else:
            steps.append(Step(stage, "run", "not run yet"))
            runs_again = runs_again or stage.name
    return steps


def _conflict(recipe: Recipe, stage: RecipeStage, what: str, rerun: str | None = None) -> UserError:
    rerun = rerun or stage.name
    return UserError(
        f"{recipe.path}: stage {stage.name!r} ({stage.output_dir}) {what}. Nothing was run. To replace it, rerun "
        f"from there: rlhf run {recipe.path} --from {rerun} (or put the earlier config back, or choose another --output-dir)."
    )


# ---------------------------------------------------------------------------------------------
# Running stages one after another in this process
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stage_session():
    """The process group (of a many-process launch) for the whole recipe, a fresh accelerate state and the
    recipe's environment variables per stage.

    Yields (is_main_process, barrier, fresh_state, world size)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from rlhf_cli.stages import common

    state = PartialState(cpu=not torch.cuda.is_available())
    keep = common.KEEP_PROCESS_GROUP
    common.KEEP_PROCESS_GROUP = True  # finish_run leaves the process group to us
    environment = dict(os.environ)

    def fresh_state() -> None:
        # what a stage set in the environment goes with it: a vLLM stage of a one-process recipe sets RANK,
        # LOCAL_RANK, WORLD_SIZE and MASTER_* for its engine (lm/vllm_sampler.py), which the later stages and
        # any process they start would read as a launcher's ("cpu:0", a taken port)
        os.environ.clear()
        os.environ.update(environment)
        AcceleratorState._reset_state(reset_partial_state=False)  # the next stage builds its own Accelerator
        GradientState._reset_state()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    try:
        yield state.is_main_process, state.wait_for_everyone, fresh_state, state.num_processes
    finally:
        common.KEEP_PROCESS_GROUP = keep
        fresh_state()
        state.destroy_process_group()


def describe(recipe: Recipe, steps: list[Step]) -> str:
    width = max(len(stage.name) for stage in recipe.stages)
    lines = [f"recipe {recipe.path}: {len(recipe.stages)} stages -> {recipe.output_dir}"]
    for step in steps:
        lines.append(f"  {step.stage.name:<{width}}  rlhf {step.stage.command:<6}  {step.action:<6}  {step.reason}")
    for stage in recipe.stages[len(steps):]:  # after --until
        lines.append(f"  {stage.name:<{width}}  rlhf {stage.command:<6}  {'-':<6}  not run: after --until {steps[-1].stage.name}")
    return "\n".join(lines)


def run_recipe(
    path: str | Path,
    execute: StageRunner,
    output_dir: str | Path | None = None,
    from_stage: str | None = None,
    dry_run: bool = False,
    overrides: list[str] | None = None,
    until: str | None = None,
) -> list[Step]:
    """Validate the whole recipe, plan, then run each stage (up to `until`) that needs it. Returns the plan."""
    # 1. Every stage's config (with overrides and placeholders), and what each stage up to `until` needs
    recipe = load_recipe(path, output_dir, overrides)
    steps = plan(recipe, from_stage, until)
    if dry_run:
        print(describe(recipe, steps))
        return steps

    with stage_session() as (is_main, barrier, fresh_state, world):
        setup_logging(is_main)
        for line in describe(recipe, steps).splitlines():
            log.info("%s", line)
        # 2. --from: the folders of that stage and every later one go first (no stale marker survives)
        if is_main:
            for step in steps:
                if step.reason.startswith("--from") and step.stage.output_dir.exists():
                    shutil.rmtree(step.stage.output_dir)
        barrier()

        # 3. The stages, in order; a marker after each one that returns
        summary, started, cpu_started = [], time.perf_counter(), time.process_time()
        run_ids = {s.stage.name: read_marker(s.stage.output_dir)["run_id"] for s in steps if s.action == "skip"}
        for number, step in enumerate(steps, 1):
            stage = step.stage
            if step.action == "skip":
                log.info("[%d/%d] %s: skipped (%s; stage_complete.json in %s)", number, len(recipe.stages), stage.name,
                         step.reason, stage.output_dir)
                summary.append({"stage": stage.name, "action": "skip", "seconds": 0.0})
                continue
            log.info("[%d/%d] %s: rlhf %s %s -> %s (%s)", number, len(recipe.stages), stage.name, stage.command,
                     stage.config_file, stage.output_dir, step.action)
            t0, cpu0 = time.perf_counter(), time.process_time()
            alone = STAGES[stage.command].one_process and world > 1  # e.g. an evaluation is one process's job
            if is_main or not alone:
                execute(stage.command, stage.config, step.action == "resume", step.action == "restart")
            fresh_state()
            setup_logging(is_main)  # a stage may have changed the handlers
            if not alone:
                barrier()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            if is_main:
                upstream = {n: run_ids[n] for n in recipe.names()[: number - 1]}
                run_ids[stage.name] = write_marker(stage, upstream, seconds, step.action == "resume", cpu)["run_id"]
            elif alone:  # wait for the main process's marker: no collective call, so no timeout on a long evaluation
                while not (stage.output_dir / MARKER).is_file():
                    time.sleep(2)
            log.info("[%d/%d] %s: done in %.0fs (%.0f CPU seconds)", number, len(recipe.stages), stage.name, seconds, cpu)
            summary.append({"stage": stage.name, "action": step.action, "seconds": round(seconds, 1),
                            "cpu_seconds": round(cpu, 1)})
        total = time.perf_counter() - started
        if is_main:
            record = {"recipe": str(recipe.path), "output_dir": str(recipe.output_dir), "seconds": round(total, 1),
                      "cpu_seconds": round(time.process_time() - cpu_started, 1),
                      "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "stages": summary}
            with (recipe.output_dir / SUMMARY).open("a") as f:  # one line per `rlhf run`
                f.write(json.dumps(record) + "\n")
        log.info("recipe done in %.0fs: %s", total, ", ".join(f"{s['stage']} {s['action']}" for s in summary))
        if later := recipe.names()[len(steps):]:
            log.info("stopped after %s (--until); not run: %s", steps[-1].stage.name, ", ".join(later))
    return steps
