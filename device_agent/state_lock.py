"""One agent per state folder: a lock held while an agent (or a local command) uses it."""

from __future__ import annotations

from pathlib import Path

from shared.fileio import FileLock

LOCK_FILE = "agent.lock"


class StateLock(FileLock):
    """``fcntl.flock`` on ``<state_dir>/agent.lock``; the kernel frees it if the process dies."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir / LOCK_FILE)
