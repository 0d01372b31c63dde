"""Sweeps beyond one process: GPU assignment (with a faked GPU list: CUDA_VISIBLE_DEVICES on a CPU
machine), workers and grids through a real Hydra launcher (submitit_local), the SLURM array
script run locally, SIGTERM handing a trial back, and trials no worker ever claimed.

Same tiny synthetic task as tests/test_sweep.py; every submitit job is a fresh Python process, so
these tests cost process starts more than training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from fdfa import gpus
from fdfa.errors import FdfaError
from hydra_plugins.fdfa_optuna_sweeper import _liveness as liveness
from hydra_plugins.fdfa_optuna_sweeper import _storage as storage
from hydra_plugins.fdfa_optuna_sweeper._launch import resolve_n_jobs
from tests.helpers import REPO, PrototypeData
from tests.sweep_helpers import (
    SLOW,
    TINY,
    finish,
    finished,
    held_trials,
    load,
    meeting_of,
    started,
    sweep_cli,
    wait_for,
)

SUBMITIT = "hydra/launcher=submitit_local"


def needs_submitit():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install '.[cluster]'")


class TrainerLikeData(PrototypeData):
    """Handles SIGTERM itself, as the trainer does: writes status ``interrupted`` to the job's
    summary.json and raises an exception of its own, which the sweeper does not know."""

    def __init__(self, started_file=None, **kwargs):
        stop = []
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        try:
            Path(started_file).touch()
            while not stop:
                time.sleep(0.05)
        finally:
            signal.signal(signal.SIGTERM, previous)
        out = Path(HydraConfig.get().runtime.output_dir)
        (out / "summary.json").write_text(json.dumps({"status": "interrupted"}))
        raise RuntimeError("stopped at a step boundary")


def worker_gpus(study) -> dict:
    """pid -> the CUDA_VISIBLE_DEVICES its worker ran with, over the study's trials."""
    return {
        t.user_attrs[liveness.WORKER_ATTR]["pid"]: t.user_attrs[liveness.WORKER_ATTR]["gpu"]
        for t in study.trials
    }


# ------------------------------------------------------------------------- fast, in-process


def test_n_jobs_auto_is_one_worker_per_gpu(monkeypatch):
    import torch

    for var in ("CUDA_VISIBLE_DEVICES", gpus.GPUS_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert gpus.machine_gpus() == ["0", "1", "2"] and resolve_n_jobs("auto") == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_n_jobs("auto") == 1 and resolve_n_jobs(4) == 4  # a CPU machine: one worker
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # what this process may see wins
    assert resolve_n_jobs("auto") == 2
    monkeypatch.setenv(gpus.GPUS_ENV, "1,2,3")  # what the launching command saw wins
    assert gpus.machine_gpus() == ["1", "2", "3"]
    for bad in (0, "two", True):
        with pytest.raises(FdfaError, match="hydra.sweeper.n_jobs"):
            resolve_n_jobs(bad)


def test_assign_gpu_takes_index_mod_g_once_per_process(monkeypatch):
    monkeypatch.setattr(gpus, "_gpu", None)
    monkeypatch.setenv(gpus.GPUS_ENV, "0,1,2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as submitit_local leaves it
    assert gpus.assign_gpu(4) == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert gpus.assign_gpu(0) == "1"  # CUDA may have started: the process keeps its GPU
    monkeypatch.setattr(gpus, "_gpu", None)
    monkeypatch.setenv(gpus.GPUS_ENV, "")
    assert gpus.assign_gpu(3) is None  # no GPUs: nothing to choose
    assert gpus.launcher_is_local(
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    )
    assert not gpus.launcher_is_local(
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )


def test_running_trial_no_worker_claimed_is_redone_after_the_grace_period(tmp_path, monkeypatch):
    """A RUNNING trial without worker and heartbeat attrs (its worker died between ask() and
    recording them, or another tool added it) counts from its start, like a silent worker."""
    store = storage.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=store, direction="maximize")
    orphan = study.ask({"x": FloatDistribution(0, 10)})
    machine = liveness.machine_id()
    liveness.fail_abandoned(study, machine, grace_period=60.0)
    assert study.trials[0].state == TrialState.RUNNING  # young: its worker may still record
    later = time.time() + 61
    monkeypatch.setattr(liveness.time, "time", lambda: later)
    liveness.fail_abandoned(study, machine, grace_period=60.0)
    dead, redo = study.get_trials()
    assert dead.state == TrialState.FAIL and "no worker recorded" in redo.user_attrs["redo_reason"]
    assert redo.state == TrialState.WAITING and redo.user_attrs["redo_of"] == orphan.number
    assert redo.system_attrs["fixed_params"] == dead.params


# ------------------------------------------------------------------------------ real processes


@pytest.mark.slow
def test_local_workers_each_get_their_gpu(tmp_path):
    """n_jobs=auto with 2 (faked) GPUs: 2 worker processes, one on each."""
    cmd = ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=auto", *SLOW]
    cmd += meeting_of(2, tmp_path / "met")  # else worker 0 may run all 4 before worker 1 starts
    proc = sweep_cli(tmp_path, *cmd, popen=True, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    out = finish(proc, 300)
    assert proc.returncode == 0, out
    study = load(tmp_path)
    assert len(finished(study)) == len(study.trials) == 4
    gpus = worker_gpus(study)
    assert gpus == {proc.pid: "0", **{pid: "1" for pid in gpus if pid != proc.pid}}
    assert len(gpus) == 2


@pytest.mark.slow
def test_sigterm_hands_the_running_trial_back_at_once(tmp_path):
    hold, started, held = held_trials(tmp_path)
    held += [
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.grace_period=3600",  # a handed-back trial must not wait for this
    ]
    worker = sweep_cli(tmp_path / "sweep", *held, popen=True)
    wait_for(started, worker)
    t0 = time.time()
    worker.send_signal(signal.SIGTERM)  # trial 0's job is running (blocked in its dataset)
    out = finish(worker, 120)
    assert worker.returncode == 143, out
    assert time.time() - t0 < 60
    # one line says so (the job's own "interrupted" line may follow it)
    assert any("trial 0 handed back" in line for line in out.splitlines()[-2:]), out[-1500:]
    stopped, redo = load(tmp_path / "sweep").trials
    assert stopped.state == TrialState.FAIL and "SIGTERM" in redo.user_attrs["redo_reason"]
    assert redo.state == TrialState.WAITING and redo.user_attrs["redo_of"] == 0
    hold.unlink()
    res = sweep_cli(tmp_path / "sweep", *held)  # the rerun redoes it first
    assert res.returncode == 0, res.stdout + res.stderr
    trials = load(tmp_path / "sweep").trials
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2
    assert trials[1].params == stopped.params


@pytest.mark.slow
def test_sigterm_caught_by_the_job_itself_still_hands_the_trial_back(tmp_path):
    started = tmp_path / "started"
    cmd = [
        "dataset._target_=tests.test_sweep_launchers.TrainerLikeData",
        f"+dataset.started_file={started}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.grace_period=3600",
    ]
    worker = sweep_cli(tmp_path / "sweep", *cmd, popen=True)
    wait_for(started, worker)
    worker.send_signal(signal.SIGTERM)
    out = finish(worker, 120)
    assert worker.returncode == 143, out
    stopped, redo = load(tmp_path / "sweep").trials
    assert stopped.state == TrialState.FAIL and "interrupted" in redo.user_attrs["redo_reason"]
    assert redo.state == TrialState.WAITING and redo.user_attrs["redo_of"] == 0


@pytest.mark.slow
def test_optuna_sweep_through_submitit_local(tmp_path):
    """2 workers as submitit jobs (one per faked GPU), n_trials=4 exactly, report written."""
    needs_submitit()
    cmd = ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra.sweeper.confirm_seeds=2"]
    cmd += [SUBMITIT, *SLOW, *meeting_of(2, tmp_path / "met")]
    proc = sweep_cli(tmp_path, *cmd, popen=True, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    out = finish(proc, 400)
    assert proc.returncode == 0, out
    study = load(tmp_path)
    assert [t.number for t in finished(study)] == list(range(4)) and len(study.trials) == 4
    gpus = worker_gpus(study)
    assert sorted(gpus.values()) == ["0", "1"] and proc.pid not in gpus  # 2 jobs, not the driver
    assert sorted(p.name for p in (tmp_path / "workers").iterdir()) == ["0", "1"]
    assert sorted(p.name for p in tmp_path.glob("[0-9]*")) == ["0", "1", "2", "3"]
    assert results_of(tmp_path / "optimization_results.yaml")["trials"] == {"complete": 4}
    # the confirmation runs ran once each, in one of the worker jobs (under the study's lock)
    assert sorted(p.name for p in (tmp_path / "confirm").glob("seed*")) == ["seed1", "seed2"]
    logs = "".join(p.read_text() for p in tmp_path.glob("**/*.out"))  # the jobs' submitit logs
    assert [logs.count(f"confirmation run, seed {seed}") for seed in (1, 2)] == [1, 1]


@pytest.mark.slow
def test_killed_submitit_worker_trial_is_redone(tmp_path):
    needs_submitit()
    hold, started, held = held_trials(tmp_path)
    cmd = [
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.confirm_seeds=0",
        "hydra.sweeper.grace_period=3600",  # redone because its process is gone, not silent
        SUBMITIT,
        *held,
    ]
    proc = sweep_cli(tmp_path / "s", *cmd, popen=True)
    wait_for(started, proc)
    first = load(tmp_path / "s").trials[0]
    os.kill(first.user_attrs[liveness.WORKER_ATTR]["pid"], signal.SIGKILL)
    hold.unlink()
    out = finish(proc, 400)
    assert proc.returncode == 0, out
    trials = load(tmp_path / "s").trials
    killed = trials[0]
    redo = [t for t in trials if t.user_attrs.get("redo_of") == 0]
    assert killed.state == TrialState.FAIL and "abandoned" in redo[0].user_attrs["redo_reason"]
    assert len(redo) == 1 and redo[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and len(trials) == 3


@pytest.mark.slow
def test_grid_through_submitit_local_one_gpu_per_job(tmp_path):
    needs_submitit()
    tiny = [a for a in TINY if not a.startswith("algorithm=")]
    args = ["-m", "algorithm=bp,dfa", "seed=0,1", *tiny, SUBMITIT, f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "0,1"}
    res = subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = sorted(int(p.name) for p in tmp_path.glob("[0-9]*"))
    assert jobs == [0, 1, 2, 3]
    for job in jobs:
        summary = json.loads((tmp_path / str(job) / "summary.json").read_text())
        assert summary["status"] == "completed"
        log = (tmp_path / str(job) / "run.log").read_text()
        assert f"job {job} on GPU {job % 2} of 0,1" in log


@pytest.mark.slow
def test_slurm_array_script_tasks_share_one_journal_study(tmp_path):
    """scripts/slurm_array.sh run twice at once, as array tasks 0 and 1 of one array job."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FDFA": f"{sys.executable} {REPO / 'run.py'}",
        "SLURM_ARRAY_JOB_ID": "4242",
        "FDFA_SWEEP_DIR": str(tmp_path / "sweep"),
    }
    args = ["sweep=lr", *TINY, "hydra.sweeper.n_trials=4", "hydra.sweeper.confirm_seeds=0", *SLOW]
    args += meeting_of(2, tmp_path / "met")
    script = ["bash", str(REPO / "scripts" / "slurm_array.sh"), *args]
    tasks = [started(script, {**env, "SLURM_ARRAY_TASK_ID": str(i)}) for i in range(2)]
    outputs = [finish(t, 300) for t in tasks]
    for task, out in zip(tasks, outputs):
        assert task.returncode == 0, out
    journal = f"journal:{tmp_path / 'sweep' / 'optuna.journal'}"
    study = optuna.load_study(study_name="sweep-4242", storage=storage.make_storage(journal))
    assert [t.number for t in finished(study)] == list(range(4)) and len(study.trials) == 4
    assert len(worker_gpus(study)) == 2  # both tasks ran trials


def results_of(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))
