"""Writing files so that a crash, or a reader in another process, never meets a half-written
file under its real name: each file goes to a hidden temporary name in the same folder, is
fsynced, then renamed. The clients' results, the gateway's job folders, training splits, exported
models and sample data all write this way."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PARTIAL_SUFFIX = ".part"


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes, *, sync_folder: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temporary file, fsync, rename); with
    ``sync_folder`` the rename itself is on disk when this returns (the folder is fsynced)."""
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
    if sync_folder:
        fsync_dir(target.parent)
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
