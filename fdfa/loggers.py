"""Metric sinks. The run record (metrics.jsonl, summary.json) is written by the trainer itself;
loggers here are extra destinations chosen with ``logger=...``.

A logger has ``log_metrics(metrics: dict, step: int)`` and ``finish(summary: dict)`` (called once,
also when the run fails: then ``summary["status"]`` is not ``"completed"``). It is built by
``hydra.utils.instantiate`` with ``out_dir`` (the run dir), ``run_config`` (the resolved config),
``names`` (algorithm, model and dataset names) and ``resumed`` (whether the run continues from a
checkpoint: then the records logged before it are replayed first); it takes ``**_`` for more."""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fdfa.checks import check_arguments, number
from fdfa.errors import FdfaError, one_line
from fdfa.sweep_job import job_of
from fdfa.validate import unwritable_reason

log = logging.getLogger(__name__)


class CSVLogger:
    """metrics.csv in the run dir: one row per record (evaluations, and alignment measurements
    when metrics are on). A record with keys not seen before adds columns: the file is rewritten
    with them, earlier rows leaving them empty. The file is rewritten from the first record on (a
    resumed run replays its records). Columns: FIRST_COLUMNS, then the rest sorted by name, so
    the layout does not depend on which kind of record came first."""

    FIRST_COLUMNS = (
        "step",
        "epoch",
        "train/loss",
        "val/loss",
        "val/acc",
        "test/loss",
        "test/acc",
        "lr",
        "time_s",
    )

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
EPOCH_METRICS = ("train/*", "test/*", "val/*", "lr", "time_s")  # evaluations: plotted by epoch
STEP_METRICS = ("align/*", "feedback/*", "estimator/*")  # alignment: by optimizer step
ENDED = ("completed", "pruned", "diverged")  # statuses of a run that ended as training meant to
_ONLINE_FAILED: str | None = None  # why W&B online failed in this process, once it did


def _one_line(err: BaseException) -> str:
    return one_line(err, typed=True)  # 'OSError: ...': W&B raises many types


def run_name(names: dict | None, run_config: dict, kind: str = "train") -> str:
    """``<algorithm>-<model>-<dataset>-seed<seed>``, then ``-trial<n>`` in an Optuna sweep and
    ``-confirm`` for a confirmation run: what W&B and the HParams tables show for a run. In a
    benchmark the rule (``fdfa_ema``) stands in for the algorithm's name (``fdfa``)."""
    rule = job_of(run_config)["rule"]
    names = {**names, "algorithm": rule} if names and rule else names
    parts = [str(v) for v in (names or {}).values() if v]
    if run_config.get("seed") is not None:
        parts.append(f"seed{run_config['seed']}")
    if job_of(run_config)["number"] is not None:
        parts.append(f"trial{job_of(run_config)['number']}")
    if kind == "confirm":
        parts.append("confirm")
    return "-".join(parts)


def multirun_group() -> str | None:
    """The sweep dir's name when this job is one of a Hydra multirun (e.g. a grid), else None."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


class WandbLogger:
    """One Weights & Biases run per training run (``logger=wandb``).

    The run is named by :func:`run_name`; runs of one multirun share a group (``group``; else
    ``sweep_job.group``: the study's name, or a benchmark's for all its rules' runs; else the sweep
    dir's name); ``job_type`` (else the config's ``sweep_job.kind``) tells train, trial and
    confirm runs apart. The resolved config goes to the W&B config, the algorithm, model and
    dataset names (and a benchmark's rule) to its tags (after ``tags``), every record
    (``step`` included) to its history at the record's ``step``, and the final summary dict to its
    summary. Evaluation metrics use ``epoch`` as their x-axis, alignment metrics ``step``.
    ``finish`` ends the W&B run with exit
    code 0 when the summary's status is completed, pruned or diverged, 1 when training failed.
    ``mode=offline`` (the default unless $WANDB_MODE says otherwise) writes the run under
    ``<dir>/wandb/`` (``dir``: else $WANDB_DIR, else the run dir) without an account; ``wandb sync``
    uploads it later.

    A resumed training run continues its W&B run: the id is kept in ``<run dir>/wandb_id``.
    Online, the records already in the W&B run (``run.starting_step``) are not sent again.
    Offline, wandb cannot read what an earlier session wrote and starts a new session file at
    step 0; so that session gets the whole history (the records replayed from the checkpoint),
    and the earlier sessions of that id are renamed ``superseded-offline-run-*``: ``wandb sync``
    then finds one session of the run, without repeated steps.

    Online, ``wandb.init`` may wait ``init_timeout`` seconds for the server (wandb's own default
    is 90). If it fails (no network, a bad key, the server down), the run is logged offline instead
    (``wandb sync`` uploads it later) and one warning says so; the later runs of the same process
    (a sweep worker's trials) go offline at once, without waiting again. If W&B cannot start at all
    (not installed, offline init failing too), one warning line is logged and this logger does
    nothing; training goes on with the local logs.
    """

    ID_FILE = "wandb_id"  # in the run dir: the W&B run id, continued when training resumes

    @check_arguments("logger.wandb.", init_timeout=number(30))
    def __init__(
        self,
        out_dir: str,
        run_config: dict | None = None,
        names: dict | None = None,
        resumed: bool = False,
        project: str = "fdfa",
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        name: str | None = None,
        tags=(),
        mode: str = "offline",
        dir: str | None = None,  # wandb.init calls it dir too
        init_timeout: float = 30.0,
        **_,
    ):
        if mode not in WANDB_MODES:
            raise FdfaError(
                f"logger.wandb.mode must be one of {', '.join(WANDB_MODES[:4])}, got {mode!r} "
                "(it defaults to $WANDB_MODE, else offline)"
            )
        self.run = None
        self._first_new_step = 0  # records before this step are in the W&B run already
        run_config = dict(run_config or {})
        job = job_of(run_config)  # how a sweeper runs this job (fdfa/sweep_job.py)
        kind = job["kind"]
        tags = [str(t) for t in (tags or [])]
        tags += [str(v) for v in (names or {}).values() if v]
        tags += [str(job["rule"])] if job["rule"] else []
        id_file = Path(out_dir) / self.ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        wandb_dir = Path(dir or os.environ.get("WANDB_DIR") or out_dir)
        reason = None if wandb_dir == Path(out_dir) else unwritable_reason(wandb_dir)
        if reason:  # W&B itself would fall back to /tmp/wandb with no word in the run's log
            log.warning(
                "W&B's folder %s is not writable (%s): its files go to the run dir instead; "
                "make it writable, or set logger.wandb.dir (or $WANDB_DIR) to one that is",
                wandb_dir, reason,
            )  # fmt: skip
            wandb_dir = Path(out_dir)
        try:
            import wandb
        except ImportError:
            log.warning(
                "W&B logging is off: wandb is not installed (pip install wandb); local logs go on"
            )
            return
        try:
            wandb_dir.mkdir(parents=True, exist_ok=True)
            if run_id and mode in ("offline", "dryrun"):
                supersede_offline_sessions(wandb_dir / "wandb", run_id)
            init = dict(
                project=project,
                entity=entity,
                group=group or job["group"] or multirun_group(),
                job_type=job_type or kind,
                name=name or run_name(names, run_config, kind),
                id=run_id,
                resume="allow" if run_id else None,
                tags=list(dict.fromkeys(tags)),  # without repeats, in order
                dir=str(wandb_dir),
                config=run_config,
                reinit="create_new",  # never hand back (or end) another job's run
            )
            self.run = (
                self._init_online(wandb, init, init_timeout, wandb_dir)
                if mode in ("online", "run", "shared")
                else wandb.init(mode=mode, **init)
            )
        except Exception as err:  # wandb raises many types; none may stop training
            log.warning("W&B logging is off for this run (%s); local logs go on", _one_line(err))
            return
        try:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run.id + "\n")
            if self.run.resumed:
                self._first_new_step = self.run.starting_step
            for pattern in EPOCH_METRICS:
                self.run.define_metric(pattern, step_metric="epoch")
            for pattern in STEP_METRICS:
                self.run.define_metric(pattern, step_metric="step")
        except Exception as err:
            log.warning("W&B logging is off for this run (%s); local logs go on", _one_line(err))
            self._end(exit_code=1)

    @staticmethod
    def _init_online(wandb, init: dict, timeout: float, wandb_dir: Path):
        """``wandb.init`` online within ``timeout`` s; offline when the server cannot be reached,
        and for the rest of this process once it could not (one warning says so)."""
        global _ONLINE_FAILED
        if _ONLINE_FAILED is not None:
            return wandb.init(mode="offline", **init)
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout), **init)
        except Exception as err:
            reason = _one_line(err)
        run = wandb.init(mode="offline", **init)  # if this fails too: W&B is off for this run
        _ONLINE_FAILED = reason
        log.warning(
            "W&B online did not start within logger.wandb.init_timeout=%g s (%s); this run and "
            "the later ones of this process log offline to %s (wandb sync uploads them later)",
            timeout, reason, wandb_dir / "wandb",
        )  # fmt: skip
        return run

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.run is None or step < self._first_new_step:
            return
        try:
            self.run.log({**metrics, "step": step}, step=step)
        except Exception as err:
            log.warning("W&B logging stopped (%s); local logs go on", _one_line(err))
            self._end(exit_code=1)

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(summary)
        finally:
            self._end(exit_code=0 if summary.get("status") in ENDED else 1)

    def _end(self, exit_code: int) -> None:
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:
            log.warning("W&B run did not finish cleanly (%s)", _one_line(err))


def supersede_offline_sessions(wandb_root: Path, run_id: str) -> None:
    """Rename the offline sessions of W&B run ``run_id`` under ``wandb_root`` to
    ``superseded-<name>``: the session now starting holds their history and more."""
    for old in sorted(wandb_root.glob(f"offline-run-*-{run_id}")):
        old.rename(old.with_name(f"superseded-{old.name}"))
        log.info("W&B offline session %s is superseded by the resumed run's new one", old.name)


def hparams(run_config: dict, names: dict | None) -> dict:
    """A run's entry in TensorBoard's HParams tab: algorithm, model, dataset, optimizer, lr,
    batch size, the rule's settings (feedback lr, momentum, ...), seed, Optuna trial number, the
    stage (``sweep_job.kind``: train, trial or confirm) and a benchmark's rule."""
    algorithm = run_config.get("algorithm") or {}
    optimizer = run_config.get("optimizer") or {}
    values = {
        **(names or {}),
        "optimizer": str(optimizer.get("_target_", "")).rsplit(".", 1)[-1] or None,
        "lr": optimizer.get("lr"),
        "batch_size": (run_config.get("dataset") or {}).get("batch_size"),
        **{k: v for k, v in algorithm.items() if not k.startswith("_")},
        "seed": run_config.get("seed"),
        "trial": job_of(run_config)["number"],
        "stage": job_of(run_config)["kind"],
        "rule": job_of(run_config)["rule"],
    }
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


class TensorBoardLogger:
    """TensorBoard event files in the run dir (``logger=tensorboard``): every number of every
    record as a scalar at the record's step, and the run's :func:`hparams` for the HParams tab, so
    ``tensorboard --logdir multirun/<sweep>`` compares the runs of a grid or a study side by side.
    ``finish`` adds the summary's ``best/*`` and ``selected/*`` metrics as scalars at the last step
    (the HParams tab shows each scalar's last value) and the session's status (failure only when
    training failed). The event files are rewritten from the first record on (a resumed run
    replays its records)."""

    def __init__(self, out_dir: str, run_config: dict | None = None, names=None, **_):
        try:
            from tensorboard.plugins.hparams import summary_v2
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FdfaError(
                "logger=tensorboard needs the tensorboard package: pip install tensorboard "
                '(or pip install -e ".[dashboard]")'
            ) from None
        for old in Path(out_dir).glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(out_dir), flush_secs=10)
        self.last_step = 0
        config = dict(run_config or {})
        start = summary_v2.hparams_pb(hparams(config, names), trial_id=run_name(names, config))
        self.writer._get_file_writer().add_summary(start)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.last_step = max(self.last_step, step)
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        if self.writer is None:
            return
        for key, value in summary.items():
            if key.startswith(("best/", "selected/")) and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=self.last_step)
        ok = summary.get("status") in ENDED
        end = plugin_data_pb2.SessionEndInfo(
            status=api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE,
            end_time_secs=time.time(),
        )
        content = metadata.create_summary_metadata(
            plugin_data_pb2.HParamsPluginData(session_end_info=end)
        )
        value = Summary.Value(
            tag=metadata.SESSION_END_INFO_TAG, metadata=content, tensor=metadata.NULL_TENSOR
        )
        self.writer._get_file_writer().add_summary(Summary(value=[value]))
        self.writer.close()
        self.writer = None
