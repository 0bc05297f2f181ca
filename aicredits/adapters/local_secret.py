"""Secrets a development machine makes for itself, once, in .data/ (ignored by git)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

# What a development machine keeps for itself: the SQLite file (and its -wal and -shm), the
# secrets below. A hidden folder, so neither Reflex's reloader nor the launcher's (which
# watches only the source) restarts the app when the app writes to it.
LOCAL_DATA_DIR = Path(".data")


def load_or_create_secret(path: Path, *, prefix: str = "") -> str:
    """The secret kept in `path`, made on first use: `prefix` and 256 random bits, readable
    only by its owner. Processes starting together agree on one: the first complete file
    wins."""
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text().strip()
        if existing:
            return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(prefix + secrets.token_hex(32) + "\n")
        # link() publishes the complete file, or fails when another process already did.
        with contextlib.suppress(FileExistsError):
            os.link(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path.read_text().strip()
