"""The job side of an Optuna sweep (``python run.py -m sweep=lr``).

The sweeper (hydra_plugins/fdfa_optuna_sweeper) runs each trial's job inside its worker process,
with Hydra's basic launcher. Around each job it calls ``start_trial``; run.py passes
``job_callbacks()`` to the trainer, so every per-epoch evaluation reports the objective to the
trial, and the trial's pruner may stop the job there by raising ``optuna.TrialPruned``.

GPUs: a process that runs one worker, or one grid job of a launcher that starts jobs as processes
on this machine (submitit_local, joblib), takes GPU i mod G of the machine's G GPUs
(``assign_gpu``) through ``CUDA_VISIBLE_DEVICES``, before CUDA starts.

Outside a sweep ``job_callbacks()`` is empty and this module imports nothing heavy.
``job_kind()`` tells loggers how the job runs (W&B's job type): ``train``, ``trial`` while a
trial's reporter is active, or ``confirm`` between ``start_confirm()`` and ``end_trial()`` (a
re-run of a study's best params with another seed).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager

from fdfa.errors import FdfaError

log = logging.getLogger(__name__)

GPUS_ENV = "FDFA_GPUS"  # the machine's GPUs, as the command that started this process saw them
# Launchers whose jobs are processes on this machine that do not pick a GPU per job themselves.
LOCAL_LAUNCHERS = ("submitit_launcher.LocalLauncher", "joblib_launcher.JoblibLauncher")

_active: TrialReporter | None = None  # the trial of the job running in this process, if any
_confirm = False  # whether the job running in this process re-runs a study's best params


class TrialReporter:
    """A trainer callback: reports ``record[objective]`` at each epoch to an Optuna trial, keeps
    the best value seen (the trial's result), and prunes the job when the pruner says so."""

    def __init__(self, trial, objective: str = "val/acc", direction: str = "maximize"):
        if direction not in ("maximize", "minimize"):
            raise FdfaError(f"sweep direction must be maximize or minimize, got {direction!r}")
        self.trial = trial
        self.objective = objective
        self.direction = direction
        self.values: list[float] = []  # the objective at each evaluation, in order

    @property
    def best(self) -> float | None:
        """The best objective over the evaluations so far (None before the first)."""
        if not self.values:
            return None
        return max(self.values) if self.direction == "maximize" else min(self.values)

    def on_evaluation(self, run, record: dict) -> None:
        if self.objective not in record:
            metrics = ", ".join(sorted(k for k in record if k not in ("epoch", "step")))
            raise FdfaError(
                f"sweep objective {self.objective!r} is not a metric of this run; "
                f"set hydra.sweeper.objective to one of: {metrics}"
            )
        value = float(record[self.objective])
        self.values.append(value)
        if not math.isfinite(value):
            return  # nothing to report; the trial fails when the job ends with a non-finite value
        self.trial.report(value, step=record["epoch"])
        if self.trial.should_prune():
            import optuna  # only here: a sweep is running, so optuna is loaded already

            raise optuna.TrialPruned(
                f"at epoch {record['epoch']} with {self.objective} {value:.4g}"
            )


def start_trial(trial, objective: str = "val/acc", direction: str = "maximize") -> TrialReporter:
    """Make ``trial`` the one the next job in this process reports to; returns its reporter."""
    global _active
    _active = TrialReporter(trial, objective, direction)
    return _active


def start_confirm() -> None:
    """Mark the next job in this process as a confirmation run (``end_trial()`` ends it)."""
    global _active, _confirm
    _active, _confirm = None, True


def end_trial() -> None:
    global _active, _confirm
    _active, _confirm = None, False


def job_kind() -> str:
    """``trial``, ``confirm`` or ``train``: how the job now starting in this process runs."""
    return "trial" if _active is not None else "confirm" if _confirm else "train"


def job_callbacks() -> list:
    """The trainer callbacks for the job now starting: a reporter inside a sweep, else none."""
    return [_active] if _active is not None else []


@contextmanager
def confirm_jobs():
    """Jobs started inside are a study's confirmation runs, not trials (W&B's job type)."""
    start_confirm()
    try:
        yield
    finally:
        end_trial()


_gpu: str | None = None  # the GPU this process was given by assign_gpu


def machine_gpus() -> list[str]:
    """This machine's GPUs as ``CUDA_VISIBLE_DEVICES`` entries: those recorded in FDFA_GPUS by the
    command that started this process, else CUDA_VISIBLE_DEVICES, else every GPU torch counts."""
    for var in (GPUS_ENV, "CUDA_VISIBLE_DEVICES"):
        if var in os.environ:
            return [g.strip() for g in os.environ[var].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def record_machine_gpus() -> None:
    """Keep this machine's GPUs in FDFA_GPUS for the jobs a local launcher starts from here
    (submitit_local hides every GPU from a job unless told to give it some)."""
    os.environ.setdefault(GPUS_ENV, ",".join(machine_gpus()))


def assign_gpu(index: int) -> str | None:
    """Give this process GPU ``index`` mod G of the machine's G GPUs via CUDA_VISIBLE_DEVICES.
    Only once per process, before CUDA starts: later calls keep the first GPU. Returns the GPU
    (None on a machine without GPUs, or when CUDA had started already)."""
    global _gpu
    if _gpu is not None:
        return _gpu
    gpus = machine_gpus()
    if not gpus:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("CUDA started before GPU %d of %s could be chosen", index, gpus)
        return None
    _gpu = os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    log.info("job %d on GPU %s of %s (CUDA_VISIBLE_DEVICES)", index, _gpu, ",".join(gpus))
    return _gpu


def launcher_is_local(target: str | None) -> bool:
    """Whether a launcher (its ``_target_``) starts jobs as processes on this machine."""
    return bool(target) and target.endswith(LOCAL_LAUNCHERS)


def assign_job_gpu(hydra_cfg) -> str | None:
    """In a multirun job of a local launcher (a grid through submitit_local or joblib): GPU
    job.num mod G. Sweep trials keep their worker's GPU; other launchers place jobs themselves
    (SLURM) or run them all in one process (basic)."""
    from hydra.types import RunMode

    target = hydra_cfg.launcher.get("_target_")
    if hydra_cfg.mode != RunMode.MULTIRUN or job_kind() != "train" or not launcher_is_local(target):
        return None
    return assign_gpu(hydra_cfg.job.num)
