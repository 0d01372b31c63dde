"""Which worker runs which trial, whether it is still alive, and handing a trial back.

Every running trial records its worker (machine, pid, host, GPU) and a heartbeat. A trial whose
worker is gone (its process on this machine has exited, or it has been silent for
``grace_period``; a trial with no worker recorded counts from its start) is FAILED with the
``abandoned`` user attr and queued again with the same params. A worker stopped by SIGTERM (SLURM
sends it before a time limit or preemption) or Ctrl-C hands its running trial back the same way
at once, instead of leaving it to the grace period.
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

log = logging.getLogger(__name__)

WORKER_ATTR = "fdfa:worker"  # trial system attr: {"machine", "pid", "host", "gpu"} of its worker
HEARTBEAT_ATTR = "fdfa:heartbeat"  # trial system attr: time.time() of its worker's last beat


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def record_heartbeat(storage, trial_id: int) -> None:
    storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds, in a thread."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fdfa-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                record_heartbeat(self.storage, self.trial_id)
            except Exception as err:  # a missed beat is harmless; the next one may get through
                log.debug("heartbeat of trial id %d failed: %s", self.trial_id, err)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def counts(trial) -> bool:
    """Whether a trial takes a place of n_trials (not a FAILED one that was queued again)."""
    return not (trial.state == TrialState.FAIL and trial.user_attrs.get("abandoned"))


def hand_back(study: optuna.Study, storage, trial, reason: str) -> bool:
    """Fail a running trial as abandoned and queue its params again; False if it had finished."""
    try:
        storage.set_trial_user_attr(trial._trial_id, "abandoned", True)
        storage.set_trial_user_attr(
            trial._trial_id, "fail_reason", f"abandoned: {reason}; queued again"
        )
        if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # it finished after all
    study.enqueue_trial(trial.params, user_attrs={"redo_of": trial.number})
    log.warning("trial %d abandoned (%s): failed, and queued again", trial.number, reason)
    return True


def fail_abandoned(study: optuna.Study, storage, machine: str, grace_period: float) -> None:
    """Hand back every running trial whose worker is gone (call under the study's lock)."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker, beat = t.system_attrs.get(WORKER_ATTR), t.system_attrs.get(HEARTBEAT_ATTR)
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
        hand_back(study, storage, t, reason)


class StopSignals(SignalHandler):
    """While entered: SIGTERM and SIGINT set ``received``, are passed on to ``children`` (worker
    processes this one started), and stop a running trial's job by raising ``Preempted`` in it
    (only inside ``job()``, never in the middle of the sweeper's own storage calls). A trainer
    that handles the signal itself ends its job its own way; the sweeper then sees ``received``
    set or the job's ``interrupted`` status and hands the trial back all the same."""

    def __init__(self, children=()):
        self.children = children  # a list of Popen; read when a signal comes
        self.received: str | None = None  # the name of the first signal
        self._in_job = False

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if first:
            for child in self.children:
                with contextlib.suppress(OSError):
                    child.send_signal(signum)
        if self._in_job:
            self._in_job = False  # once: the job's own cleanup may take a while
            raise Preempted(f"stopped by {self.received}")

    @contextlib.contextmanager
    def job(self):
        self._in_job = True
        try:
            yield
        finally:
            self._in_job = False
