"""A study's storage under stress (issue 32): a resumed study with a fixed sampler seed, a journal
with a torn or broken record, a journal path without an extension, a SQLite file another process
holds locked, a disk that fills up mid-sweep.

Most tests drive the worker loop in this process (``Worker`` with ``FakeRunner``: a job is one
function call) on a study made with Optuna directly; two run ``python run.py -m`` for what only a
real command shows (the one-line error and its exit code, a real full disk)."""

import json
import logging
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from fdfa.errors import DiskFullError, FdfaError
from hydra_plugins.fdfa_optuna_sweeper import _results as results
from hydra_plugins.fdfa_optuna_sweeper import _storage as storage
from hydra_plugins.fdfa_optuna_sweeper._liveness import abandoned
from hydra_plugins.fdfa_optuna_sweeper._loop import Worker
from hydra_plugins.fdfa_optuna_sweeper._plan import Options, Plan
from tests.sweep_helpers import finish, held_trials, load, sweep_cli, wait_for

LR = {"optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True)}


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The in-process workers write their results without plots (seconds each, nothing here)."""
    monkeypatch.setattr(results, "save_plots", lambda study, sweep_dir: None)


class FakeRunner:
    """A JobRunner whose job returns ``value`` at once, or raises ``error`` (then no more)."""

    def __init__(self, tmp_path: Path, value: float = 0.5, error: BaseException | None = None):
        self.tmp_path, self.value, self.error = tmp_path, value, error

    def run(self, overrides, index, callbacks=()):
        ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=self.value)
        if self.error is not None:
            ret.status, ret.return_value, self.error = JobStatus.FAILED, self.error, None
        out = self.tmp_path / str(index)
        ret.hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(out)}}})
        return ret


def run_worker(tmp_path, n_trials, space=LR, runner=None, url=None, seed=7):
    """One worker of the study ``s`` (RandomSampler with ``seed``) until it holds n_trials."""
    options = Options(
        sampler=OmegaConf.create({"_target_": "optuna.samplers.RandomSampler", "seed": seed}),
        pruner=OmegaConf.create({"_target_": "optuna.pruners.NopPruner"}),
        n_trials=n_trials,
        heartbeat_interval=0.5,
        grace_period=5,
    )
    url = url or f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = Plan(space, [], tmp_path, "s", url, seed, trial_seed=0)
    Worker(options, plan, runner or FakeRunner(tmp_path), 0).work(OmegaConf.create({}))
    return optuna.load_study(study_name="s", storage=storage.make_storage(url))


# ----------------------------------------------------- item 3: a resume never repeats params


def test_resuming_with_a_fixed_seed_draws_params_no_trial_had(tmp_path):
    run_worker(tmp_path, n_trials=2)
    study = run_worker(tmp_path, n_trials=4)  # the same command, grown: trials 2 and 3
    lrs = [t.params["optimizer.lr"] for t in study.trials]
    assert len(lrs) == 4 and len(set(lrs)) == 4, lrs
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_a_small_space_is_tried_point_by_point_then_a_repeat_is_said(tmp_path, caplog):
    space = {"algorithm": CategoricalDistribution(["bp", "dfa", "fa"])}
    run_worker(tmp_path, 1, space)
    study = run_worker(tmp_path, 3, space, seed=1)
    gone = abandoned(study.trials)  # repeats failed and replaced by a new point
    done = [t.params["algorithm"] for t in study.trials if t.number not in gone]
    assert sorted(done) == ["bp", "dfa", "fa"]
    assert all(
        t.user_attrs["fail_reason"].startswith("repeats") for t in study.trials if t.number in gone
    )
    with caplog.at_level(logging.WARNING):
        study = run_worker(tmp_path, 4, space)
    assert "all 3 points of the search space have been tried" in caplog.text
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 4


# ---------------------------------------- item 10: fdfa's journal lock is never Optuna's lock


@pytest.mark.parametrize("name", ["study", "study.journal", "optuna.db"])
def test_journal_lock_is_never_the_lock_file_optuna_writes_under(tmp_path, name):
    url = f"journal:{tmp_path / name}"
    study, _, lock = storage.open_study(url, "s", "maximize")
    assert storage.StudyLock(url, "s").path != Path(f"{tmp_path / name}.lock")
    with lock():  # leaves fdfa's lock file behind, as every sweep does
        pass
    done = threading.Event()

    def write():
        study.tell(study.ask(), 1.0)  # takes Optuna's lock file
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(10), "a journal write stalled on a lock file held by nobody"


# ------------------------------------------------------------ item 5: torn or broken journal


def journal_with_two_trials(tmp_path: Path) -> tuple[str, Path]:
    path = tmp_path / "j" / "study"
    url = f"journal:{path}"
    study, _, _ = storage.open_study(url, "s", "maximize")
    for value in (0.1, 0.2):
        study.tell(study.ask(), value)
    return url, path


def test_a_torn_last_journal_record_is_cut_kept_and_never_built_on(tmp_path, caplog):
    url, path = journal_with_two_trials(tmp_path)
    torn = b'{"op_code":6,"worker_id":"w","trial_id":1,"state":1,"val'  # disk full mid-record
    with path.open("ab") as f:
        f.write(torn)
    for value in (0.3, 0.4):  # two reruns, each opening the study and adding a trial
        with caplog.at_level(logging.WARNING):
            study, _, _ = storage.open_study(url, "s", "maximize")
        study.tell(study.ask(), value)
    assert [t.value for t in load(tmp_path, "s", storage.make_storage(url)).trials] == [
        0.1,
        0.2,
        0.3,
        0.4,
    ]
    (kept,) = path.parent.glob("study.torn-*")
    assert kept.read_bytes() == torn
    assert caplog.text.count("torn record") == 1 and str(kept) in caplog.text
    for line in path.read_bytes().splitlines():
        json.loads(line)


def test_a_broken_journal_record_is_refused_with_the_repair(tmp_path):
    url, path = journal_with_two_trials(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(3, b"garbage\n")
    path.write_bytes(b"".join(lines))
    with pytest.raises(FdfaError, match="line 4 is not a journal record") as err:
        storage.open_study(url, "s", "maximize")
    assert f"head -n 3 {path}.broken > {path}" in str(err.value)


def test_a_sweep_on_a_broken_journal_stops_with_one_error_line(tmp_path):
    url, path = journal_with_two_trials(tmp_path)
    with path.open("ab") as f:
        f.write(b"\x00\x00garbage\n")
    proc = sweep_cli(tmp_path / "sweep", f"hydra.sweeper.storage={url}")
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: journal study file"), proc.stderr


# ------------------------------------------------------------------ item 8: a locked SQLite file


@pytest.fixture
def held_sqlite(tmp_path):
    """A SQLite study ``s`` and a connection holding its file in an exclusive transaction."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    holder = sqlite3.connect(tmp_path / "optuna.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    yield url, holder
    holder.close()


def test_a_locked_sqlite_study_is_announced_then_given_up_in_one_line(held_sqlite, caplog):
    url, _ = held_sqlite
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(FdfaError) as err:
        storage.open_study(url, "s", "maximize", timeout_s=3)
    assert time.monotonic() - started < 15
    assert "another process holds it locked" in caplog.text
    assert "giving up after 3 s (hydra.sweeper.storage_timeout_s)" in caplog.text
    assert "stayed locked for 3 s" in str(err.value) and "\n" not in str(err.value)


def test_a_sweep_waits_for_a_lock_given_back_and_goes_on(held_sqlite, caplog):
    url, holder = held_sqlite
    threading.Timer(3, holder.execute, args=("ROLLBACK",)).start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        study, _, _ = storage.open_study(url, "s", "maximize", timeout_s=60)
    assert 2 < time.monotonic() - started < 30
    assert "another process holds it locked" in caplog.text and "free again" in caplog.text
    assert study.study_name == "s"


# ---------------------------------------------- disk full: after space is freed, a rerun heals


def test_a_trial_stopped_by_a_full_disk_is_redone_by_the_rerun(tmp_path):
    full = DiskFullError("no space left on the device of /run (needs 1 MB)")
    with pytest.raises(FdfaError, match="free space and rerun the same command"):
        run_worker(tmp_path, 2, runner=FakeRunner(tmp_path, error=full))
    study = run_worker(tmp_path, 2)  # space freed: the same command
    gone = abandoned(study.trials)
    done = [t for t in study.trials if t.number not in gone]
    assert [t.state for t in done] == [TrialState.COMPLETE] * 2
    assert study.trials[1].params == study.trials[0].params  # trial 0 redone as trial 1


@pytest.mark.slow
def test_a_real_full_disk_mid_sweep_heals_after_space_is_freed(tmp_path):
    """A tmpfs of 4 MB holds the sweep dir and its SQLite study; a file fills it while trial 0
    is held before it trains. Needs root (mount); two sweep commands (slow on a loaded machine;
    test_a_trial_stopped_by_a_full_disk_is_redone_by_the_rerun is its fast, simulated twin)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        hold, started, overrides = held_trials(tmp_path)
        args = ("hydra.sweeper.n_trials=2", "hydra.sweeper.confirm_seeds=0", *overrides)
        proc = sweep_cli(mnt / "sweep", *args, popen=True)
        wait_for(started, proc)
        subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'fill'}", "bs=64k"], capture_output=True)
        hold.unlink()
        out = finish(proc, 120)
        assert proc.returncode == 2, out
        assert "Traceback" not in out and "free space and rerun the same command" in out, out
        (mnt / "fill").unlink()
        again = sweep_cli(mnt / "sweep", *args)
        assert again.returncode == 0, again.stdout + again.stderr
        study = load(mnt / "sweep")
        gone = abandoned(study.trials)
        done = [t.state for t in study.trials if t.number not in gone]
        assert done == [TrialState.COMPLETE] * 2, [t.user_attrs for t in study.trials]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
