"""The Optuna sweep: the worker loop, the command that starts the workers, confirmation runs and
the report. The rest lives beside it: _space.py (search space), _storage.py (storage, lock, opening
the study), _liveness.py (workers, heartbeats, abandoned and handed-back trials), _workers.py
(worker processes and launcher jobs), _plots.py (files beside the trials).

A worker asks the study for a trial, runs that trial's job in its own process through Hydra's basic
launcher, tells the study how it ended, and repeats until the study holds ``n_trials`` finished
trials. Any number of workers, on any machines, may share one study through its storage:

- the steps that decide whether another trial may start run under a lock held in the storage
  itself (a file lock next to a SQLite or journal file, an advisory lock in PostgreSQL or MySQL),
  so ``n_trials`` is exact however many workers start at once;
- a trial whose worker died is failed as ``abandoned`` and queued again (_liveness.py); a worker
  stopped by SIGTERM hands its trial back at once;
- a job that raises fails its trial only (the reason is the trial's ``fail_reason`` user attr);
  ``optuna.TrialPruned`` from the job's reporter (fdfa/sweep.py) makes it PRUNED;
- trials are chosen on validation data (``objective: val/acc``); once the study is complete, one
  worker (under the lock) reruns the best trial's params on seeds no trial used: the trials' seed
  ``s`` (the config's ``seed``) plus 1..confirm_seeds, in ``<sweep dir>/confirm/seed<s+i>/``,
  and the report gives their test accuracy at the best-val epoch with a Student-t interval and
  names the seeds. A rerun runs only the seeds still missing.

With the basic launcher the command is worker 0 and starts ``n_jobs - 1`` more as processes; with
any other launcher it submits ``n_jobs`` worker jobs, waits for them, and writes the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from fdfa import sweep as job_side
from fdfa.errors import FdfaError, find_fdfa_error
from fdfa.protocol import mean_ci
from fdfa.study_report import log_study

from ._liveness import (
    WORKER_ATTR,
    Heartbeat,
    Preempted,
    StopSignals,
    counts,
    fail_abandoned,
    hand_back,
    machine_id,
    record_heartbeat,
    worker_info,
)
from ._plots import save_plots, write_atomic
from ._settings import check_settings, shared_settings
from ._space import job_overrides, one_line, override_value, probe_points, search_space
from ._storage import open_study, printable_url
from ._workers import Plan, WorkerTask, resolve_n_jobs, start_processes, worker_jobs

log = logging.getLogger(__name__)


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
        n_jobs: Any = 1,
        max_failure_rate: float = 0.5,
        heartbeat_interval: float = 10.0,
        grace_period: float = 120.0,
        params: DictConfig | None = None,
        confirm_seeds: int = 0,
    ):
        if direction not in ("maximize", "minimize"):
            raise FdfaError(
                f"hydra.sweeper.direction must be maximize or minimize, not {direction}"
            )
        if n_trials < 1:
            raise FdfaError("hydra.sweeper.n_trials must be at least 1")
        resolve_n_jobs(n_jobs)  # checks it
        if confirm_seeds < 0:
            raise FdfaError("hydra.sweeper.confirm_seeds must be >= 0 (0: no confirmation runs)")
        if not 0 <= max_failure_rate <= 1:
            raise FdfaError("hydra.sweeper.max_failure_rate must be between 0 and 1")
        if not 0 < heartbeat_interval < grace_period:
            raise FdfaError(
                "need 0 < hydra.sweeper.heartbeat_interval < hydra.sweeper.grace_period, got "
                f"{heartbeat_interval} and {grace_period}"
            )
        self.settings = {k: v for k, v in locals().items() if k not in ("self", "sweeper")}
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
        self.signals = StopSignals()

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config, self.task_function = hydra_context, config, task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    @property
    def in_process(self) -> bool:
        """Whether trials run in the worker processes of this command (the basic launcher)."""
        return type(self.launcher).__name__ == "BasicLauncher"

    def sweep(self, arguments: list[str]) -> None:
        plan = self._plan(arguments)
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
        study, _, lock = open_study(plan.url, plan.study_name, self.direction)
        with lock():  # before any trial: a rerun with other settings must not join the study
            check_settings(study, plan.settings)
        OmegaConf.save(self.config, plan.sweep_dir / "multirun.yaml")
        if self.in_process:
            n_jobs = resolve_n_jobs(self.n_jobs)
            job_side.assign_gpu(0)  # worker 0; the others get theirs from start_processes
            children = start_processes(plan, n_jobs) if n_jobs > 1 else []
            self.work(plan, 0, children)
        else:
            self._drive_launcher(plan)

    # ---------------------------------------------------------------------- the command side

    def _plan(self, arguments: list[str]) -> Plan:
        """The search space, checked by composing the trials' configs now (not mid-sweep), and
        where the study lives."""
        space, fixed = search_space(self.hydra_context.config_loader, self.params, arguments)
        trial_seed = settings = None
        for point in probe_points(space):
            overrides = job_overrides(fixed, point, "++optuna_trial=0")
            try:
                job_config = self.hydra_context.config_loader.load_sweep_config(
                    self.config, overrides
                )
            except Exception as err:
                raise FdfaError(
                    f"a trial's config does not compose ({' '.join(overrides)}): {one_line(err)}"
                ) from err
            self._check_selection(job_config)
            trial_seed = job_config.seed
            if settings is None:  # from the first point: the same for every rerun
                settings = shared_settings(job_config, list(space))
        if self.confirm_seeds and "seed" in space:
            raise FdfaError(
                "hydra.sweeper.confirm_seeds needs trials at one seed, but the sweep searches "
                "seed: drop seed from the params, or set hydra.sweeper.confirm_seeds=0"
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        return Plan(
            space=space,
            fixed=fixed,
            sweep_dir=sweep_dir,
            study_name=self.study_name or sweep_dir.name,
            url=self.storage_url or f"sqlite:///{sweep_dir / 'optuna.db'}",
            seed=self.sampler_cfg.get("seed"),
            trial_seed=trial_seed,
            settings=settings,
        )

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

    def _drive_launcher(self, plan: Plan) -> None:
        """Submit n_jobs worker jobs through the configured launcher, wait, and report."""
        n_jobs = resolve_n_jobs(self.n_jobs)
        study, self.storage, self.lock = open_study(plan.url, plan.study_name, self.direction)
        task = WorkerTask(self.settings, plan, self.config, self.hydra_context, self.task_function)
        self.launcher.setup(
            hydra_context=self.hydra_context, task_function=task, config=self.config
        )
        log.info(
            "study %r in %s: %d trials on %d workers, each a %s job (logs: %s/workers/)",
            plan.study_name,
            printable_url(plan.url),
            self.n_trials,
            n_jobs,
            type(self.launcher).__name__,
            plan.sweep_dir,
        )
        errors, user_errors = [], []
        try:
            returns = self.launcher.launch(worker_jobs(plan, n_jobs), initial_job_idx=0)
        except Exception as err:  # e.g. submitit: a worker job was killed
            errors.append(one_line(err))
            returns = []
        for ret in returns:
            if ret.status != JobStatus.COMPLETED:
                user_error = find_fdfa_error(ret._return_value)
                errors.append(one_line(user_error or ret._return_value))
                if user_error is not None and not isinstance(user_error, Preempted):
                    user_errors.append(user_error)
        self._wait_for_running(study)
        self._report(study, plan.sweep_dir, plan.url)
        if user_errors:
            raise user_errors[0]
        finished = study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        )
        done = sum(map(counts, finished))
        if errors and done < self.n_trials:
            raise FdfaError(
                f"{len(errors)} worker job(s) failed ({errors[0]}); study {plan.study_name!r} has "
                f"{done} of {self.n_trials} trials: run the same command again to resume"
            )
        for error in errors:
            log.warning("a worker job failed (the study finished all the same): %s", error)

    def _wait_for_running(self, study: optuna.Study) -> None:
        """Until no trial runs (a killed worker's is failed and queued: this machine's at once,
        others' after the grace period), and none has run for a heartbeat interval."""
        quiet_since = None
        while True:
            with self.lock():
                fail_abandoned(study, self.storage, self.machine, self.grace_period)
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if running:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.time()
            elif time.time() - quiet_since > min(self.heartbeat_interval, 2.0):
                return
            time.sleep(0.5)

    # -------------------------------------------------------------------------- one worker

    def work(self, plan: Plan, index: int, children=()) -> None:
        """Worker ``index``: trials until the study holds n_trials finished ones, then the
        confirmation runs (one worker, under the lock); then the report. ``children``: the worker
        processes this one started, waited for at the end."""
        seed = plan.seed + index if plan.seed is not None else None
        if "seed" in self.sampler_cfg and seed is None:
            seed = secrets.randbelow(2**31)  # this worker's own; logged so it can be replayed
        sampler = instantiate(self.sampler_cfg, **({"seed": seed} if seed is not None else {}))
        pruner = instantiate(self.pruner_cfg)
        study, self.storage, self.lock = open_study(
            plan.url, plan.study_name, self.direction, sampler, pruner
        )
        log.info(
            "study %r in %s: %d trials, %s %s, sampler %s (seed %s), pruner %s",
            plan.study_name,
            printable_url(plan.url),
            self.n_trials,
            self.direction,
            self.objective,
            type(sampler).__name__,
            seed,
            type(pruner).__name__,
        )
        os.environ["FDFA_WANDB_GROUP"] = plan.study_name  # every trial's W&B run in one group
        self.signals = StopSignals([proc for proc, _ in children])
        try:
            with self.signals:
                while (trial := self._next_trial(study, plan.space)) is not None:
                    self._run_trial(study, trial, plan)
                    self._check_failures(study)
                if self.confirm_seeds:
                    with self.lock():  # one worker runs them; the others then find them done
                        self._confirm(study, plan)
        finally:
            failed_children = [c for c in children if c[0].wait() != 0]
            self._report(study, plan.sweep_dir, plan.url)
        if failed_children:
            proc, path = failed_children[0]
            raise FdfaError(f"worker pid {proc.pid} exited with code {proc.returncode}; see {path}")

    def _stop_if_told(self) -> None:
        if self.signals.received:
            raise Preempted(f"stopped by {self.signals.received}; rerun to resume the study")

    def _next_trial(self, study: optuna.Study, space: dict) -> optuna.Trial | None:
        """A new trial while the study has fewer than n_trials; else wait for the other
        workers' running trials (one may be abandoned and need redoing), then None."""
        told = False
        while True:
            self._stop_if_told()
            with self.lock():
                fail_abandoned(study, self.storage, self.machine, self.grace_period)
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
                    info = worker_info(self.machine)
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

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial, plan: Plan) -> None:
        overrides = job_overrides(plan.fixed, trial.params, f"++optuna_trial={trial.number}")
        self._move_stale_job_dir(trial.number)
        reporter = job_side.start_trial(trial, self.objective, self.direction)
        job_dir = plan.sweep_dir / str(trial.number)  # as the default subdir has it
        try:
            with Heartbeat(self.storage, trial._trial_id, self.heartbeat_interval):
                with self.signals.job():
                    (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            status, result = ret.status, ret._return_value  # .return_value raises on failure
            job_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        except Exception as err:  # the job could not start
            status, result = JobStatus.FAILED, err
        except (
            KeyboardInterrupt
        ) as err:  # the trainer stopped on a signal (fdfa.errors.Interrupted)
            status, result = JobStatus.FAILED, err
        finally:
            job_side.end_trial()
        if status == JobStatus.FAILED and (
            self.signals.received
            or isinstance(result, KeyboardInterrupt)
            or isinstance(find_fdfa_error(result), Preempted)
            or job_status(job_dir) == "interrupted"  # the trainer handled the signal itself
        ):
            why = self.signals.received or getattr(result, "signal_name", None) or "interrupted"
            hand_back(study, self.storage, trial, f"its worker was stopped ({why})")
            raise Preempted(f"stopped by {why}: trial {trial.number} handed back (queued again)")
        if status == JobStatus.COMPLETED:
            value = reporter.best if reporter.best is not None else result
            if not reporter.values:
                log.warning(
                    "trial %d reported no per-epoch %s: run.py must pass "
                    "callbacks=fdfa.sweep.job_callbacks() to train() for pruning",
                    trial.number,
                    self.objective,
                )
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

    def confirm_seeds_of(self, trial_seed: int) -> list[int]:
        """The confirmation seeds: the trials' seed + 1..confirm_seeds, seeds no trial used."""
        return [trial_seed + i for i in range(1, self.confirm_seeds + 1)]

    def _confirm(self, study: optuna.Study, plan: Plan) -> None:
        """Run the best trial's params with each confirmation seed that has no finished run in
        <sweep dir>/confirm/seed<seed>/ yet. Confirmation runs of another best trial (the study
        grew since) or of other trials' seed are moved aside first."""
        fixed, sweep_dir = plan.fixed, plan.sweep_dir
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            log.warning("no trial completed: no confirmation runs")
            return
        best = study.best_trial
        confirm_dir = sweep_dir / "confirm"
        chosen = {"trial": best.number, "params": best.params, "trial_seed": plan.trial_seed}
        marker = confirm_dir / "trial.yaml"
        if marker.is_file() and OmegaConf.to_container(OmegaConf.load(marker)) != chosen:
            stale = confirm_dir.with_name(f"confirm.old-{time.strftime('%Y%m%d-%H%M%S')}")
            confirm_dir.rename(stale)
            log.warning("best trial changed: earlier confirmation runs moved to %s", stale)
        confirm_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, OmegaConf.to_yaml(chosen))
        for seed in self.confirm_seeds_of(plan.trial_seed):
            if confirmed_value(confirm_dir / f"seed{seed}") is not None:
                continue
            self._stop_if_told()
            overrides = job_overrides(
                fixed, best.params, f"seed={seed}", f"hydra.sweep.subdir=confirm/seed{seed}"
            )
            log.info("confirmation run, seed %d, of trial %d's params", seed, best.number)
            try:
                with job_side.confirm_jobs(), self.signals.job():
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
        if chosen.get("trial_seed") is None:  # an older fdfa's runs (seeds 0..N-1): redone
            return None
        seeds = self.confirm_seeds_of(chosen["trial_seed"])
        values = {s: confirmed_value(sweep_dir / "confirm" / f"seed{s}") for s in seeds}
        done = [v for v in values.values() if v is not None]
        section = {
            "trial": chosen["trial"],
            "params": chosen["params"],
            "trial_seed": chosen["trial_seed"],  # the seed every trial ran at
            "seeds": seeds,  # the confirmation runs' seeds: trial_seed + 1..confirm_seeds
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
                best.number,
                self.objective,
                best.value,
                " ".join(f"{k}={override_value(v)}" for k, v in best.params.items()),
            )
        else:
            log.warning("no trial of study %r completed: no best trial", study.study_name)
        confirm = self._confirm_results(sweep_dir)
        if confirm is not None:
            results["confirm"] = confirm
            if "mean" in confirm:
                half = confirm["ci95_half_width"]
                log.info(
                    "confirmation: test acc at best-val epoch %.4f%s over seeds %s",
                    confirm["mean"],
                    "" if half is None else f" ± {half:.4f} (95% CI)",
                    [s for s in confirm["seeds"] if s not in confirm["missing_seeds"]],
                )
        write_atomic(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(results))
        if states["complete"]:
            save_plots(study, sweep_dir)
        log_study(study, sweep_dir, self.config)  # the study's W&B run, when jobs log to W&B


def job_status(job_dir: Path) -> str | None:
    """The ``status`` in a job's summary.json, if there is one."""
    try:
        return json.loads((job_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


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
