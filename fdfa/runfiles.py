"""The files of one run dir, and the one place that writes them (through fdfa/checkpoint.py's
atomic writes, so a crash, a signal or a full disk never leaves a torn file behind):

- ``metrics.jsonl``: one JSON record a line, appended as training goes; rewritten whole from the
  checkpoint's records on resume (a torn last line is dropped with the steps after last.ckpt).
- ``summary.json``: the run's totals and status, written when it ends (also when interrupted).
- ``last.ckpt``: everything needed to continue exactly where the run stopped.
- ``best.ckpt``: the model and rule state of the selected epoch.
- ``.hydra/``: the run's config (config.yaml, hydra.yaml, overrides.yaml).
- ``previous-<n>/``: the files of an earlier run in this dir, moved there when a run started
  afresh here (``move_aside``), so that no file tells of another run than its neighbours.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from fdfa import checkpoint
from fdfa.errors import is_disk_full

LOCK_NAME = ".lock"  # fdfa.rundir.RunDirLock's file: one run at a time in a dir
# What stays when an earlier run's files are moved aside: the dir's lock and run.log (Hydra's
# log of this process is open on it already; earlier runs' lines stay above this one's).
KEPT = (LOCK_NAME, "run.log")


class RunFiles:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.metrics = self.dir / "metrics.jsonl"
        self.summary = self.dir / "summary.json"
        self.last = self.dir / "last.ckpt"
        self.best = self.dir / "best.ckpt"
        self.config = self.dir / ".hydra" / "config.yaml"

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def holds_run(self) -> bool:
        """Whether an earlier run left results here: a summary, a checkpoint or records."""
        if any(path.exists() for path in (self.summary, self.last, self.best)):
            return True
        return self.metrics.is_file() and self.metrics.stat().st_size > 0

    def move_aside(self) -> Path:
        """Move the earlier run's files into ``previous-<n>/`` (the first n free): all but KEPT
        and earlier ``previous-*`` folders. Returns that folder."""
        for n in itertools.count(1):
            aside = self.dir / f"previous-{n}"
            try:
                aside.mkdir()
                break
            except FileExistsError:
                continue
        for entry in self.dir.iterdir():
            if entry.name not in KEPT and not entry.name.startswith("previous-"):
                entry.rename(aside / entry.name)
        return aside

    def record_config(self, files: dict[str, str]) -> None:
        """``.hydra/<name>`` for each name -> text (once the run dir is accepted as this run's)."""
        if files:
            self.config.parent.mkdir(exist_ok=True)
        for name, text in files.items():
            checkpoint.write_text_atomic(self.config.parent / name, text)

    def write_records(self, records: list[dict]) -> None:
        """metrics.jsonl holding exactly ``records`` (none: a fresh start)."""
        checkpoint.write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in records))

    def append_record(self, record: dict) -> None:
        try:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a torn last line is rewritten from last.ckpt on resume
            if is_disk_full(err):
                raise checkpoint.disk_full(self.dir, self.metrics.name) from None
            raise

    def read_summary(self) -> dict | None:
        """summary.json as a dict; None when it is absent, unreadable or not an object."""
        try:
            summary = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def write_summary(self, summary: dict) -> None:
        checkpoint.write_text_atomic(self.summary, json.dumps(summary, indent=2) + "\n")

    def remove_summary(self) -> None:
        self.summary.unlink(missing_ok=True)

    def save_last(self, state: dict) -> None:
        checkpoint.save_atomic(state, self.last)

    def save_best(self, state: dict) -> None:
        checkpoint.save_atomic(state, self.best)
