"""Processes that end or start at the wrong moment (issue 32): a signal to a sweep command with two
workers, a worker killed with SIGKILL, a fresh start in a finished run's dir, a logger that is
slow to start, two grids in the same second, a checkpoint write killed halfway.

Real processes and signals where the issue's case is about them; every wait is bounded."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from fdfa import checkpoint
from fdfa.processes import pid_alive
from fdfa.train import train
from hydra_plugins.fdfa_optuna_sweeper._liveness import WORKER_ATTR
from tests.helpers import REPO, compose_config, run_cli, synthetic_overrides
from tests.sweep_helpers import (
    HeldData,
    finish,
    held_trials,
    load,
    meeting_of,
    started,
    sweep_cli,
    wait_until,
)

TINY_RUN = synthetic_overrides("model.width=32", "algorithm=bp", "trainer.epochs=1")


class PacedData(HeldData):
    """HeldData whose training batches each take ``step_s`` longer, whose process leaves its pid
    in ``training_dir`` when it fetches its first batch (a trial that is surely training when the
    test signals), and kills itself with SIGKILL when it fetches batch ``kill_at_batch`` (a kill
    in the middle of epoch 1)."""

    def __init__(self, step_s=0.0, training_dir=None, kill_at_batch=0, **kwargs):
        super().__init__(**kwargs)
        self.step_s, self.training_dir, self.kill_at_batch = step_s, training_dir, kill_at_batch

    def train_batches(self, perm=None, start=0):
        for i, batch in enumerate(super().train_batches(perm, start), start + 1):
            if self.training_dir:
                Path(self.training_dir).mkdir(exist_ok=True)
                (Path(self.training_dir) / str(os.getpid())).touch()
            if i == self.kill_at_batch:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(self.step_s)
            yield batch


PACED = "dataset._target_=tests.test_robustness_processes.PacedData"


def worker_pids(sweep_dir: Path) -> set[int]:
    trials = load(sweep_dir).trials
    return {t.user_attrs[WORKER_ATTR]["pid"] for t in trials if WORKER_ATTR in t.user_attrs}


def kill_leftovers(pids) -> None:
    """End (SIGKILL) the worker processes a failing test left running."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# ---- item 7: a signal to the sweep command reaches every worker it started ---------------------


@pytest.mark.slow  # two processes of several seconds' start each
def test_sigterm_to_the_sweep_command_stops_every_worker(tmp_path):
    """Both workers train their trial (the command's own trial in its trainer, whose signal
    handler is then the trainer's); SIGTERM to the command alone stops both after their step:
    each hands its trial back, no other trial starts, and the command exits in bounded time."""
    sweep_dir, training = tmp_path / "sweep", tmp_path / "training"
    cmd = [
        PACED,
        "+dataset.step_s=0.05",  # 8 batches an epoch: 0.4 s; 50 epochs: 20 s a trial
        f"+dataset.training_dir={training}",
        "trainer.epochs=50",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.grace_period=3600",  # handed back because stopped, not silent
        *meeting_of(2, tmp_path / "met"),
    ]
    command = sweep_cli(sweep_dir, *cmd, popen=True)
    try:
        pids = wait_until(
            lambda: (
                {int(p.name) for p in training.iterdir()}
                if len(os.listdir(training)) == 2
                else None
            ),
            command,
            180,
            "both workers training",
        )
        assert command.pid in pids and pids == worker_pids(sweep_dir)
        t0 = time.time()
        command.send_signal(signal.SIGTERM)  # to the command only, as `kill PID` does
        out = finish(command, 60)
        assert command.returncode == 143, out[-3000:]
        assert time.time() - t0 < 60
        (child,) = pids - {command.pid}
        assert not pid_alive(child)  # it stopped too (and was reaped)
        trials = load(sweep_dir).trials
        assert [t.state for t in trials[:2]] == [TrialState.FAIL] * 2
        assert sorted(t.user_attrs.get("redo_of") for t in trials[2:]) == [0, 1]
        assert all(t.state == TrialState.WAITING for t in trials[2:])  # no other trial started
        for n in (0, 1):  # each stopped after its step, checkpoint written
            summary = json.loads((sweep_dir / str(n) / "summary.json").read_text())
            assert summary["status"] == "interrupted"
            assert (sweep_dir / str(n) / "last.ckpt").is_file()
        worker_log = (sweep_dir / "worker-1.log").read_text()
        assert "SIGTERM: stopped at epoch" in worker_log, worker_log[-2000:]
        assert "handed back" in worker_log.splitlines()[-1]
    finally:
        command.kill()
        kill_leftovers(worker_pids(sweep_dir) if (sweep_dir / "optuna.db").exists() else ())


# ---- item 9: a worker killed with SIGKILL is noticed at once ------------------------------------


@pytest.mark.slow  # two processes of several seconds' start each
def test_sigkilled_worker_trial_is_handed_back_at_once(tmp_path):
    """The command's second worker dies by SIGKILL mid-trial: the command reaps it, hands its
    trial back without waiting for the grace period, runs it itself and ends complete."""
    hold, _, held = held_trials(tmp_path)
    sweep_dir = tmp_path / "sweep"
    cmd = [
        *held,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.confirm_seeds=0",
        "hydra.sweeper.grace_period=3600",  # before: waited this long for the dead worker
    ]
    command = sweep_cli(sweep_dir, *cmd, popen=True)
    try:
        running = (TrialState.RUNNING,)
        pids = wait_until(
            lambda: (
                len(worker_pids(sweep_dir)) == 2
                and len(load(sweep_dir).get_trials(states=running)) == 2
                and worker_pids(sweep_dir)
            ),
            command,
            180,
            "two running trials",
        )
        (child,) = pids - {command.pid}
        os.kill(child, signal.SIGKILL)
        hold.unlink()
        out = finish(command, 90)
        assert command.returncode == 0, out[-3000:]
        assert "was killed by SIGKILL" in out, out[-3000:]
        trials = load(sweep_dir).trials
        killed = next(t for t in trials if t.user_attrs[WORKER_ATTR]["pid"] == child)
        (redo,) = [t for t in trials if t.user_attrs.get("redo_of") == killed.number]
        assert killed.state == TrialState.FAIL and "has stopped" in redo.user_attrs["redo_reason"]
        assert redo.state == TrialState.COMPLETE and redo.params == killed.params
        assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    finally:
        command.kill()
        hold.unlink(missing_ok=True)


# ---- item 4: a fresh start in a finished run's dir moves the old run aside ----------------------


def test_fresh_start_in_a_finished_run_dir_moves_the_old_run_aside(tmp_path):
    """``trainer.resume=never`` into a finished run's dir, killed (SIGKILL) in epoch 1: the dir
    holds the new run's files only (no old ``completed`` summary beside the new records); the old
    run is whole in ``previous-1/``."""
    run_dir = tmp_path / "run"
    train(compose_config(TINY_RUN), run_dir)  # the finished run (in this process: quicker)
    old_records = (run_dir / "metrics.jsonl").read_text()
    second = run_cli(
        [
            *TINY_RUN,
            f"hydra.run.dir={run_dir}",
            "trainer.resume=never",
            PACED,
            "+dataset.kill_at_batch=4",
            "metrics.every_n_steps=1",  # records in epoch 1 before the kill
            "metrics.jacobian_metrics=false",
        ]
    )
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert not (run_dir / "summary.json").exists()  # the old `completed` one is not here
    assert f"moved to {run_dir / 'previous-1'}" in second.stderr + second.stdout
    new = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in new] == [1, 2, 3] and all("test/acc" not in r for r in new)
    old = run_dir / "previous-1"
    assert json.loads((old / "summary.json").read_text())["status"] == "completed"
    assert (old / "metrics.jsonl").read_text() == old_records
    assert (old / "last.ckpt").is_file() and (old / "best.ckpt").is_file()
    assert "trainer.resume=never" in (run_dir / ".hydra" / "overrides.yaml").read_text()


# ---- item 6: a slow logger's start is not counted as training time ------------------------------

SLOW_START_S = 2.0


class SlowStartLogger:
    """A logger whose start takes SLOW_START_S (as W&B online without a network does)."""

    def __init__(self, **_):
        time.sleep(SLOW_START_S)

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


def test_slow_logger_start_is_setup_time_not_epoch_time(tmp_path):
    logger = "+logger.slow._target_=tests.test_robustness_processes.SlowStartLogger"
    summary = train(compose_config([*TINY_RUN, logger]), tmp_path)
    (record,) = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "time_s" in r]
    assert record["time_s"] < SLOW_START_S  # an epoch of 8 tiny steps, without the wait
    assert summary["wall_s"] < SLOW_START_S
    assert summary["setup_s"] >= SLOW_START_S  # recorded apart
    assert json.loads((tmp_path / "summary.json").read_text())["setup_s"] == summary["setup_s"]


# ---- two grids started in the same second -------------------------------------------------------


@pytest.mark.slow  # two processes of several seconds' start each
def test_two_grids_named_by_the_same_time_get_their_own_dirs(tmp_path):
    """Two grids whose sweep dir is named by the time, started together (named by the year
    here, so that they surely share the name): each gets its own dir, its job completes there
    (before: both jobs wrote into the one dir's ``0/``)."""
    timed = f"hydra.sweep.dir={tmp_path}/grid/${{now:%Y}}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, str(REPO / "run.py"), "-m", "seed=0", *TINY_RUN, timed]
    grids = [started(cmd, env) for _ in range(2)]
    outs = [finish(grid, 240) for grid in grids]
    assert [grid.returncode for grid in grids] == [0, 0], outs
    year = time.strftime("%Y")
    dirs = sorted(p.name for p in (tmp_path / "grid").iterdir())
    assert dirs == [year, f"{year}-1"]
    for d in dirs:
        summary = json.loads((tmp_path / "grid" / d / "0" / "summary.json").read_text())
        assert summary["status"] == "completed"


# ---- checkpoint temp files left by a kill during a write ----------------------------------------


def test_temp_file_of_a_write_killed_halfway_is_removed_on_start(tmp_path):
    """A process killed (SIGKILL) while writing last.ckpt leaves its temp file; the next run in
    that dir removes it. A temp file whose writer is alive (here: this test) stays."""
    killed_mid_write = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from fdfa import checkpoint\n"
        "def write(f):\n"
        "    f.write(b'x' * 100000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.write_atomic(Path(sys.argv[1]) / 'last.ckpt', write)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", killed_mid_write, str(tmp_path)], cwd=REPO, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".last.ckpt.*.tmp")
    assert left.stat().st_size == 100000
    live = tmp_path / f".best.ckpt.{os.getpid()}.abcd1234.tmp"  # a writer still at work
    live.write_bytes(b"y")
    train(compose_config(TINY_RUN), tmp_path)
    assert not left.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [live.name]


def test_temp_file_without_a_pid_is_removed_once_old(tmp_path):
    """Temp files of an older fdfa (no pid in the name): removed when unmodified for an hour."""
    old, recent = tmp_path / ".last.ckpt.k2j3h4g5.tmp", tmp_path / ".best.ckpt.a1b2c3d4.tmp"
    for path in (old, recent):
        path.write_bytes(b"z")
    hour_ago = time.time() - checkpoint.STALE_UNOWNED_S - 60
    os.utime(old, (hour_ago, hour_ago))
    checkpoint.remove_stale_temps(tmp_path)
    assert not old.exists() and recent.exists()


def test_workers_that_do_not_stop_after_a_signal_are_killed_in_bounded_time(tmp_path, monkeypatch):
    """Once told to stop, the command waits STOP_WAIT_S at most for the workers it started,
    then kills them (their trials are then handed back by the liveness check)."""
    from hydra_plugins.fdfa_optuna_sweeper import _loop

    monkeypatch.setattr(_loop, "STOP_WAIT_S", 0.5)
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    worker = _loop.Worker(None, [], None, 0)
    worker.studies, worker.children = [], [(stuck, tmp_path / "worker-1.log")]
    worker.signals.received = "SIGTERM"
    t0 = time.monotonic()
    try:
        assert worker._wait_for_children() == []  # killed by us: a warning, not a failure
    finally:
        stuck.kill()
    assert time.monotonic() - t0 < 30 and stuck.returncode == -signal.SIGKILL
