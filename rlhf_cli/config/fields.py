"""`option()`: a dataclass field that carries its help text and its allowed values.

The help text is written once, here in the field's metadata; `--help`, the config reference in
docs/ and the validation messages all read it from there.
"""

import dataclasses
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    greater_than: float | None = None,
) -> Any:
    """A config field with its help text and range.

    `min`/`max` are inclusive bounds, `greater_than` an exclusive lower bound (e.g. a temperature).
    Mutable defaults (lists, dataclasses) are copied per instance.
    """
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "greater_than": greater_than}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """A nested config section (a dataclass), created with its defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})
