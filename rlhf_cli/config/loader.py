"""YAML -> typed config dataclasses: `extends`, `--set` overrides, validation, and the resolved dump.

Every error a user can make here becomes a `UserError` naming the full key path (and the file) and
saying what is allowed, e.g. "ppo.kl_coeff: unknown key; did you mean ppo.kl_coef?".
"""

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rlhf_cli.config.schema import STAGES
from rlhf_cli.errors import UserError

# Top-level keys that are not sections: the stage a file is written for, and its parents.
META_KEYS = ("stage", "extends")
def output_dir_key(stage: str) -> str:
    return STAGES[stage].output_dir_key if stage in STAGES else "training.output_dir"


# ---------------------------------------------------------------------------------------------
# Reading YAML files and their `extends` chains
# ---------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key written twice in one mapping (PyYAML keeps the last one
    without a word, so the first value would be silently ignored). Keys merged in with `<<: *anchor`
    may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not key_node:
                    raise DuplicateKeyError(
                        None, None,
                        f"the key {key!r} appears twice in one mapping (first on line {first.start_mark.line + 1}); "
                        "keep one",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys (a SafeLoader subclass: plain values only)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """Read one YAML mapping with a safe loader (never one that builds Python objects).

    An empty file (or one of comments only) is refused: running it would silently train a stage's
    defaults, which no one means to do."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a config file; give the path of a .yaml file.")
    if not path.is_file():
        raise UserError(f"{path}: config file not found; check the path.")
    try:
        data = safe_load_unique(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read the config file ({err.strerror or err}).") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8); a config is a YAML text file.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if isinstance(err, yaml.constructor.ConstructorError) and not isinstance(err, DuplicateKeyError):
            problem += "; configs hold plain values only (no `!!` tags): remove the tag"  # e.g. !!python/object
        raise UserError(f"{path}{where}: invalid YAML: {problem}.") from None
    if data is None:
        raise UserError(
            f"{path}: the config file is empty; write the keys to set (see `rlhf <stage> --help`), or "
            "`stage: <stage>` alone to run a stage with every default."
        )
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a config must be a mapping of sections (model:, data:, ...), not {type(data).__name__}."
        )
    return data


def deep_merge(base: dict, child: dict) -> dict:
    """Child values win; mappings merge key by key, everything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a config file with its `extends` parents (paths relative to the file), merged."""
    path = Path(path).resolve() if Path(path).exists() else Path(path)
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise UserError(f"{path}: `extends` forms a cycle: {cycle}.")
    data = read_yaml(path)
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise UserError(f"{path}: extends: expected a file path or a list of file paths.")
    merged: dict = {}
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise UserError(f"{path}: extends: {parent!r} not found (looked for {parent_path}).")
        merged = deep_merge(merged, load_raw(parent_path, (*_chain, path)))
    return deep_merge(merged, data)


# ---------------------------------------------------------------------------------------------
# `--set key.path=value` overrides
# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected key.path=value, e.g. --set training.learning_rate=1e-5.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text; the field's type decides whether that is allowed
    return key.strip(), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each override into (a copy of) the raw mapping. Key names are checked later, with the rest."""
    result = deep_merge({}, raw)
    for text in overrides:
        set_key(result, *parse_override(text))
    return result


KEY_PART_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def parse_key(text: str) -> list[str | int]:
    """`reward.sources[0].model` -> ["reward", "sources", 0, "model"]."""
    parts: list[str | int] = []
    for piece in str(text).split("."):
        match = KEY_PART_RE.match(piece.strip())
        if not match:
            raise UserError(
                f"{text!r} is not a key path; write section.key (training.max_steps) or "
                "index a list with [i] (reward.sources[0].model)."
            )
        parts.append(match.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return parts


def set_key(raw: dict, key: str, value: Any) -> None:
    """Set `value` at `key` in the raw mapping. Missing mappings are created (the schema then checks
    the names); a list index must point at an item that the stage's config already has."""
    parts = parse_key(key)
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = key if last else _key_prefix(parts[: depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list):
                raise UserError(
                    f"{key}: {_key_prefix(parts[:depth])} is not a list in this stage's config; "
                    "set the whole list instead (e.g. reward.sources: [...])."
                )
            if part >= len(node):
                raise UserError(
                    f"{key}: {_key_prefix(parts[:depth])} has {len(node)} item(s) in this stage's "
                    f"config, so there is no [{part}]; set the whole list instead."
                )
        elif not isinstance(node, dict):
            raise UserError(f"{key}: {_key_prefix(parts[:depth])} is not a mapping in this stage's config.")
        if last:
            node[part] = copy.deepcopy(value)
            return
        child = node[part] if isinstance(part, int) else node.get(part)
        if child is None and isinstance(part, str) and not isinstance(parts[depth + 1], int):
            child = node[part] = {}
        if child is None:
            raise UserError(f"{key}: {where} is not set in this stage's config; set the whole list instead.")
        node = child


def _key_prefix(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# ---------------------------------------------------------------------------------------------
# Building and validating the dataclasses
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, key: str, shown: Any = None) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless and expected.

    `shown` is the annotation named in the error (the Optional around `tp`, if any).
    """
    shown = shown or tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, shown=tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not dataclasses.is_dataclass(item_tp):
            value = [value]  # `--set peft.lora_target_modules=c_attn` means a one-item list
        if not isinstance(value, list):
            raise UserError(f"{key}: expected {_type_name(shown)}, got {_describe(value)}.")
        return [_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and getattr(tp, "SHORTHAND", None):  # `- builtin:calculator` for {function: ...}
            value = {tp.SHORTHAND: value}
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping of keys, got {_describe(value)}.")
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a label or a revision written as a number
    raise UserError(f"{key}: expected {_type_name(shown)}, got {_describe(value)}.")


def _check_range(value: Any, meta: dict, key: str) -> None:
    values = value if isinstance(value, list) else [value]
    for item in values:
        if item is None:
            continue
        if meta.get("choices") and item not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"])
            raise UserError(f"{key}: {item!r} is not allowed; choose one of: {allowed}.")
        if meta.get("min") is not None and item < meta["min"]:
            raise UserError(f"{key}: {item} is too small; it must be >= {meta['min']}.")
        if meta.get("max") is not None and item > meta["max"]:
            raise UserError(f"{key}: {item} is too large; it must be <= {meta['max']}.")
        if meta.get("greater_than") is not None and item <= meta["greater_than"]:
            raise UserError(f"{key}: {item} must be > {meta['greater_than']}.")


def unknown_key_error(key: str, prefix: str, valid: list[str]) -> UserError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = (
        f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
        if close
        else f"valid keys: {', '.join(valid)}."
    )
    return UserError(f"{full}: unknown key; {hint}")


def build(cls: type, raw: dict, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a raw mapping, checking every key, type and range."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise unknown_key_error(str(key), prefix, list(fields))
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(value, hints[name], key)
        _check_range(values[name], fields[name].metadata, key)
    return cls(**values)


def build_stage(stage: str, raw: dict, source: str = "config") -> Any:
    """Build the root config of `stage` from a merged raw mapping and check cross-field rules."""
    raw = dict(raw)
    declared = raw.pop("stage", None)
    if declared is not None and declared != stage:
        raise UserError(
            f"{source}: this config is written for `rlhf {declared}` (stage: {declared}), not `rlhf {stage}`."
        )
    config = build(STAGES[stage].config, raw)
    section, _, leaf = output_dir_key(stage).rpartition(".")
    folder = getattr(get_key(config, section), leaf)
    if not folder.strip():  # Path("") is the current folder: the run would silently land among your files
        raise UserError(f"{output_dir_key(stage)}: empty; name the folder the run is written to (e.g. outputs/run).")
    # `~/runs/x` means the home folder, as in a shell and in transformers' TrainingArguments (YAML does
    # not expand it: the run would silently go to a folder named `~` in the current one).
    setattr(get_key(config, section), leaf, os.path.expanduser(folder))
    from rlhf_cli.config.checks import check_stage  # cross-field rules live beside the schema

    check_stage(stage, config)
    return config


def load_config(stage: str, path: str | Path, overrides: list[str] | None = None) -> Any:
    """The full path from a YAML file (+ `--set` overrides) to a validated stage config."""
    raw = apply_overrides(load_raw(path), overrides or [])
    return build_stage(stage, raw, str(path))


def infer_stage(path: str | Path) -> str | None:
    """The `stage:` a file declares (directly or through `extends`), or None."""
    stage = load_raw(path).get("stage")
    if stage is not None and stage not in STAGES:
        raise UserError(f"{path}: stage: {stage!r} is not a stage; choose one of: {', '.join(STAGES)}.")
    return stage


# ---------------------------------------------------------------------------------------------
# The resolved config: written at the start of every run, and loadable again
# ---------------------------------------------------------------------------------------------


def to_dict(stage: str, config: Any) -> dict:
    return {"stage": stage, **dataclasses.asdict(config)}


def dump_config(stage: str, config: Any, path: str | Path) -> None:
    text = yaml.safe_dump(to_dict(stage, config), sort_keys=False, default_flow_style=False)
    Path(path).write_text(text)


def get_key(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config
