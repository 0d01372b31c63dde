"""Which worker runs which trial, whether it is still alive, and handing a trial back.

Every running trial records its worker (machine, pid, host, GPU) and a heartbeat as user attrs.
A trial whose worker is gone (its process on this machine has exited, or it has been silent for
``grace_period``; a trial with no worker recorded counts from its start) is FAILED and queued
again with the same params: the new trial's user attrs ``redo_of`` (the failed trial's number)
and ``redo_reason`` say why. A worker stopped by SIGTERM (SLURM sends it before a time limit or
preemption) or Ctrl-C hands its running trial back the same way at once, instead of leaving it to
the grace period. Only public Optuna calls: ``Trial.set_user_attr`` on a worker's own trial,
``Study.tell`` by trial number and ``Study.enqueue_trial`` for another worker's (Optuna has no
public call that writes attrs on a trial another process asked for, hence the reason on the redo).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from fdfa.errors import FdfaError
from fdfa.interrupt import SignalHandler
from fdfa.processes import pid_alive

log = logging.getLogger(__name__)

WORKER_ATTR = "fdfa:worker"  # trial user attr: {"machine", "pid", "host", "gpu"} of its worker
HEARTBEAT_ATTR = "fdfa:heartbeat"  # trial user attr: time.time() of its worker's last beat


class Preempted(FdfaError):
    """The worker was told to stop (SIGTERM, SIGINT); its running trial was handed back."""

    exit_code = 143  # 128 + SIGTERM, as a process killed by it


def machine_id() -> str:
    """Names this machine and PID namespace, so a worker can tell whether a PID is its to check."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def worker_info(machine: str) -> dict:
    return {
        "machine": machine,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),  # null: the process sees every GPU
    }


def claim(trial: optuna.Trial, machine: str) -> None:
    """Record this process as the worker of ``trial`` (just asked for), with a first beat."""
    trial.set_user_attr(WORKER_ATTR, worker_info(machine))
    record_heartbeat(trial)


def record_heartbeat(trial: optuna.Trial) -> None:
    trial.set_user_attr(HEARTBEAT_ATTR, time.time())


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds, in a thread."""

    def __init__(self, trial: optuna.Trial, interval: float):
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fdfa-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                record_heartbeat(self.trial)
            except Exception as err:  # a missed beat is harmless; the next one may get through
                log.debug("heartbeat of trial %d failed: %s", self.trial.number, err)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def abandoned(trials) -> set[int]:
    """The numbers of the trials that were handed back (failed, and queued again as a redo)."""
    return {t.user_attrs["redo_of"] for t in trials if "redo_of" in t.user_attrs}


def finished_places(trials) -> list:
    """The finished trials that count towards n_trials: all but the abandoned ones (handed back:
    their redos count instead)."""
    gone = abandoned(trials)
    return [t for t in trials if t.state.is_finished() and t.number not in gone]


def places_taken(trials) -> int:
    """How many of n_trials the study's trials take: all but the abandoned ones (their redos
    take their places)."""
    gone = abandoned(trials)
    return sum(1 for t in trials if t.number not in gone)


def hand_back(study: optuna.Study, trial, reason: str) -> bool:
    """Fail a running trial and queue its params again (call under the study's lock, so that no
    worker counts it failed before its redo exists); False if it had finished."""
    try:
        study.tell(trial.number, state=TrialState.FAIL)
    except ValueError:  # "Cannot tell a COMPLETE trial": it finished after all
        return False
    study.enqueue_trial(
        trial.params, user_attrs={"redo_of": trial.number, "redo_reason": f"abandoned: {reason}"}
    )
    log.warning("trial %d abandoned (%s): failed, and queued again", trial.number, reason)
    return True


def fail_abandoned(study: optuna.Study, machine: str, grace_period: float) -> None:
    """Hand back every running trial whose worker is gone (call under the study's lock)."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker, beat = t.user_attrs.get(WORKER_ATTR), t.user_attrs.get(HEARTBEAT_ATTR)
        if worker is None or beat is None:
            # A worker killed between ask() and recording itself, or a trial another tool added:
            # its start is its last sign of life.
            started = t.datetime_start.timestamp() if t.datetime_start else now
            if now - started <= grace_period:
                continue
            reason = f"no worker recorded, started {now - started:.0f} s ago"
        elif worker["machine"] == machine and worker["pid"] != os.getpid():
            if pid_alive(worker["pid"]) and now - beat <= grace_period:
                continue
            reason = f"its worker (pid {worker['pid']} on {worker['host']}) has stopped"
        elif now - beat > grace_period:
            reason = f"no heartbeat from {worker['host']} for {now - beat:.0f} s"
        else:
            continue
        hand_back(study, t, reason)


class WorkerSignals(SignalHandler):
    """While entered: SIGTERM and SIGINT set ``received`` and stop a running trial's job by
    raising ``Preempted`` in it (only inside ``job()``, never in the middle of the sweeper's own
    storage calls). A trainer that handles the signal itself ends its job its own way; the
    sweeper then sees the job's ``interrupted`` status and hands the trial back all the same.
    Either way the signal reaches this worker's own workers (fdfa.interrupt.passing_signals_to)."""

    def __init__(self):
        self.received: str | None = None  # the name of the first signal
        self._in_job = False

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        if self._in_job:
            self._in_job = False  # once: the job's own cleanup may take a while
            raise Preempted(f"stopped by {self.received}")

    def stop_if_told(self) -> None:
        """Raise Preempted once a signal came (between jobs: nothing to hand back)."""
        if self.received:
            raise Preempted(f"stopped by {self.received}; rerun to resume the study")

    @contextlib.contextmanager
    def job(self):
        self._in_job = True
        try:
            yield
        finally:
            self._in_job = False
