"""Which GPU a process of a sweep or grid takes: a process that runs one sweep worker, or one grid
job of a launcher that starts jobs as processes on this machine (submitit_local, joblib), takes
GPU i mod G of the machine's G GPUs (``assign_gpu``) through ``CUDA_VISIBLE_DEVICES``, before CUDA
starts. Imports nothing heavy (torch only to count GPUs when no variable names them)."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

GPUS_ENV = "FDFA_GPUS"  # the machine's GPUs, as the command that started this process saw them
# Launchers whose jobs are processes on this machine that do not pick a GPU per job themselves.
LOCAL_LAUNCHERS = ("submitit_launcher.LocalLauncher", "joblib_launcher.JoblibLauncher")

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


def assign_job_gpu(hydra_cfg, kind: str = "train") -> str | None:
    """In a multirun job of a local launcher (a grid through submitit_local or joblib): GPU
    job.num mod G. Sweep trials and confirmation runs (``kind``, fdfa.sweep_job) keep their
    worker's GPU; other launchers place jobs themselves (SLURM) or run them all in one process
    (basic)."""
    from hydra.types import RunMode

    target = hydra_cfg.launcher.get("_target_")
    if hydra_cfg.mode != RunMode.MULTIRUN or kind != "train" or not launcher_is_local(target):
        return None
    return assign_gpu(hydra_cfg.job.num)
