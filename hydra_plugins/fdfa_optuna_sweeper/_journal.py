"""A journal study's file (``storage=journal:PATH``) checked before Optuna reads it.

Optuna's journal is one JSON record per line, each line written whole by one ``write`` under
Optuna's lock file (``PATH.lock``). A write that the disk could not finish (disk full, quota, a
crash mid-write) leaves a torn last record: bytes after the last newline. Optuna skips it when it
reads, but its next record is appended to it, which makes one undecodable line in the middle of the
journal and every later read fail. So before a study is opened, under Optuna's lock (no writer is
mid-record then):

- a torn last record is cut: its bytes go to ``PATH.torn-<time>`` beside the journal, and one
  warning says so (they hold a record that never counted: Optuna had skipped it);
- any other line that is not a JSON record is refused with one line that says how to keep the
  records before it (nothing after a broken record can be trusted: later records refer to earlier
  ones).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from optuna.storages.journal import JournalFileSymlinkLock

from fdfa.errors import FdfaError

log = logging.getLogger(__name__)


def check_journal(path: Path) -> None:
    """Cut a torn last record of the journal at ``path`` (kept beside it), refuse a broken one
    (FdfaError); nothing to do for a missing or empty file."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        cut_torn_record(path)
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                try:
                    json.loads(line)
                except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                    raise FdfaError(broken_message(path, number, err)) from None
    finally:
        lock.release()


def cut_torn_record(path: Path) -> None:
    """Truncate ``path`` after its last newline; the bytes cut go to ``PATH.torn-<time>``."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        end = _last_newline_end(f, size)
        f.seek(end)
        torn = f.read()
        kept = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        kept.write_bytes(torn)
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    log.warning(
        "journal %s ended in a torn record (%d bytes, a write that never finished, e.g. on a full "
        "disk): cut, and kept in %s",
        path,
        len(torn),
        kept,
    )


def _last_newline_end(f, size: int, block: int = 1 << 16) -> int:
    """The offset just after the last b"\\n" in ``f`` (0 if none), reading from the end."""
    pos = size
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        found = f.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        pos = start
    return 0


def broken_message(path: Path, number: int, err: ValueError) -> str:
    keep = f"head -n {number - 1} {path}.broken > {path}"
    return (
        f"journal study file {path}: line {number} is not a journal record "
        f"({type(err).__name__}: {str(err)[:80]}); keep the {number - 1} records before it with: "
        f"mv {path} {path}.broken && {keep} (trials recorded after it are lost; their run "
        "dirs stay), or start a new study with hydra.sweeper.storage=journal:<new file>"
    )
