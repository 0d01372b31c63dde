"""Optuna sweeps (hydra_plugins/fdfa_optuna_sweeper, fdfa/sweep_job.py, sweeps/*.yaml).

Each CLI test is ``python run.py -m sweep=lr ...`` on the tiny synthetic task (256 samples of 1x8x8,
4 classes, 8 steps per epoch) with a narrow FC net, so a trial takes about a second; process start
is the main cost. Deterministic outcomes come from trials queued with ``study.enqueue_trial`` (the
sweep runs queued trials first), not from the sampler.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from fdfa import checkpoint
from fdfa.errors import FdfaError
from fdfa.sweep_job import Pruned, TrialReporter, job_of
from hydra_plugins.fdfa_optuna_sweeper import _command as command
from hydra_plugins.fdfa_optuna_sweeper import _liveness as liveness
from hydra_plugins.fdfa_optuna_sweeper import _results as results
from hydra_plugins.fdfa_optuna_sweeper import _space as space
from hydra_plugins.fdfa_optuna_sweeper import _storage as storage
from tests.helpers import REPO, run_cli
from tests.sweep_helpers import (
    SLOW,
    TINY,
    finished,
    held_trials,
    load,
    meeting_of,
    queue,
    sqlite_url,
    sweep_cli,
    wait_for,
)

SWEEPS = REPO / "sweeps"
# ------------------------------------------------------------------------- fast, in-process


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tag(log, interval(1e-5, 1e-2))", FloatDistribution(1e-5, 1e-2, log=True)),
        ("interval(0.9, 0.999)", FloatDistribution(0.9, 0.999)),
        ("tag(int, interval(1, 4))", IntDistribution(1, 4)),
        ("range(1, 10, 3)", IntDistribution(1, 7, step=3)),  # like range(): 1, 4, 7
        ("choice(0.9, 0.99)", CategoricalDistribution([0.9, 0.99])),
        ("bp,dfa", CategoricalDistribution(["bp", "dfa"])),
    ],
)
def test_search_space_grammar_of_the_official_plugin(text, expected):
    override = OverridesParser.create().parse_override(f"key={text}")
    assert space.to_distribution(override) == expected


@pytest.mark.parametrize(
    "text", ["tag(cube, interval(1, 2))", "tag(log, interval(0, 1))", "interval(2, 1)"]
)
def test_bad_search_space_is_a_user_error(text):
    override = OverridesParser.create().parse_override(f"optimizer.lr={text}")
    with pytest.raises(FdfaError, match="optimizer.lr"):
        space.to_distribution(override)


def test_sampled_values_become_overrides_hydra_parses_back():
    parser = OverridesParser.create()
    for value in (1e-05, 0.99, 3, True, None, "dfa", "a b'c"):
        text = space.override_value(value)
        assert parser.parse_override(f"key={text}").value() == value


def test_trial_reporter_reports_each_epoch_and_prunes():
    """With MedianPruner(n_startup_trials=1), a trial below the first trial's value at the same
    epoch is pruned there (by fdfa's own Pruned); the reporter keeps the best value as the
    trial's result."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(1))
    run = None  # the reporter needs nothing from the run
    first = TrialReporter(study.ask(), "test/acc", "maximize")
    for epoch, acc in [(1, 0.5), (2, 0.8), (3, 0.7)]:
        first.on_evaluation(run, {"epoch": epoch, "test/acc": acc})
    study.tell(first.trial, first.best)
    assert study.trials[0].value == 0.8 and study.trials[0].intermediate_values == {
        1: 0.5,
        2: 0.8,
        3: 0.7,
    }
    second = TrialReporter(study.ask(), "test/acc", "maximize")
    second.on_evaluation(run, {"epoch": 1, "test/acc": 0.6})  # above 0.5: goes on
    with pytest.raises(Pruned):
        second.on_evaluation(run, {"epoch": 2, "test/acc": 0.3})  # below 0.8: pruned
    with pytest.raises(FdfaError, match="hydra.sweeper.objective"):
        second.on_evaluation(run, {"epoch": 3, "test/loss": 1.0})


def test_a_job_reads_its_link_from_the_sweep_job_node():
    """The one config node a sweeper sets (conf/config.yaml), with defaults for older configs."""
    assert job_of({}) == {"kind": "train", "number": None, "group": None, "rule": None}
    cfg = compose_sweep("lr")
    assert job_of(OmegaConf.to_container(cfg)) == job_of({})
    node = {"sweep_job": {"kind": "trial", "number": 3, "group": "lr-bp", "rule": None}}
    assert job_of(node) == node["sweep_job"]
    # a checkpoint written before the node existed still resumes (fdfa/checkpoint.py)
    assert checkpoint.config_differences({"seed": 0}, {"seed": 0, **node}) == []


def test_silent_or_dead_workers_trials_are_failed_and_queued_again(tmp_path):
    """A running trial is abandoned when its heartbeat is older than grace_period (any
    machine), or at once when its worker's process on this machine is gone."""
    store = storage.make_storage(sqlite_url(tmp_path))
    study = optuna.create_study(study_name="s", storage=store, direction="maximize")
    machine = liveness.machine_id()
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = time.time()
    workers = {
        "silent": ({"machine": "elsewhere", "pid": 1, "host": "b"}, now - 61),
        "slow but beating": ({"machine": "elsewhere", "pid": 1, "host": "b"}, now - 5),
        "dead": ({"machine": machine, "pid": dead.pid, "host": "a"}, now),
        "alive": ({"machine": machine, "pid": os.getppid(), "host": "a"}, now),
    }
    for worker, beat in workers.values():
        trial = study.ask({"x": FloatDistribution(0, 10)})
        trial.set_user_attr(liveness.WORKER_ATTR, worker)
        trial.set_user_attr(liveness.HEARTBEAT_ATTR, beat)
    liveness.fail_abandoned(study, machine, grace_period=60.0)
    trials = study.get_trials()
    states = {name: trials[i].state for i, name in enumerate(workers)}
    assert states == {
        "silent": TrialState.FAIL,
        "slow but beating": TrialState.RUNNING,
        "dead": TrialState.FAIL,
        "alive": TrialState.RUNNING,
    }
    redos = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["redo_of"] for t in redos) == [0, 2]
    for redo in redos:  # same parameters as the abandoned trial
        assert redo.system_attrs["fixed_params"] == trials[redo.user_attrs["redo_of"]].params
    assert liveness.places_taken(trials) == 4  # 2 running, 2 redos: the abandoned take none
    reasons = {t.user_attrs["redo_of"]: t.user_attrs["redo_reason"] for t in redos}
    assert "no heartbeat" in reasons[0] and "has stopped" in reasons[2]


def test_every_sweep_file_composes_and_parses():
    from hydra import compose, initialize_config_dir

    names = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
    assert {"lr", "fdfa", "fdfa_adam", "dkp", "compare"} <= set(names)
    assert not (REPO / "conf" / "sweep").exists()  # the group comes from sweeps/ itself
    parser = OverridesParser.create()
    for name in names:
        lines = (SWEEPS / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_" and lines[1].startswith(
            "# python run.py -m sweep="
        )
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
        if name == "benchmark":
            continue  # its spaces: test_benchmark_spaces_are_the_sweep_files
        params = OmegaConf.to_container(cfg.hydra.sweeper.params)
        assert params, name
        if name == "compare":
            assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
            continue
        assert cfg.hydra.sweeper._target_.endswith("FdfaOptunaSweeper")
        for key, text in params.items():
            assert OmegaConf.select(cfg, key) is not None, f"{name}: {key} is not a config key"
            space.to_distribution(parser.parse_override(f"{key}={text}"))
    fdfa = compose_sweep("fdfa")
    assert fdfa.algorithm.feedback_update == "ema" and "algorithm.momentum" in (
        fdfa.hydra.sweeper.params
    )
    assert compose_sweep("fdfa_adam").algorithm.feedback_update == "adam"
    assert compose_sweep("dkp").algorithm._target_ == "fdfa.rules.DKP"


def compose_sweep(name: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)


# ------------------------------------------------------------------------- python run.py -m


@pytest.mark.slow
def test_sweep_runs_n_trials_reports_and_resumes(tmp_path):
    no_pruning = "hydra/sweeper/pruner=none"  # each trial's value is then its job's best/val/acc
    res = sweep_cli(
        tmp_path, "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.seed=0", no_pruning
    )
    assert res.returncode == 0, res.stdout + res.stderr
    study = load(tmp_path)
    assert len(study.trials) == 6 and len(finished(study)) == 6
    for trial in study.trials:  # each job ran with its trial's lr, in <sweep dir>/<trial number>
        job = OmegaConf.load(tmp_path / str(trial.number) / ".hydra" / "config.yaml")
        assert (job.sweep_job.kind, job.sweep_job.number) == ("trial", trial.number)
        assert job.sweep_job.group == "lr-bp-fc-fake"
        assert job.optimizer.lr == pytest.approx(trial.params["optimizer.lr"])
        summary = json.loads((tmp_path / str(trial.number) / "summary.json").read_text())
        assert trial.value == summary["best/val/acc"]
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert results.best_value == study.best_value == max(t.value for t in study.trials)
    assert results.best_params["optimizer.lr"] == study.best_params["optimizer.lr"]
    assert f"Best trial {study.best_trial.number}: val/acc" in res.stdout + res.stderr
    for plot in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000

    # The same command with a larger budget continues the study: only the 2 missing trials run,
    # here on 2 worker processes (n_jobs) of this one command.
    more = ["hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=2", no_pruning]
    res = sweep_cli(tmp_path, *more)
    assert res.returncode == 0, res.stdout + res.stderr
    study = load(tmp_path)
    assert [t.number for t in finished(study)] == list(range(8))
    assert sorted(p.name for p in tmp_path.glob("[0-9]*")) == sorted(str(i) for i in range(8))
    assert (tmp_path / "worker-1.log").is_file()


@pytest.mark.slow
def test_two_workers_started_together_share_one_fresh_study(tmp_path):
    cmd = ["hydra.sweeper.n_trials=8", *SLOW, *meeting_of(2, tmp_path / "met")]
    workers = [sweep_cli(tmp_path, *cmd, popen=True) for _ in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for worker, out in zip(workers, outputs):
        assert worker.returncode == 0, out
    study = load(tmp_path)
    assert [t.number for t in finished(study)] == list(range(8)) and len(study.trials) == 8
    pids = {t.user_attrs[liveness.WORKER_ATTR]["pid"] for t in study.trials}
    assert pids == {w.pid for w in workers}  # both contributed


@pytest.mark.slow
def test_failed_and_pruned_trials_do_not_stop_the_sweep(tmp_path):
    """Queued: two good lrs, a too small lr (pruned by the median rule after epoch 1), and an
    lr so large that the loss overflows (the trainer stops: FAILED with the reason)."""
    queue(tmp_path, 1e-2, 1e-2, 1e-7, 1e20)
    res = sweep_cli(
        tmp_path,
        "hydra.sweeper.n_trials=4",
        "trainer.epochs=3",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=2",
        "optimizer.lr=tag(log,interval(1e-8,1e21))",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    good, good2, small, huge = load(tmp_path).trials
    assert good.state == good2.state == TrialState.COMPLETE and good.value > 0.9
    # Adam at 1e-7 leaves the random net near chance (0.25) after epoch 1; at 1e-2 it is > 0.9.
    assert small.state == TrialState.PRUNED and list(small.intermediate_values) == [1]
    summary = json.loads((tmp_path / str(small.number) / "summary.json").read_text())
    assert summary["status"] == "pruned"
    assert huge.state == TrialState.FAIL and "diverged" in huge.user_attrs["fail_reason"]
    assert json.loads((tmp_path / str(huge.number) / "summary.json").read_text())["status"] == (
        "diverged"
    )
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert dict(results.trials) == {"complete": 2, "pruned": 1, "fail": 1}
    # every finished trial has its progress line, a failed one too
    best = f"best {max(good.value, good2.value):.4f}"
    assert f"trial 3 failed (the reason: the warning above); {best}" in res.stdout + res.stderr


@pytest.mark.slow
def test_too_many_failures_stop_the_sweep_with_one_line(tmp_path):
    queue(tmp_path, 1e20, 1e20)
    res = sweep_cli(
        tmp_path,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0.25",
        "optimizer.lr=tag(log,interval(1e-8,1e21))",
    )
    assert res.returncode == 2
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "hydra.sweeper.max_failure_rate=0.25" in error[0]
    assert len(load(tmp_path).trials) == 2  # stopped after the second failure (2 > 0.25 * 4)


@pytest.mark.slow
def test_rerun_redoes_the_trial_of_a_killed_worker(tmp_path):
    hold, started, held = held_trials(tmp_path)
    cmd = ["hydra.sweeper.n_trials=2", *held]
    worker = sweep_cli(tmp_path / "sweep", *cmd, popen=True)
    wait_for(started, worker)
    worker.send_signal(signal.SIGKILL)  # trial 0 is left RUNNING
    worker.communicate()
    hold.unlink()
    assert [t.state for t in load(tmp_path / "sweep").trials] == [TrialState.RUNNING]

    res = sweep_cli(tmp_path / "sweep", *cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    killed, redo, new = load(tmp_path / "sweep").trials
    assert killed.state == TrialState.FAIL and "has stopped" in redo.user_attrs["redo_reason"]
    assert redo.user_attrs["redo_of"] == 0 and redo.params == killed.params
    assert redo.state == new.state == TrialState.COMPLETE


@pytest.mark.slow
def test_sweep_without_a_validation_set_stops_unless_test_selection_is_asked_for(tmp_path):
    res = sweep_cli(tmp_path / "refused", "dataset.val_size=0", "hydra.sweeper.n_trials=1")
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "dataset.val_size=0" in err and "hydra.sweeper.objective=test/acc" in err
    assert not list((tmp_path / "refused").glob("[0-9]*"))  # no trial ran
    asked = ["dataset.val_size=0", "hydra.sweeper.n_trials=1", "hydra.sweeper.objective=test/acc"]
    res = sweep_cli(tmp_path / "asked", *asked)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "selects trials on the test set" in res.stdout + res.stderr
    summary = json.loads((tmp_path / "asked" / "0" / "summary.json").read_text())
    assert load(tmp_path / "asked").trials[0].value == summary["best/test/acc"]


@pytest.mark.slow
def test_confirmation_reruns_the_best_params_with_seeds_and_a_rerun_resumes(tmp_path):
    cmd = ["hydra.sweeper.n_trials=2", "hydra.sweeper.confirm_seeds=2", "hydra/sweeper/pruner=none"]
    res = sweep_cli(tmp_path, *cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    study = load(tmp_path)
    assert len(study.trials) == 2  # confirmation runs are not trials
    # Confirmation runs on seeds no trial used: no record of theirs repeats a trial's record.
    trial_records = {records(tmp_path / str(t.number)) for t in study.trials}
    confirm_dirs = sorted((tmp_path / "confirm").glob("seed*"))
    assert len(confirm_dirs) == 2
    for job in confirm_dirs:
        assert records(job) not in trial_records, f"{job.name} repeats a trial"
    confirm = OmegaConf.to_container(OmegaConf.load(tmp_path / "optimization_results.yaml"))[
        "confirm"
    ]
    # The trials ran at the config's seed (0): confirmation at the trials' seed + 1..N.
    assert confirm["trial"] == study.best_trial.number and confirm["seeds"] == [1, 2]
    assert confirm["trial_seed"] == 0
    values = []
    for seed in (1, 2):
        job = tmp_path / "confirm" / f"seed{seed}"
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert config.seed == seed
        assert config.optimizer.lr == pytest.approx(study.best_params["optimizer.lr"])
        summary = json.loads((job / "summary.json").read_text())
        assert confirm["selected_test_acc"][seed] == summary["selected/test/acc"]
        values.append(summary["selected/test/acc"])
    assert confirm["mean"] == pytest.approx(sum(values) / 2)
    half = 12.7062047 * abs(values[0] - values[1]) / 2  # t_{0.975,1} * s / sqrt(2), s = |a-b|/sqrt2
    assert confirm["ci95_half_width"] == pytest.approx(half, rel=1e-7, abs=1e-12)
    assert confirm["missing_seeds"] == []

    # A rerun runs only what is missing: seed 2's run is gone, seed 1's stays untouched.
    shutil.rmtree(tmp_path / "confirm" / "seed2")
    kept = (tmp_path / "confirm" / "seed1" / "summary.json").stat().st_mtime_ns
    res = sweep_cli(tmp_path, *cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "confirm" / "seed1" / "summary.json").stat().st_mtime_ns == kept
    assert json.loads((tmp_path / "confirm" / "seed2" / "summary.json").read_text())[
        "selected/test/acc"
    ] == pytest.approx(values[1])
    assert len(load(tmp_path).trials) == 2
    assert "confirmation run, seed 1" not in res.stdout + res.stderr


@pytest.mark.slow
def test_seeds_per_trial_gives_each_trial_the_mean_of_its_seeds(tmp_path):
    """hydra.sweeper.seeds_per_trial=2: each trial trains seeds 0 and 1 (in <trial>/seed<s>),
    its value is the mean of their best val acc (their summaries'), the spread is on the trial
    and in the results file, and confirmation takes the next seed (2), which no trial used."""
    cmd = ["hydra.sweeper.n_trials=2", "hydra.sweeper.seeds_per_trial=2"]
    res = sweep_cli(tmp_path, *cmd, "hydra.sweeper.confirm_seeds=1", "hydra/sweeper/pruner=none")
    assert res.returncode == 0, res.stdout + res.stderr
    study = load(tmp_path)
    assert len(study.trials) == 2
    for trial in study.trials:
        values = {}
        for seed in (0, 1):
            job = tmp_path / str(trial.number) / f"seed{seed}"
            config = OmegaConf.load(job / ".hydra" / "config.yaml")
            assert (config.seed, config.sweep_job.number) == (seed, trial.number)
            assert config.optimizer.lr == pytest.approx(trial.params["optimizer.lr"])
            values[seed] = json.loads((job / "summary.json").read_text())["best/val/acc"]
        assert trial.value == pytest.approx((values[0] + values[1]) / 2, abs=1e-12)
        assert trial.user_attrs["seed_values"] == {"0": values[0], "1": values[1]}
        assert trial.user_attrs["seed_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    results = OmegaConf.to_container(OmegaConf.load(tmp_path / "optimization_results.yaml"))
    assert results["seeds_per_trial"] == 2 and results["trial_seeds"] == [0, 1]
    best = study.best_trial
    assert results["best_seed_values"] == {
        int(k): v for k, v in best.user_attrs["seed_values"].items()
    }
    assert results["confirm"]["seeds"] == [2] and results["confirm"]["trial_seeds"] == [0, 1]
    assert (tmp_path / "confirm" / "seed2" / "summary.json").is_file()


def records(run_dir: Path) -> tuple:
    """A run's metrics.jsonl records without their clock readings: equal for equal training."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    timeless = [{k: v for k, v in json.loads(line).items() if "time" not in k} for line in lines]
    return tuple(json.dumps(r, sort_keys=True) for r in timeless)


@pytest.mark.slow
def test_compare_sweep_is_a_grid_of_rules_and_seeds(tmp_path):
    tiny = [a for a in TINY if not a.startswith("algorithm=")]
    # The command line narrows the file's grid (algorithm: bp,dfa,dkp,fdfa, seed: 0,1,2).
    res = run_cli(
        ["-m", "sweep=compare", *tiny, "algorithm=bp,dfa", "seed=0", f"hydra.sweep.dir={tmp_path}"]
    )
    assert res.returncode == 0, res.stderr
    runs = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    assert set(runs) == {"bp-seed0", "dfa-seed0"}
    assert {r["algorithm"] for r in runs.values()} == {"bp", "dfa"}


# ------------------------------------------------------------------------------ PostgreSQL


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1] if isinstance(found, list) else found) if found else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (as user postgres when the tests run as root,
    which PostgreSQL refuses); the URL of its ``postgres`` database."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries not found (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'psycopg[binary]'")
    as_user = []
    home = Path(tempfile.mkdtemp(prefix="fdfa-pg-"))
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot start PostgreSQL as non-root")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(home, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = home / "data"
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # SQLAlchemy 2.1: psycopg 3
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_workers_on_two_machines_share_a_postgresql_study(tmp_path, postgres_url):
    """Two workers with separate sweep dirs (as on two machines) and one PostgreSQL study."""
    shared = [
        "hydra.sweeper.n_trials=6",
        f"hydra.sweeper.storage={postgres_url}",
        "hydra.sweeper.study_name=shared",
        *SLOW,
        *meeting_of(2, tmp_path / "met"),
    ]
    workers = [sweep_cli(tmp_path / name, *shared, popen=True) for name in ("a", "b")]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for worker, out in zip(workers, outputs):
        assert worker.returncode == 0, out
    study = load(tmp_path, name="shared", storage=postgres_url)
    assert [t.number for t in finished(study)] == list(range(6)) and len(study.trials) == 6
    assert {t.user_attrs[liveness.WORKER_ATTR]["pid"] for t in study.trials} == {
        w.pid for w in workers
    }
    ran = sorted(int(p.name) for d in ("a", "b") for p in (tmp_path / d).glob("[0-9]*"))
    assert ran == list(range(6))  # each trial ran once, on one of the two "machines"


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_before_any_trial(tmp_path):
    """A study records the settings its trials share: a rerun with trainer.epochs changed stops
    in one line naming trainer.epochs and both ways out; n_trials may change (it resumes)."""
    res = sweep_cli(tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweeper.confirm_seeds=0")
    assert res.returncode == 0, res.stdout + res.stderr
    res = sweep_cli(tmp_path, "hydra.sweeper.n_trials=2", "trainer.epochs=2")
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "trainer.epochs: 1 in the study, 2 now" in err and "trainer.epochs=1" in err
    assert "hydra.sweeper.study_name" in err
    assert len(load(tmp_path).trials) == 1 and not (tmp_path / "1").exists()  # nothing ran
    # nor do confirmation runs at another width (issue 32.2: they would pool two widths): the
    # study has its n_trials, so without the record this rerun would go straight to them
    res = sweep_cli(
        tmp_path, "hydra.sweeper.n_trials=1", "hydra.sweeper.confirm_seeds=1", "model.width=16"
    )
    assert res.returncode == 2 and "model.width: 32 in the study, 16 now" in res.stderr
    assert not (tmp_path / "confirm").exists()
    res = sweep_cli(
        tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.confirm_seeds=0"
    )  # resumes
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(finished(load(tmp_path))) == 2


def test_the_time_left_counts_confirmation_runs_in_waves_of_the_workers():
    """21 trials and 18 confirmation runs on 2 workers, 1 min each: 20 waves (the workers share
    the confirmation seeds), not 11 waves of trials and then 18 runs one after another."""
    line = results.remaining_time(60, 21, 2, 18)
    assert "about 20 min left for 21 more trial(s) on 2 worker(s), then 18 confirmation" in line
    assert "about 3 min left for 0 more" in results.remaining_time(60, 0, 1, 3)
    assert "about 60 s left for 1 more" in results.remaining_time(60, 1, 4, 0)


def test_a_launcher_sweep_short_of_its_trials_ends_in_an_error_line(caplog):
    """With a Hydra launcher the command waits for its worker jobs, then: a study short of
    n_trials is one error line saying how to resume, whether or not a job failed; failed jobs
    of finished studies are warnings; a user's error comes first, as it is."""
    with pytest.raises(FdfaError, match=r"without an error; study 'lr-x' has 3 of 8 trials: run"):
        command.launch_outcome([], [], [("lr-x", 3)], 8)
    with pytest.raises(FdfaError, match=r"^1 worker job\(s\) failed \(killed\); study 'lr-x'"):
        command.launch_outcome(["killed"], [], [("lr-x", 3)], 8)
    bad = FdfaError("model.width must be an integer >= 1, got 0")
    with pytest.raises(FdfaError, match="model.width"):
        command.launch_outcome(["x"], [bad], [("lr-x", 0)], 8)
    with caplog.at_level("WARNING"):
        command.launch_outcome(["killed"], [], [], 8)  # finished all the same: no error
    assert "a worker job failed (the study finished all the same): killed" in caplog.text


@pytest.mark.slow
def test_a_sweep_dir_holds_one_study_and_says_where_its_results_are(tmp_path):
    """A second sweep of another study (algorithm=dfa: study lr-dfa-...) in the same sweep dir
    is refused in one line before it touches anything. A sweep estimates the time left after
    its first trial and ends with where its results and report are."""
    res = sweep_cli(tmp_path, "hydra.sweeper.n_trials=2")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "a trial took" in out and "left for 1 more trial(s) on 1 worker(s)" in out
    last = res.stdout.strip().splitlines()[-2:]
    assert last == [
        f"results: {tmp_path / 'optimization_results.yaml'} (plots: {tmp_path}/*.png)",
        f"report: python -m fdfa.report {tmp_path} --out report/{tmp_path.name}",
    ]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    res = sweep_cli(tmp_path, "hydra.sweeper.n_trials=2", "algorithm=dfa")
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "study 'lr-bp-fc-fake'" in err and "'lr-dfa-fc-fake'" in err
    assert "hydra.sweep.dir=" in err
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing moved, written or added
    assert optuna.get_all_study_names(sqlite_url(tmp_path)) == ["lr-bp-fc-fake"]
