"""The config reference, read from the dataclasses' field metadata (the one place help is written)."""

import dataclasses
import typing
from typing import Any

from rlhf_cli.config.loader import _type_name
from rlhf_cli.config.schema import STAGES


@dataclasses.dataclass
class KeyDoc:
    key: str
    type: str
    default: Any
    help: str
    choices: tuple | None


def describe(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every key of a config dataclass, sections flattened to dotted paths, in declaration order."""
    docs = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.metadata.get("section"):
            docs += describe(hints[f.name], f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default) or (isinstance(default, list) and default and dataclasses.is_dataclass(default[0])):
            default = "..."
        docs.append(KeyDoc(key, _type_name(hints[f.name]), default, f.metadata.get("help", ""), f.metadata.get("choices")))
    return docs


def format_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def text_reference(stage: str) -> str:
    """Plain-text key list for `rlhf <stage> --help`."""
    # "\b" stops click from re-wrapping the block into one paragraph.
    lines = ["\b", f"Config keys of `rlhf {stage}` (YAML sections; override any with --set key=value):"]
    for doc in describe(STAGES[stage].config):
        choices = f" One of: {', '.join(map(str, doc.choices))}." if doc.choices else ""
        lines.append(f"  {doc.key} = {format_default(doc.default)}  ({doc.type})")
        lines.append(f"      {doc.help}{choices}")
    return "\n".join(lines)


def markdown_reference() -> str:
    """docs/config-reference.md, generated; a test checks that the file in the repository is current."""
    out = [
        "# Config reference",
        "",
        "Generated from the help text in `rlhf_cli/config/` by `python -m rlhf_cli.config.reference`;",
        "do not edit by hand. Every key can be set in YAML or with `--set key.path=value`.",
    ]
    for stage, declared in STAGES.items():
        out += ["", f"## `rlhf {stage}`", "", declared.help, "", "| key | type | default | help |", "|---|---|---|---|"]
        for doc in describe(declared.config):
            choices = f" One of: {', '.join(f'`{c}`' for c in doc.choices)}." if doc.choices else ""
            help_text = (doc.help + choices).replace("|", "\\|")
            out.append(f"| `{doc.key}` | {doc.type} | `{format_default(doc.default)}` | {help_text} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown_reference(), end="")
