"""Whether a process is still running, by its PID (this machine's): what a sweep's workers check
before handing back another worker's trial, and what a run checks before removing a temp file
that a writer left behind."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (another user's included); False once it has exited, also
    while it is a zombie that its parent has not reaped yet (``kill(pid, 0)`` alone says alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:  # /proc/<pid>/stat: "pid (name) state ...", the name may hold spaces and parentheses
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc here (macOS): kill(pid, 0) is all there is
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] in ("Z", "X")
