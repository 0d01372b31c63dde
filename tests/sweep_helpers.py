"""What the sweep tests (tests/test_sweep.py, tests/test_sweep_launchers.py) share: ``python run.py
-m sweep=...`` on the tiny synthetic task, its study, and jobs the test can hold mid-trial."""

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import REPO, PrototypeData, run_cli, synthetic_overrides

TINY = synthetic_overrides("model.width=32", "algorithm=bp", "trainer.epochs=1")


# trials that take >= 0.5 s each
SLOW = ["dataset._target_=tests.sweep_helpers.HeldData", "+dataset.delay_s=0.5"]


def meeting_of(n: int, where: Path) -> list[str]:
    """Overrides with which no trial starts training until ``n`` distinct processes have begun
    a trial (each leaves its pid in ``where``): every one of ``n`` workers surely runs one,
    however slowly the later workers start. Waits 240 s at most."""
    return [f"+dataset.meet_dir={where}", f"+dataset.meet_n={n}"]


class HeldData(PrototypeData):
    """PrototypeData that, while ``hold_file`` exists, blocks in __init__ after writing
    ``started_file``: a job the test can catch mid-trial (to kill its worker); with
    ``meet_dir``, it waits until ``meet_n`` processes have started a trial (``meeting_of``)."""

    def __init__(
        self, hold_file=None, started_file=None, delay_s=0.0, meet_dir=None, meet_n=0, **kwargs
    ):
        if started_file:
            Path(started_file).touch()
        while hold_file and Path(hold_file).exists():
            time.sleep(0.05)
        if meet_dir:
            Path(meet_dir).mkdir(parents=True, exist_ok=True)
            (Path(meet_dir) / str(os.getpid())).touch()
            deadline = time.time() + 240
            while len(list(Path(meet_dir).iterdir())) < meet_n and time.time() < deadline:
                time.sleep(0.05)
        time.sleep(delay_s)
        super().__init__(**kwargs)


def sweep_cli(
    sweep_dir: Path, *extra: str, sweep: str = "lr", popen: bool = False, env: dict | None = None
):
    """``python run.py -m sweep=<sweep>`` on the tiny task, its sweep dir and SQLite study in
    ``sweep_dir``; returns the finished process, or the running Popen with ``popen=True`` (and
    the extra environment variables ``env``)."""
    args = ["-m", f"sweep={sweep}", *TINY, f"hydra.sweep.dir={sweep_dir}", *extra]
    if not popen:
        return run_cli(args)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", **(env or {})}
    return started([sys.executable, str(REPO / "run.py"), *args], env)


def started(cmd: list[str], env: dict) -> subprocess.Popen:
    """``cmd`` running in the checkout with the environment ``env``, its output (stdout and
    stderr together) for ``finish``."""
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def sqlite_url(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir / 'optuna.db'}"


def load(sweep_dir: Path, name: str = "lr-bp-fc-fake", storage: str | None = None):
    return optuna.load_study(study_name=name, storage=storage or sqlite_url(sweep_dir))


def queue(sweep_dir: Path, *lrs: float, name: str = "lr-bp-fc-fake") -> None:
    """Create the study as the sweep would, with trials at these forward lrs queued first."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=name, storage=sqlite_url(sweep_dir), direction="maximize"
    )
    for lr in lrs:
        study.enqueue_trial({"optimizer.lr": lr})


def finished(study) -> list:
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.trials if t.state in done]


def finish(proc, timeout: float) -> str:
    """The process's output once it exits; killed (and the test then fails) after ``timeout``."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0] + f"\n[killed after {timeout} s]"


def wait_until(condition, proc, seconds: float, what: str):
    """Poll ``condition()`` until it returns something true; fail (killing ``proc``) after
    ``seconds`` or when ``proc`` has exited."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            found = condition()
        except Exception:  # the study or the file does not exist yet
            found = None
        if found:
            return found
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"{what} never happened: {finish(proc, 10)[-3000:]}")


def wait_for(path: Path, proc, seconds: float = 180) -> None:
    """Until ``path`` exists (see wait_until)."""
    wait_until(path.exists, proc, seconds, f"{path.name} appearing")


def held_trials(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """``hold`` (created) and ``started`` in tmp_path, and the overrides with which each trial's
    job touches ``started``, then waits in its dataset (HeldData) while ``hold`` exists."""
    hold, started = tmp_path / "hold", tmp_path / "started"
    hold.touch()
    overrides = [
        "dataset._target_=tests.sweep_helpers.HeldData",
        f"+dataset.hold_file={hold}",
        f"+dataset.started_file={started}",
    ]
    return hold, started, overrides
