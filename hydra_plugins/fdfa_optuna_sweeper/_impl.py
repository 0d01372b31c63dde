"""The Optuna sweep: search space, shared study, the worker loop, and the final report.

One command is one worker (or ``n_jobs`` of them): it asks the study for a trial, runs that trial's
job in this process through Hydra's basic launcher, tells the study how it ended, and repeats until
the study holds ``n_trials`` finished trials. Any number of workers, on any machines, may share one
study through its storage:

- the steps that decide whether another trial may start run under a lock held in the storage
  itself (a file lock next to a SQLite or journal file, an advisory lock in PostgreSQL or MySQL),
  so ``n_trials`` is exact however many workers start at once;
- every running trial records which worker runs it and a heartbeat; a trial whose worker died
  (its process is gone, or its heartbeat is older than ``grace_period``) is marked FAILED with
  ``abandoned`` and queued again with the same parameters, so a rerun of a killed sweep redoes it;
- a job that raises fails its trial only (the reason is the trial's ``fail_reason`` user attr);
  ``optuna.TrialPruned`` from the job's reporter (fdfa/sweep.py) makes it PRUNED;
- trials are chosen on validation data (``objective: val/acc``); once the study is complete, one
  worker (under the lock) reruns the best trial's params with seeds 0..confirm_seeds-1 in
  ``<sweep dir>/confirm/seed<i>/``, and the report gives their test accuracy at the best-val
  epoch with a Student-t interval. A rerun runs only the seeds still missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from fdfa import sweep as job_side
from fdfa.errors import FdfaError, find_fdfa_error
from fdfa.protocol import mean_ci
from fdfa.study_report import log_study

log = logging.getLogger(__name__)

WORKER_ATTR = "fdfa:worker"  # trial system attr: {"machine", "pid", "host"} of its worker
HEARTBEAT_ATTR = "fdfa:heartbeat"  # trial system attr: time.time() of its worker's last beat
# Overrides a worker passes on to the extra workers it starts (n_jobs), replacing the user's.
WORKER_KEYS = (
    "hydra.sweep.dir",
    "hydra.sweeper.storage",
    "hydra.sweeper.study_name",
    "hydra.sweeper.n_jobs",
    "hydra.sweeper.sampler.seed",
)


def one_line(err: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote(value: str) -> str:
    """``value`` as a Hydra override value: bare when safe, else single-quoted."""
    if re.fullmatch(r"[\w./:@-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_value(value: Any) -> str:
    """A sampled parameter as the text of a Hydra override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    return quote(str(value))


# ---------------------------------------------------------------------------- the search space


def to_distribution(override: Override):
    """An Optuna distribution from ``interval``, ``range`` or ``choice`` (with ``tag(log|int)``)."""
    sweep, key = override.value(), override.get_key_element()
    tags = set(sweep.tags)
    if tags - {"log", "int"}:
        raise FdfaError(
            f"sweep param {key}: unknown tag {sorted(tags - {'log', 'int'})}; "
            "use tag(log, interval(a, b)) or tag(int, interval(a, b))"
        )
    if isinstance(sweep, ChoiceSweep):
        if tags:
            raise FdfaError(
                f"sweep param {key}: tags apply to interval() and range(), not choice()"
            )
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())  # like Python's range: the stop is excluded
        if not values:
            raise FdfaError(f"sweep param {key}: {override.input_line} is empty")
        low, high, step = min(values), max(values), abs(sweep.step)
        if "log" in tags and len(values) > 1:
            raise FdfaError(f"sweep param {key}: a log scale needs interval(), not range()")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(low, high, step=step)
        return FloatDistribution(low, high, step=step)
    if isinstance(sweep, IntervalSweep):
        if not sweep.start < sweep.end:
            raise FdfaError(f"sweep param {key}: interval({sweep.start}, {sweep.end}) is empty")
        if "log" in tags and sweep.start <= 0:
            raise FdfaError(f"sweep param {key}: a log interval needs a positive start")
        if "int" in tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log="log" in tags)
        return FloatDistribution(sweep.start, sweep.end, log="log" in tags)
    raise FdfaError(f"sweep param {key}: {override.input_line} is not interval, range or choice")


def first_value(dist) -> Any:
    return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low


# ------------------------------------------------------------------------------- storage, lock


def make_storage(url: str):
    """An Optuna storage from a SQLAlchemy URL or ``journal:PATH``."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:") :]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs = {}
    if sqlalchemy.engine.make_url(url).get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 120}  # wait for other workers' writes, don't fail
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def printable_url(url: str) -> str:
    if url.startswith("journal:"):
        return url
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


class StudyLock:
    """A lock every worker of one study can take, kept where the study is kept."""

    def __init__(self, url: str, study_name: str):
        self.path = self.engine = None
        if url.startswith("journal:"):
            self.path = Path(url[len("journal:") :]).expanduser().with_suffix(".lock")
            return
        parsed = sqlalchemy.engine.make_url(url)
        backend = parsed.get_backend_name()
        name = f"fdfa-optuna:{study_name}"
        if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
            self.path = Path(parsed.database + ".lock")
        elif backend == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            self._sql = ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)")
            self._args = {"key": key}
        elif backend in ("mysql", "mariadb"):
            self._sql = ("SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)")
            self._args = {"key": name[:64]}
        else:
            log.warning(
                "no lock for %s storages: with several workers the study may get up to "
                "(workers - 1) more trials than n_trials",
                backend,
            )
            return
        if self.path is None:
            self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    @contextlib.contextmanager
    def __call__(self):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        elif self.engine is not None:
            with self.engine.connect() as conn:
                conn.execute(sqlalchemy.text(self._sql[0]), self._args)
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text(self._sql[1]), self._args)
        else:
            yield


# ------------------------------------------------------------------------- workers, heartbeats


def machine_id() -> str:
    """Names this machine and PID namespace, so a worker can tell whether a PID is its to check."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


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


# ---------------------------------------------------------------------------------- the sweep


class OptunaSweep:
    def __init__(
        self,
        sweeper,
        sampler: DictConfig,
        pruner: DictConfig,
        direction: str = "maximize",
        objective: str = "val/acc",
        study_name: str | None = None,
        storage: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failure_rate: float = 0.5,
        heartbeat_interval: float = 10.0,
        grace_period: float = 120.0,
        params: DictConfig | None = None,
        confirm_seeds: int = 0,
    ):
        if direction not in ("maximize", "minimize"):
            raise_user_error(
                f"hydra.sweeper.direction must be maximize or minimize, not {direction}"
            )
        if n_trials < 1 or n_jobs < 1:
            raise_user_error("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be at least 1")
        if confirm_seeds < 0:
            raise_user_error("hydra.sweeper.confirm_seeds must be >= 0 (0: no confirmation runs)")
        if not 0 <= max_failure_rate <= 1:
            raise_user_error("hydra.sweeper.max_failure_rate must be between 0 and 1")
        if not 0 < heartbeat_interval < grace_period:
            raise_user_error(
                "need 0 < hydra.sweeper.heartbeat_interval < hydra.sweeper.grace_period, got "
                f"{heartbeat_interval} and {grace_period}"
            )
        self.sweeper = sweeper
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.direction, self.objective = direction, objective
        self.study_name, self.storage_url = study_name, storage
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.max_failure_rate = max_failure_rate
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.params = OmegaConf.to_container(params) if params else {}
        self.confirm_seeds = confirm_seeds
        self.machine = machine_id()

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        launcher = type(self.launcher).__name__
        if launcher != "BasicLauncher":
            raise_user_error(
                f"the fdfa_optuna sweeper runs each trial in its worker process (hydra/launcher="
                f"basic), not with {launcher}; run trials in parallel with hydra.sweeper.n_jobs=N "
                "or by starting the same command on several machines"
            )

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except FdfaError as err:  # a user error: one line, like run.py
            print(f"error: {one_line(err, 2000)}", file=sys.stderr)
            sys.exit(2)

    # -------------------------------------------------------------------------- the main loop

    def _sweep(self, arguments: list[str]) -> None:
        space, fixed = self._search_space(arguments)
        self._validate(space, fixed)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study_name = self.study_name or sweep_dir.name
        url = self.storage_url or f"sqlite:///{sweep_dir / 'optuna.db'}"
        fixed_seed = seed = self.sampler_cfg.get("seed")
        if "seed" in self.sampler_cfg and seed is None:
            seed = secrets.randbelow(2**31)  # this worker's own; logged so it can be replayed
        sampler = instantiate(self.sampler_cfg, **({"seed": seed} if seed is not None else {}))
        pruner = instantiate(self.pruner_cfg)
        study = self._open_study(url, study_name, sampler, pruner)
        workers = []
        if self.n_jobs > 1:
            workers = self._start_workers(sweep_dir, study_name, url, fixed_seed)
        log.info(
            "study %r in %s: %d trials, %s %s, sampler %s (seed %s), pruner %s",
            study_name, printable_url(url), self.n_trials, self.direction, self.objective,
            type(sampler).__name__, seed, type(pruner).__name__,
        )  # fmt: skip
        os.environ["FDFA_WANDB_GROUP"] = study_name  # every trial's W&B run in one group
        try:
            while (trial := self._next_trial(study, space)) is not None:
                self._run_trial(study, trial, fixed)
                self._check_failures(study)
            if self.confirm_seeds:
                with self.lock():  # one worker runs them; the others then find them done
                    self._confirm(study, fixed, sweep_dir)
        finally:
            failed_workers = [w for w in workers if w[0].wait() != 0]
            self._report(study, sweep_dir, url)
        if failed_workers:
            proc, path = failed_workers[0]
            raise FdfaError(f"worker pid {proc.pid} exited with code {proc.returncode}; see {path}")

    def _search_space(self, arguments: list[str]):
        """(name -> distribution, fixed overrides) from hydra.sweeper.params and the command line
        (which wins for a key given in both)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        try:
            overrides = parser.parse_overrides(lines)
        except Exception as err:
            raise FdfaError(f"cannot parse the sweep's params: {one_line(err)}") from err
        space, fixed = {}, {}
        for override in overrides:
            key = override.get_key_element()
            space.pop(key, None)
            fixed.pop(key, None)
            if override.is_sweep_override():
                space[key] = to_distribution(override)
            else:
                fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
        if not space:
            raise FdfaError(
                "the sweep has nothing to search: give hydra.sweeper.params (see sweeps/*.yaml) "
                "or a sweep override such as optimizer.lr='tag(log,interval(1e-5,1e-2))'"
            )
        return space, list(fixed.values())

    def _validate(self, space: dict, fixed: list[str]) -> None:
        """Compose one job per categorical value (and one at the lows) now, not mid-sweep."""
        base = {k: first_value(d) for k, d in space.items()}
        points = [base] + [
            {**base, k: c}
            for k, d in space.items()
            if isinstance(d, CategoricalDistribution)
            for c in d.choices[1:]
        ]
        for point in points:
            overrides = self._job_overrides(fixed, point, 0)
            try:
                job_config = self.hydra_context.config_loader.load_sweep_config(
                    self.config, overrides
                )
            except Exception as err:
                raise FdfaError(
                    f"a trial's config does not compose ({' '.join(overrides)}): {one_line(err)}"
                ) from err
            self._check_selection(job_config)

    def _check_selection(self, job_config: DictConfig) -> None:
        """Trials are chosen on validation data; selecting on the test set must be asked for."""
        val_size = OmegaConf.select(job_config, "dataset.val_size", default=0)
        if self.objective.startswith("test/"):
            log.warning(
                "hydra.sweeper.objective=%s selects trials on the test set: the best value "
                "overstates the test accuracy a fresh run would get; prefer val/acc",
                self.objective,
            )
        elif self.objective.startswith("val/") and not val_size:
            raise FdfaError(
                f"hydra.sweeper.objective={self.objective} needs a validation set, but "
                f"dataset.val_size={val_size}: set dataset.val_size (e.g. 5000), or select on "
                "the test set knowingly with hydra.sweeper.objective=test/acc"
            )

    @staticmethod
    def _job_overrides(fixed: list[str], params: dict, number: int) -> list[str]:
        return [
            *fixed,
            *(f"{k}={override_value(v)}" for k, v in params.items()),
            f"++optuna_trial={number}",  # the trial number in the job's config (and W&B's)
        ]

    def _open_study(self, url: str, name: str, sampler, pruner) -> optuna.Study:
        """Create the study or load it; many workers may do this at the same moment."""
        last = None
        for attempt in range(6):
            try:
                self.lock = StudyLock(url, name)
                with self.lock():
                    self.storage = make_storage(url)
                    study = optuna.create_study(
                        study_name=name,
                        storage=self.storage,
                        sampler=sampler,
                        pruner=pruner,
                        direction=self.direction,
                        load_if_exists=True,
                    )
                break
            except ImportError as err:
                raise FdfaError(
                    f"storage {printable_url(url)} needs a database driver: {one_line(err)} "
                    "(PostgreSQL: pip install 'psycopg[binary]')"
                ) from err
            except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.DuplicatedStudyError) as err:
                last = err  # two workers creating tables or the study at once: try again
                time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
        else:
            raise FdfaError(f"cannot open study {name!r} in {printable_url(url)}: {one_line(last)}")
        if study.direction.name.lower() != self.direction:
            raise FdfaError(
                f"study {name!r} in {printable_url(url)} was created to "
                f"{study.direction.name.lower()}, but hydra.sweeper.direction={self.direction}; "
                "use another hydra.sweeper.study_name"
            )
        return study

    def _next_trial(self, study: optuna.Study, space: dict) -> optuna.Trial | None:
        """A new trial while the study has fewer than n_trials; else wait for the other
        workers' running trials (one may be abandoned and need redoing), then None."""
        told = False
        while True:
            with self.lock():
                self._fail_abandoned(study)
                trials = study.get_trials(deepcopy=False)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if waiting or sum(map(counts, trials)) < self.n_trials:
                    try:
                        trial = study.ask(space)
                    except ValueError as err:
                        raise FdfaError(
                            f"the search space does not fit study {study.study_name!r}: "
                            f"{one_line(err)}; use a new hydra.sweeper.study_name"
                        ) from err
                    info = {
                        "machine": self.machine,
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                    }
                    self.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, info)
                    record_heartbeat(self.storage, trial._trial_id)
                    return trial
                running = [t.number for t in trials if t.state == TrialState.RUNNING]
            if not running:
                return None
            if not told:
                log.info("all trials started; waiting for running trials %s", running)
                told = True
            time.sleep(min(self.heartbeat_interval, 1.0))

    def _fail_abandoned(self, study: optuna.Study) -> None:
        """Fail running trials whose worker is gone, and queue each again with its params."""
        now = time.time()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker, beat = t.system_attrs.get(WORKER_ATTR), t.system_attrs.get(HEARTBEAT_ATTR)
            if worker is None or beat is None:
                continue  # not started by this sweeper
            if worker["machine"] == self.machine and worker["pid"] != os.getpid():
                if pid_alive(worker["pid"]) and now - beat <= self.grace_period:
                    continue
                reason = f"its worker (pid {worker['pid']} on {worker['host']}) has stopped"
            elif now - beat > self.grace_period:
                reason = f"no heartbeat from {worker['host']} for {now - beat:.0f} s"
            else:
                continue
            try:
                self.storage.set_trial_user_attr(t._trial_id, "abandoned", True)
                self.storage.set_trial_user_attr(
                    t._trial_id, "fail_reason", f"abandoned: {reason}; queued again"
                )
                if not self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # it finished after all
            study.enqueue_trial(t.params, user_attrs={"redo_of": t.number})
            log.warning("trial %d abandoned (%s): failed, and queued again", t.number, reason)

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial, fixed: list[str]) -> None:
        overrides = self._job_overrides(fixed, trial.params, trial.number)
        self._move_stale_job_dir(trial.number)
        reporter = job_side.start_trial(trial, self.objective, self.direction)
        try:
            with Heartbeat(self.storage, trial._trial_id, self.heartbeat_interval):
                (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            status, result = ret.status, ret._return_value  # .return_value raises on failure
        except Exception as err:  # the job could not start
            status, result = JobStatus.FAILED, err
        finally:
            job_side.end_trial()
        if status == JobStatus.COMPLETED:
            value = reporter.best if reporter.best is not None else result
            if not reporter.values:
                log.warning(
                    "trial %d reported no per-epoch %s: run.py must pass "
                    "callbacks=fdfa.sweep.job_callbacks() to train() for pruning",
                    trial.number, self.objective,
                )  # fmt: skip
            if isinstance(value, (int, float)) and math.isfinite(value):
                study.tell(trial, float(value))
                log.info("trial %d complete: %s %.4f", trial.number, self.objective, value)
                return
            result = f"the job's result {value!r} is not a finite number"
        elif isinstance(result, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, result)
            return
        self._fail(study, trial, result)

    # ------------------------------------------------------------------- confirmation runs

    def _confirm(self, study: optuna.Study, fixed: list[str], sweep_dir: Path) -> None:
        """Run the best trial's params with each seed 0..confirm_seeds-1 that has no finished
        run in <sweep dir>/confirm/seed<i>/ yet. Confirmation runs of another best trial (the
        study grew since) are moved aside first."""
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            log.warning("no trial completed: no confirmation runs")
            return
        best = study.best_trial
        confirm_dir = sweep_dir / "confirm"
        chosen = {"trial": best.number, "params": best.params}
        marker = confirm_dir / "trial.yaml"
        if marker.is_file() and OmegaConf.to_container(OmegaConf.load(marker)) != chosen:
            stale = confirm_dir.with_name(f"confirm.old-{time.strftime('%Y%m%d-%H%M%S')}")
            confirm_dir.rename(stale)
            log.warning("best trial changed: earlier confirmation runs moved to %s", stale)
        confirm_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(marker, OmegaConf.to_yaml(chosen))
        for seed in range(self.confirm_seeds):
            if confirmed_value(confirm_dir / f"seed{seed}") is not None:
                continue
            overrides = [
                *fixed,
                *(f"{k}={override_value(v)}" for k, v in best.params.items()),
                f"seed={seed}",
                f"hydra.sweep.subdir=confirm/seed{seed}",
            ]
            log.info("confirmation run, seed %d, of trial %d's params", seed, best.number)
            try:
                with job_side.confirm_jobs():
                    (ret,) = self.launcher.launch([overrides], initial_job_idx=seed)
                ret.return_value  # noqa: B018  (raises the job's error)
            except Exception as err:
                log.warning("confirmation run seed %d failed: %s", seed, one_line(err))

    def _confirm_results(self, sweep_dir: Path) -> dict | None:
        """The confirm: section of optimization_results.yaml (None without confirmation)."""
        marker = sweep_dir / "confirm" / "trial.yaml"
        if not self.confirm_seeds or not marker.is_file():
            return None
        chosen = OmegaConf.to_container(OmegaConf.load(marker))
        seeds = list(range(self.confirm_seeds))
        values = {s: confirmed_value(sweep_dir / "confirm" / f"seed{s}") for s in seeds}
        done = [v for v in values.values() if v is not None]
        section = {
            "trial": chosen["trial"],
            "params": chosen["params"],
            "seeds": seeds,
            "selected_test_acc": values,  # per seed: test acc at its best-val epoch
            "missing_seeds": [s for s, v in values.items() if v is None],
        }
        if done:
            mean, half = mean_ci(done)
            section.update(mean=mean, ci95_half_width=half)
            if half is not None:
                section["ci95"] = [mean - half, mean + half]
        return section

    def _move_stale_job_dir(self, number: int) -> None:
        """A trial's job dir (<sweep dir>/<trial number>) that exists already belongs to another
        study that used this sweep dir: move it away, or the trainer would resume from it."""
        subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir")
        job_dir = Path(str(self.config.hydra.sweep.dir)).resolve() / str(number)
        if subdir != "${hydra.job.num}" or not job_dir.exists():
            return
        stale = job_dir.with_name(f"{number}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        job_dir.rename(stale)
        log.warning("%s is from an earlier study in this sweep dir: moved to %s", job_dir, stale)

    def _fail(self, study: optuna.Study, trial: optuna.Trial, result: Any) -> None:
        if isinstance(result, BaseException):
            user_error = find_fdfa_error(result)
            reason = one_line(user_error or f"{type(result).__name__}: {result}")
            tb = None if user_error else (type(result), result, result.__traceback__)
            log.warning("trial %d failed: %s", trial.number, reason, exc_info=tb)
        else:
            reason = one_line(result)
            log.warning("trial %d failed: %s", trial.number, reason)
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)

    def _check_failures(self, study: optuna.Study) -> None:
        failed = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if not t.user_attrs.get("abandoned")
        ]
        if len(failed) > self.max_failure_rate * self.n_trials:
            raise FdfaError(
                f"{len(failed)} trials of study {study.study_name!r} failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate} of n_trials="
                f"{self.n_trials}; the last: {failed[-1].user_attrs.get('fail_reason')}"
            )

    # ------------------------------------------------------------------------ parallel workers

    def _start_workers(self, sweep_dir: Path, study_name: str, url: str, seed) -> list:
        """Start n_jobs - 1 more workers: this command again, on the same study."""
        args = [a for a in sys.argv[1:] if a.lstrip("+~").split("=", 1)[0] not in WORKER_KEYS]
        procs = []
        for i in range(1, self.n_jobs):
            extra = [
                f"hydra.sweep.dir={quote(str(sweep_dir))}",
                f"hydra.sweeper.storage={quote(url)}",
                f"hydra.sweeper.study_name={quote(study_name)}",
                "hydra.sweeper.n_jobs=1",
            ]
            if seed is not None:
                extra.append(f"hydra.sweeper.sampler.seed={seed + i}")
            path = sweep_dir / f"worker-{i}.log"
            with path.open("ab") as out:
                cmd = [sys.executable, sys.argv[0], *args, *extra]
                procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), path))
        log.info("started %d more workers; their logs: %s/worker-*.log", len(procs), sweep_dir)
        return procs

    # ---------------------------------------------------------------------------------- report

    def _report(self, study: optuna.Study, sweep_dir: Path, url: str) -> None:
        """optimization_results.yaml and the plots, from the study as it is now."""
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state.name.lower() for t in trials)
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "storage": printable_url(url),
            "direction": self.direction,
            "objective": self.objective,
            "trials": dict(sorted(states.items())),
        }
        if states["complete"]:
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value, best_params=best.params)
            log.info(
                "Best trial %d: %s = %.4f with %s",
                best.number, self.objective, best.value,
                " ".join(f"{k}={override_value(v)}" for k, v in best.params.items()),
            )  # fmt: skip
        else:
            log.warning("no trial of study %r completed: no best trial", study.study_name)
        confirm = self._confirm_results(sweep_dir)
        if confirm is not None:
            results["confirm"] = confirm
            if "mean" in confirm:
                half = confirm["ci95_half_width"]
                log.info(
                    "confirmation: test acc at best-val epoch %.4f%s over seeds %s",
                    confirm["mean"], "" if half is None else f" ± {half:.4f} (95% CI)",
                    [s for s in confirm["seeds"] if s not in confirm["missing_seeds"]],
                )  # fmt: skip
        _write_atomic(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(results))
        if states["complete"]:
            save_plots(study, sweep_dir)
        log_study(study, sweep_dir, self.config)  # the study's W&B run, when jobs log to W&B


def counts(trial) -> bool:
    """Whether a trial takes a place of n_trials (not a FAILED one that was queued again)."""
    return not (trial.state == TrialState.FAIL and trial.user_attrs.get("abandoned"))


def confirmed_value(run_dir: Path) -> float | None:
    """selected/test/acc of a finished run in run_dir (None: missing, unfinished or unreadable)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        return None
    value = summary.get("selected/test/acc")
    return float(value) if isinstance(value, (int, float)) else None


def raise_user_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # several workers may write the same report


def save_plots(study: optuna.Study, out_dir: Path) -> None:
    """Optuna's history, importance, parallel-coordinate and learning-curve plots as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    if importlib.util.find_spec("sklearn") is None:  # fANOVA, the default, needs scikit-learn
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    else:
        evaluator = None
    figures = {
        "optimization_history": plots.plot_optimization_history,
        "param_importances": lambda s: plots.plot_param_importances(s, evaluator=evaluator),
        "parallel_coordinate": plots.plot_parallel_coordinate,
        "intermediate_values": plots.plot_intermediate_values,
    }
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # these plots are marked experimental
                axes = plot(study)
            fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            tmp = out_dir / f".{name}.{os.getpid()}.png"
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
            os.replace(tmp, out_dir / f"{name}.png")
            plt.close(fig)
        except Exception as err:  # e.g. too few trials for importances: the rest still gets made
            log.info("plot %s skipped: %s", name, one_line(err))
