"""Where the built-in world keeps what it builds once (the trained tokenizer, the tiny image
pipeline), and how a build is written so that concurrent processes never read half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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
