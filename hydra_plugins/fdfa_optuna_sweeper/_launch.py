"""Starting a sweep's workers: as processes of this command (Hydra's basic launcher), or as the
jobs of any other Hydra launcher (submitit_slurm, submitit_local, joblib), each running the worker
loop (_loop.py) against the shared study. Local worker i gets GPU i mod G (fdfa.gpus)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from hydra.core.hydra_config import HydraConfig

from fdfa.errors import FdfaError
from fdfa.gpus import GPUS_ENV, assign_gpu, launcher_is_local, machine_gpus
from fdfa.rundir import quote

from ._jobs import JobRunner
from ._loop import Worker
from ._plan import Options, Plan

log = logging.getLogger(__name__)

# Overrides a worker passes on to the extra workers it starts (n_jobs), replacing the user's.
WORKER_KEYS = (
    "hydra.sweep.dir",
    "hydra.sweeper.storage",
    "hydra.sweeper.study_name",
    "hydra.sweeper.n_jobs",
    "hydra.sweeper.sampler.seed",
)

OWN_PROCESS_GROUP = (  # Popen's arguments for a child in a process group of its own
    {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
)


def resolve_n_jobs(n_jobs) -> int:
    """hydra.sweeper.n_jobs: a number, or ``auto``: one worker per GPU here (one on a CPU)."""
    if n_jobs == "auto":
        return max(1, len(machine_gpus()))
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise FdfaError(f"hydra.sweeper.n_jobs must be an integer >= 1 or auto, not {n_jobs!r}")
    return n_jobs


def start_processes(sweep_dir, url: str, study_name: str, seed, n_jobs: int) -> list:
    """Start workers 1..n_jobs-1: this command again on the same study (or studies: a
    benchmark's), each on its GPU, in its own process group (a terminal's Ctrl-C reaches it once,
    passed on by this command, as any signal to this command is: Worker.work); ``seed``: the
    sampler seed as given. Returns [(Popen, log path)]."""
    args = [a for a in sys.argv[1:] if a.lstrip("+~").split("=", 1)[0] not in WORKER_KEYS]
    gpus = machine_gpus()
    procs = []
    for i in range(1, n_jobs):
        extra = [
            f"hydra.sweep.dir={quote(str(sweep_dir))}",
            f"hydra.sweeper.storage={quote(url)}",
            f"hydra.sweeper.study_name={quote(study_name)}",
            "hydra.sweeper.n_jobs=1",
        ]
        if seed is not None:
            extra.append(f"hydra.sweeper.sampler.seed={seed + i}")
        env = dict(os.environ)
        if gpus:  # the worker's only GPU, also as the machine's GPUs it may choose from
            env["CUDA_VISIBLE_DEVICES"] = env[GPUS_ENV] = gpus[i % len(gpus)]
        path = sweep_dir / f"worker-{i}.log"
        with path.open("ab") as out:
            cmd = [sys.executable, sys.argv[0], *args, *extra]
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, **OWN_PROCESS_GROUP
            )
            procs.append((proc, path))
    log.info("started %d more workers; their logs: %s/worker-*.log", len(procs), sweep_dir)
    return procs


def fixed_arguments(arguments: list[str]) -> list[str]:
    """The command line's overrides that are not searched (a worker job composes with them)."""
    return [a for a in arguments if not _is_search(a)]


def _is_search(argument: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(argument).is_sweep_override()
    except Exception:
        return False


def worker_jobs(fixed: list[str], sweep_dir, n_jobs: int) -> list[list[str]]:
    """The overrides of the launcher jobs that run the workers: job i in <sweep dir>/workers/i,
    with the command line's fixed overrides (``sweep=...`` among them: the job's config must
    compose with the same hydra.sweeper keys as the command's)."""
    where = f"hydra.sweep.dir={quote(str(sweep_dir))}"
    return [[*fixed, where, f"hydra.sweep.subdir=workers/{i}"] for i in range(n_jobs)]


class WorkerTask:
    """The task function of a launcher's worker jobs (pickled with the launcher, e.g. by
    submitit): runs the worker loop in the job's process, each trial in-process through Hydra's
    basic launcher with the app's own task function."""

    def __init__(self, options: Options, plans: list[Plan], config, hydra_context, task_function):
        self.options, self.plans = options, plans
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def __call__(self, cfg) -> None:
        index = HydraConfig.get().job.num
        if launcher_is_local(self.config.hydra.launcher.get("_target_")):
            assign_gpu(index)  # SLURM gives each job its GPUs itself
        runner = JobRunner(self.hydra_context, self.config, self.task_function)
        Worker(self.options, self.plans, runner, index).work(self.config)
