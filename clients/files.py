"""Writing result files so that a crash never leaves a half-written artefact under its real name:
each file goes to a hidden temporary name in the same folder, is fsynced, then renamed."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PARTIAL_SUFFIX = ".part"


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temporary file, fsync, rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        with open(temporary, "wb") as sink:
            sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def remove_partials(folder: str | Path) -> int:
    """Delete temporary files a killed writer left in ``folder``; returns how many."""
    root = Path(folder)
    if not root.is_dir():
        return 0
    removed = 0
    for stale in root.glob(f".*{PARTIAL_SUFFIX}"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed
