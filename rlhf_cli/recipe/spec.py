"""Reading a recipe: the file, its stages, their overrides and placeholders, every stage's config.

A recipe is an ordered list of stages; each names a subcommand, a config file (relative to the
recipe) and overrides. Each stage writes to `<output_dir>/<name>`, and a later stage refers to an
earlier one's folder as `${name}` inside an override value (docs/recipes.md):

    output_dir: outputs/quickstart
    stages:
      - name: sft
        command: sft
        config: ../../configs/quickstart-sft.yaml
        set:
          training.max_steps: 300
      - name: ppo
        command: ppo
        config: ../../configs/quickstart-ppo.yaml
        set:
          model.model_name_or_path: ${sft}
          reward.sources[0].model: ${reward}

`load_recipe` builds and validates EVERY stage's config before returning, so a mistake in the last
stage stops the run before the first one starts. Errors name the recipe, the stage and the key.
"""

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf_cli.config.loader import build_stage, load_raw, output_dir_key, parse_override, read_yaml, set_key
from rlhf_cli.config.schema import STAGES
from rlhf_cli.errors import UserError

RECIPE_KEYS = ("description", "output_dir", "stages")
STAGE_KEYS = ("name", "command", "config", "set")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a stage name is also its folder's name
PLACEHOLDER_RE = re.compile(r"\$\{([^}]*)\}")


@dataclass
class RecipeStage:
    name: str
    command: str  # sft | reward | ppo | eval
    config_file: Path  # as written in the recipe, resolved against the recipe's folder
    overrides: list[tuple[str, Any]]  # (key path, value) with placeholders resolved
    config: Any  # the validated stage config (its output dir set to `output_dir`)
    output_dir: Path


@dataclass
class Recipe:
    path: Path
    output_dir: Path
    stages: list[RecipeStage]
    description: str | None = None

    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def is_recipe_file(path: str | Path) -> bool:
    """A YAML mapping with a `stages:` key is a recipe (no stage config has that key)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" in data and "stage" not in data


def default_output_dir(path: Path) -> Path:
    """outputs/<folder> for recipes/<folder>/recipe.yaml, outputs/<stem> for any other file name."""
    return Path("outputs") / (path.parent.name if path.stem == "recipe" else path.stem)


def _suggest(word: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"valid: {', '.join(valid) or 'none'}."


# ---------------------------------------------------------------------------------------------
# Placeholders: `${name}` -> the folder of the earlier stage `name`
# ---------------------------------------------------------------------------------------------


def resolve_placeholders(
    value: Any, folders: dict[str, Path], later: list[str], key: str, own: str = ""
) -> Any:
    """Replace every `${name}` in the strings of `value` (lists and mappings included).

    `folders`: the earlier stages' folders; `later`: the names of the stages after this one (`own`)."""
    if isinstance(value, list):
        return [resolve_placeholders(v, folders, later, f"{key}[{i}]", own) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: resolve_placeholders(v, folders, later, f"{key}.{k}", own) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name = match.group(1).strip().removeprefix("stages.")
        if name in folders:
            return str(folders[name])
        if name == own:
            raise UserError(
                f"{key}: ${{{name}}} is this stage's own folder; a stage can use the folders of "
                f"the stages before it only ({', '.join(folders) or 'none'})."
            )
        if name in later:
            raise UserError(
                f"{key}: ${{{name}}} is a stage that runs later; a stage can use the folders of "
                f"the stages before it only ({', '.join(folders) or 'none'})."
            )
        raise UserError(f"{key}: ${{{name}}} names no earlier stage; {_suggest(name, list(folders))}")

    return PLACEHOLDER_RE.sub(substitute, value)


# ---------------------------------------------------------------------------------------------
# The recipe file
# ---------------------------------------------------------------------------------------------


def _overrides(entry: Any) -> list[tuple[str, Any]]:
    """`set:` as a mapping {key.path: value} or a list of "key.path=value" strings (values read as YAML)."""
    if entry is None:
        return []
    if isinstance(entry, dict):
        return [(str(k), v) for k, v in entry.items()]
    if isinstance(entry, list):
        pairs = []
        for item in entry:
            if not isinstance(item, str) or "=" not in item:
                raise UserError(
                    f"set: {item!r} is not key.path=value; write set: as a mapping "
                    '(key.path: value) or a list of "key.path=value" strings.'
                )
            pairs.append(parse_override(item))
        return pairs
    raise UserError(
        f'set: expected a mapping (key.path: value) or a list of "key.path=value", got {entry!r}.'
    )


def _check_stage_entry(entry: Any, index: int, seen: list[str]) -> tuple[str, str, str]:
    where = f"stages[{index}]"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping with name, command, config (and set), got {entry!r}.")
    for key in entry:
        if key not in STAGE_KEYS:
            raise UserError(f"{where}.{key}: unknown key; {_suggest(str(key), STAGE_KEYS)}")
    for key in ("name", "command", "config"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise UserError(f"{where}.{key}: required; give it as a string.")
    name, command = entry["name"], entry["command"]
    if not NAME_RE.match(name):
        raise UserError(
            f"{where}.name: {name!r} is also the stage's folder name: use letters, digits, '_', '-', '.'."
        )
    if name in seen:
        raise UserError(f"{where}.name: {name!r} is used twice; every stage needs its own name (its folder).")
    if command not in STAGES:
        raise UserError(
            f"stage {name!r}: command: {command!r} is not a subcommand; choose one of: {', '.join(STAGES)}."
        )
    return name, command, entry["config"]


def stage_overrides(texts: list[str] | None, names: list[str]) -> dict[str, list[tuple[str, Any]]]:
    """`rlhf run --set STAGE.key.path=value` -> {stage: [(key.path, value)]} (applied after the recipe's `set:`)."""
    by_stage: dict[str, list[tuple[str, Any]]] = {}
    for text in texts or []:
        ((key, value),) = _overrides([text])
        name, _, rest = key.partition(".")
        if name not in names or not rest:
            raise UserError(
                f"--set {text!r}: start the key with a stage name ({', '.join(names)}), "
                f"e.g. --set {names[0]}.training.max_steps=10."
            )
        by_stage.setdefault(name, []).append((rest, value))
    return by_stage


def load_recipe(
    path: str | Path, output_dir: str | Path | None = None, overrides: list[str] | None = None
) -> Recipe:
    """Read the recipe and build every stage's config (with overrides and placeholders) -- all checked.

    `overrides`: "STAGE.key.path=value" texts (`rlhf run --set`), applied after the stage's own `set:`."""
    path = Path(path)
    data = read_yaml(path)
    for key in data:
        if key not in RECIPE_KEYS:
            hint = (
                " (a recipe lists stages; a stage config goes in a stage's `config:` file)"
                if key == "stage"
                else ""
            )
            raise UserError(f"{path}: {key}: unknown recipe key{hint}; {_suggest(str(key), RECIPE_KEYS)}")
    entries = data.get("stages")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: stages: list at least one stage (name, command, config, set).")
    root = Path(output_dir if output_dir is not None else data.get("output_dir") or default_output_dir(path))
    names: list[str] = []
    for i, entry in enumerate(entries):
        names.append(_check_stage_entry(entry, i, names)[0])
    extra = stage_overrides(overrides, names)

    stages: list[RecipeStage] = []
    for i, entry in enumerate(entries):
        name, command, config_text = _check_stage_entry(entry, i, names[:i])
        try:
            pairs = _overrides(entry.get("set")) + extra.get(name, [])
            stages.append(_build_stage(path, root, name, command, config_text, pairs, stages, names[i + 1 :]))
        except UserError as err:
            raise UserError(f"{path}: stage {name!r} (rlhf {command} {config_text}): {err}") from None
    description = data.get("description")
    return Recipe(
        path=path, output_dir=root, stages=stages, description=str(description) if description else None
    )


def _build_stage(
    path: Path,
    root: Path,
    name: str,
    command: str,
    config_text: str,
    pairs: list[tuple[str, Any]],
    earlier: list[RecipeStage],
    later: list[str],
) -> RecipeStage:
    config_file = Path(
        os.path.normpath(path.parent / config_text)
    )  # recipes/x/../../configs/a.yaml -> configs/a.yaml
    if not config_file.is_file():
        raise UserError(f"config: {config_file} not found (the path is relative to the recipe's folder).")
    folders = {s.name: s.output_dir for s in earlier}
    own_key = output_dir_key(command)
    overrides = []
    for key, value in pairs:
        if key == own_key:
            raise UserError(
                f"set: {key}: the recipe sets every stage's folder ({root / name}); "
                "change the recipe's output_dir (or pass --output-dir) instead."
            )
        overrides.append((key, resolve_placeholders(value, folders, later, f"set: {key}", own=name)))
    raw = load_raw(config_file)
    for key, value in overrides:
        set_key(raw, key, value)
    folder = root / name
    set_key(raw, own_key, str(folder))
    config = build_stage(command, raw, str(config_file))
    return RecipeStage(
        name=name,
        command=command,
        config_file=config_file,
        overrides=overrides,
        config=config,
        output_dir=folder,
    )
