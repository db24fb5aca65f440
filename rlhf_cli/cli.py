"""The `rlhf` command: sft | reward | ppo | dpo | grpo | rloo | eval | validate | run (a recipe of several stages).

Exit codes: 0 success, 2 a problem the user can fix (one message, no traceback), 1 an internal error.
"""

import dataclasses
import importlib
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from rlhf_cli.config.loader import apply_overrides, build_stage, infer_stage, load_raw, output_dir_key
from rlhf_cli.config.reference import text_reference
from rlhf_cli.config.schema import STAGES
from rlhf_cli.errors import Interrupted, NotBuiltYet, UserError

app = typer.Typer(
    help="Train transformer language models with reinforcement learning from feedback, from YAML configs.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(metavar="CONFIG", help="The YAML config file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set training.learning_rate=1e-5 (repeatable)."),
]
OutputDirOpt = Annotated[
    str | None, typer.Option("--output-dir", metavar="DIR", help="Write the run here (overrides the config's output_dir).")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in the output folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a run already in the output folder.")]
AllowConfigChangeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-config-change",
        help="With --resume: continue even though the model, data, seed or batch size differ from the run's "
        "config.yaml (such changes are refused otherwise: the checkpoint no longer means what it did).",
    ),
]

def load_stage_config(stage: str, config: Path, overrides: list[str] | None, output_dir: str | None):
    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"{output_dir_key(stage)}={output_dir}")
    raw = apply_overrides(load_raw(config), overrides)
    return build_stage(stage, raw, str(config))


def run_stage(
    stage: str, config: Path, overrides, output_dir, resume: bool, overwrite: bool, allow_config_change: bool = False
) -> None:
    if allow_config_change and not resume:
        raise UserError("--allow-config-change applies only with --resume (it lets a resumed run change its config).")
    cfg = load_stage_config(stage, config, overrides, output_dir)
    run_config(stage, cfg, resume, overwrite, allow_config_change)


def run_config(stage: str, cfg, resume: bool, overwrite: bool, allow_config_change: bool = False) -> None:
    """Run one stage on a validated config: the path of `rlhf <stage>` and of every stage of `rlhf run`."""
    from rlhf_cli.stages.common import config_change_allowed

    module = importlib.import_module(STAGES[stage].module)
    with config_change_allowed(allow_config_change):
        module.run(cfg, resume=resume, overwrite=overwrite)


def _make_stage_command(stage: str):
    def command(
        config: ConfigArg,
        set_: SetOpt = None,
        output_dir: OutputDirOpt = None,
        resume: ResumeOpt = False,
        overwrite: OverwriteOpt = False,
        allow_config_change: AllowConfigChangeOpt = False,
    ) -> None:
        run_stage(stage, config, set_, output_dir, resume, overwrite, allow_config_change)

    command.__doc__ = STAGES[stage].help
    app.command(name=stage, help=STAGES[stage].help, epilog=text_reference(stage))(command)


for _stage in STAGES:
    _make_stage_command(_stage)


@app.command()
def validate(
    config: ConfigArg,
    stage: Annotated[
        str | None, typer.Option(metavar="STAGE", help="Check against this stage (default: the file's `stage:` key, else every stage).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Load and check a config without training: keys, types, ranges and cross-key rules (a recipe: every stage's)."""
    from rlhf_cli.recipe import is_recipe_file, load_recipe

    if is_recipe_file(config):
        if stage is not None:
            raise UserError(f"{config} is a recipe: --stage applies to stage configs (a recipe names each stage's command).")
        recipe = load_recipe(config, overrides=set_)  # --set STAGE.key=value, as for `rlhf run`
        typer.echo(f"{config}: valid recipe; stages: {', '.join(f'{s.name} (rlhf {s.command})' for s in recipe.stages)}.")
        return
    stage = stage or infer_stage(config)
    if stage is not None:
        if stage not in STAGES:
            raise UserError(f"--stage {stage}: choose one of: {', '.join(STAGES)}.")
        build_stage(stage, apply_overrides(load_raw(config), list(set_ or [])), str(config))
        typer.echo(f"{config}: valid `rlhf {stage}` config.")
        return
    raw = apply_overrides(load_raw(config), list(set_ or []))
    candidates = candidate_stages(raw)
    errors = []
    for candidate in candidates:
        try:
            build_stage(candidate, raw, str(config))
        except UserError as err:
            errors.append(f"as `rlhf {candidate}`: {err}")
            continue
        typer.echo(f"{config}: valid `rlhf {candidate}` config.")
        return
    messages = {e.split(": ", 1)[1] for e in errors}
    if len(messages) == 1:
        raise UserError(messages.pop())
    raise UserError(f"{config}: not valid for any stage (add `stage:` to pick one). " + " | ".join(errors))


@app.command(name="run")
def run_recipe_command(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe YAML file.", show_default=False)],
    output_dir: Annotated[
        str | None,
        typer.Option("--output-dir", metavar="DIR", help="Folder of the stage folders (overrides the recipe's output_dir)."),
    ] = None,
    from_stage: Annotated[
        str | None,
        typer.Option("--from", metavar="STAGE", help="Run this stage and every later one again from scratch (their folders are replaced)."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="STAGE", help="Stop after this stage; the later ones are left as they are (a later run without --until goes on from there)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="STAGE.KEY=VALUE", help="Override a key of one stage, e.g. --set sft.training.max_steps=100 (repeatable)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the recipe and print what each stage would do; run nothing.")] = False,
) -> None:
    """Run a recipe: stages (sft -> reward -> ppo -> eval) in order, each in <output_dir>/<name>.

    Every stage's config is checked before the first one starts. On a re-run, finished stages are
    skipped and an interrupted one resumes from its latest checkpoint. See docs/recipes.md.
    """
    from rlhf_cli.recipe import run_recipe

    run_recipe(recipe, run_config, output_dir=output_dir, from_stage=from_stage, dry_run=dry_run, overrides=set_,
               until=until)


def candidate_stages(raw: dict) -> list[str]:
    """Stages whose sections include every top-level key of the file (all stages if none does)."""
    sections = set(raw) - {"stage"}
    matching = [s for s, d in STAGES.items() if sections <= {f.name for f in dataclasses.fields(d.config)}]
    return matching or list(STAGES)


@app.callback()
def options(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, print the full traceback as well (also: RLHF_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ["RLHF_DEBUG"] = "1"  # read by main(), and inherited by the processes a recipe starts


def main() -> None:
    """Entry point. Usage errors are click's (exit 2, with usage); user errors print one line (exit 2),
    then, for an exception raised in the user's code, that code's frames; `--debug` adds the full traceback."""
    try:
        app()
    except (UserError, NotBuiltYet) as err:
        if os.environ.get("RLHF_DEBUG") == "1":
            traceback.print_exception(err)
        typer.echo(f"error: {err}", err=True)
        if getattr(err, "detail", None):
            typer.echo(err.detail, err=True)
        sys.exit(err.exit_code)
    except Interrupted as err:  # SIGTERM / Ctrl-C: a checkpoint was saved; exit 128 + signal, as a shell does
        typer.echo(f"interrupted: {err} Resume with: {resume_command(sys.argv)}", err=True)
        sys.exit(err.exit_code)


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run (`rlhf run` resumes by itself)."""
    args = [a for a in argv[1:] if a != "--overwrite"]
    if args and args[0] == "run":  # --from again would restart the interrupted stage from scratch
        args = [a for i, a in enumerate(args) if not (a.startswith("--from") or (i and args[i - 1] == "--from"))]
    elif args and "--resume" not in args:
        args.append("--resume")
    return shlex.join(["rlhf", *args])
