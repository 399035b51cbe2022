"""Claims on run directories: at most one live process trains a run at a time.

A process that trains a run holds an exclusive lock on ``DIR/.claim.lock`` for as long as it
trains (``claim``). The lock is an operating-system file lock, so it is released the moment its
owner exits, however it exits (SIGKILL and power loss included): a dead owner's claim needs no
heartbeat to expire. Beside the lock, ``DIR/.claim.json`` names the owner (host, process id,
start time), so the refusal a second process gets says who holds the run.

    with claim("runs/abc123"):
        ...  # train; a second process's claim("runs/abc123") raises RunBusyError

On a shared filesystem (a Ray cluster's ``--runs-dir``) the lock needs working POSIX locks
(NFSv4 and Lustre provide them).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["LOCK", "OWNER", "RunBusyError", "claim", "holder"]

LOCK, OWNER = ".claim.lock", ".claim.json"


class RunBusyError(RuntimeError):
    """The run directory is claimed by another live process."""

    def __init__(self, directory: Path, owner: dict | None) -> None:
        who = "another process"
        if owner:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
            who = f"process {owner.get('pid')} on {owner.get('host')} (since {since})"
        super().__init__(
            f"run directory {directory} is being trained by {who}; wait for it to finish "
            "or stop that process, then run this again"
        )
        self.directory, self.owner = directory, owner


def holder(directory: str | Path) -> dict | None:
    """Who last claimed ``directory`` (host, pid, since), or None; says nothing of liveness."""
    try:
        return json.loads((Path(directory) / OWNER).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def claim(directory: str | Path) -> Iterator[Path]:
    """Hold ``directory`` for this process while the block runs (the directory is created).

    Raises:
        RunBusyError: another live process holds it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunBusyError(directory, holder(directory)) from None
    try:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        (directory / OWNER).write_text(json.dumps(owner) + "\n")
        yield directory
    finally:
        lock.release()
