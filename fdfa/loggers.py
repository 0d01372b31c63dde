"""Metric sinks. The run record (metrics.jsonl, summary.json) is written by the trainer itself;
loggers here are extra destinations chosen with ``logger=...``.

A logger has ``log_metrics(metrics: dict, step: int)`` and ``finish(summary: dict)`` (called once,
also when the run fails: then ``summary["status"]`` is not ``"completed"``). It is built by
``hydra.utils.instantiate`` with ``out_dir`` (the run dir), ``run_config`` (the resolved config)
and ``names`` (algorithm, model and dataset names)."""

from __future__ import annotations

import csv
from pathlib import Path


class CSVLogger:
    """metrics.csv in the run dir: one row per record, columns fixed by the first row. The file is
    rewritten from the first record on (a resumed run replays its records)."""

    def __init__(self, out_dir: str, filename: str = "metrics.csv", **_):
        self.path = Path(out_dir) / filename
        self._fields: list[str] | None = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        row = {"step": step, **metrics}
        new = self._fields is None
        if new:
            self._fields = list(row)
        with self.path.open("w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def finish(self, summary: dict) -> None:
        pass
