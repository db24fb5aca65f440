"""Where the built-in world keeps what it builds once (the trained tokenizer, the tiny image
pipeline, the generated datasets), how a build is written so that concurrent processes never read half
of one, and the project sources a build depends on (hashed into its folder's name)."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def cache_root() -> Path:
    """`$RLHF_CACHE/builtin` (default `~/.cache/rlhf/builtin`), read at each call so a changed
    variable is honoured."""
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf").expanduser() / "builtin"


def write_atomically(folder: Path, write: Callable[[Path], None], marker: str) -> None:
    """`write(tmp)` into a temporary sibling folder, then rename it to `folder`: readers never see a
    half-written one. Losing the rename to another process that wrote `folder/marker` first is fine."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def project_sources(module: ModuleType) -> list[str]:
    """The source of `module` and of every `rlhf_cli` module it uses, directly or through another (a module
    imported as such, or the home of an imported function, class or constant), sorted by module name."""
    found: dict[str, ModuleType] = {}
    pending = [module]
    while pending:
        current = pending.pop()
        if current.__name__ in found:
            continue
        found[current.__name__] = current
        for value in vars(current).values():
            home_name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            home = sys.modules.get(home_name) if isinstance(home_name, str) else None
            if home is not None and home.__name__.startswith("rlhf_cli."):
                pending.append(home)
    return [inspect.getsource(found[name]) for name in sorted(found)]
