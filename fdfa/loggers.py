"""Metric sinks. The run record (metrics.jsonl, summary.json) is written by the trainer itself;
loggers here are extra destinations chosen with ``logger=...``.

A logger has ``log_metrics(metrics: dict, step: int)`` and ``finish(summary: dict)`` (called once,
also when the run fails: then ``summary["status"]`` is not ``"completed"``). It is built by
``hydra.utils.instantiate`` with ``out_dir`` (the run dir), ``run_config`` (the resolved config)
and ``names`` (algorithm, model and dataset names)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from fdfa.errors import FdfaError

log = logging.getLogger(__name__)


class CSVLogger:
    """metrics.csv in the run dir: one row per record (evaluations, and alignment measurements
    when metrics are on). A record with keys not seen before adds columns: the file is rewritten
    with them, earlier rows leaving them empty. The file is rewritten from the first record on (a
    resumed run replays its records). Columns: FIRST_COLUMNS, then the rest sorted by name, so
    the layout does not depend on which kind of record came first."""

    FIRST_COLUMNS = (
        "step", "epoch", "train/loss", "val/loss", "val/acc", "test/loss", "test/acc", "lr",
        "time_s",
    )  # fmt: skip

    def __init__(self, out_dir: str, filename: str = "metrics.csv", **_):
        self.path = Path(out_dir) / filename
        self._fields: list[str] = []
        self._rows: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        row = {"step": step, **metrics}
        self._rows.append(row)
        new_fields = [k for k in row if k not in self._fields]
        rewrite = len(self._rows) == 1 or bool(new_fields)
        if new_fields:
            first = [k for k in self.FIRST_COLUMNS if k in self._fields or k in new_fields]
            rest = sorted(k for k in {*self._fields, *new_fields} if k not in self.FIRST_COLUMNS)
            self._fields = first + rest
        with self.path.open("w" if rewrite else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields)
            if rewrite:
                writer.writeheader()
                writer.writerows(self._rows)
            else:
                writer.writerow(row)

    def finish(self, summary: dict) -> None:
        pass


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # what wandb accepts


def _one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class WandbLogger:
    """One Weights & Biases run per training run (``logger=wandb``).

    The resolved config goes to the W&B config, the algorithm, model and dataset names to its tags
    (after ``tags``), every record to its history (at the record's ``step``) and the final summary
    dict to its summary. ``finish`` ends the W&B run with exit code 0 when the summary's status is
    ``completed`` and 1 otherwise, so a sweep that runs many jobs in one process never leaves a
    run open. ``mode=offline`` (the default unless $WANDB_MODE says otherwise) writes the run
    under ``<dir>/wandb/`` without an account; ``wandb sync <that dir>`` uploads it later.

    If W&B cannot start (not installed, no network, a bad key: any error in ``wandb.init``), one
    warning line is logged and this logger does nothing; training goes on with the local logs.
    """

    def __init__(
        self,
        out_dir: str,
        run_config: dict | None = None,
        names: dict | None = None,
        project: str = "fdfa",
        entity: str | None = None,
        group: str | None = None,
        tags=(),
        mode: str = "offline",
        dir: str | None = None,  # wandb.init calls it dir too
        **_,
    ):
        if mode not in WANDB_MODES:
            raise FdfaError(
                f"logger.wandb.mode must be one of {', '.join(WANDB_MODES[:4])}, got {mode!r} "
                "(it defaults to $WANDB_MODE, else offline)"
            )
        self.run = None
        tags = [str(t) for t in (tags or [])]
        tags += [str(v) for v in (names or {}).values() if v]
        wandb_dir = Path(dir or out_dir)
        try:
            import wandb
        except ImportError:
            log.warning(
                "W&B logging is off: wandb is not installed (pip install wandb); local logs go on"
            )
            return
        try:
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                tags=list(dict.fromkeys(tags)),  # without repeats, in order
                mode=mode,
                dir=str(wandb_dir),
                config=dict(run_config or {}),
                reinit="create_new",  # never hand back (or end) another job's run
            )
        except Exception as err:  # wandb raises many types; none may stop training
            log.warning("W&B logging is off for this run (%s); local logs go on", _one_line(err))

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        except Exception as err:
            log.warning("W&B logging stopped (%s); local logs go on", _one_line(err))
            self._end(exit_code=1)

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(summary)
        finally:
            self._end(exit_code=0 if summary.get("status") == "completed" else 1)

    def _end(self, exit_code: int) -> None:
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:
            log.warning("W&B run did not finish cleanly (%s)", _one_line(err))
