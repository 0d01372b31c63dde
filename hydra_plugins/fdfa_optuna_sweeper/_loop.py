"""One worker of one or more studies (a benchmark: one per rule, _benchmark.py): it asks a study
for a trial, runs that trial's job(s) in this process (_jobs.py), tells the study how it ended,
and repeats until every study holds ``n_trials`` finished trials. A worker with no trial left to
start takes a confirmation seed of a study whose trials have all finished (_confirm.py); with
neither, it waits for the running trials, then writes the results.

- the next trial comes from the study with the fewest trials taken, so the workers spread over
  the studies and none idles while a study still has trials to start;
- the steps that decide whether another trial may start run under the study's lock
  (_storage.py), so ``n_trials`` is exact however many workers start at once;
- a trial whose worker died is failed and queued again (_liveness.py), at once when that worker
  was one this one started (it is reaped, never left a zombie); a worker stopped by SIGTERM or
  SIGINT passes the signal to the workers it started, hands its trial back at once and exits
  when they have (``STOP_WAIT_S`` at most);
- a job that raises fails its trial only (the reason is the trial's ``fail_reason`` user attr);
  ``fdfa.sweep_job.Pruned`` from the trial's reporter makes it PRUNED;
- a trial's value is the best of its per-epoch objective (``objective: val/acc``: chosen on
  validation data); with ``seeds_per_trial`` k > 1 its k seeds' jobs run one after the other
  and its value is the mean of their values (user attrs ``seed_values`` and ``seed_std``: the
  spread); the pruner sees the first seed's epochs only (every trial reports the same seed's, so
  the pruner compares like with like), and a pruned first seed ends the trial.
"""

from __future__ import annotations

import logging
import math
import secrets
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from optuna.trial import TrialState

from fdfa.errors import DiskFullError, FdfaError, find_fdfa_error, is_disk_full
from fdfa.interrupt import passing_signals_to
from fdfa.runfiles import RunFiles
from fdfa.sweep_job import Pruned, TrialReporter

from ._confirm import confirm_one
from ._jobs import JobRunner, job_result
from ._liveness import (
    Heartbeat,
    Preempted,
    WorkerSignals,
    abandoned,
    claim,
    fail_abandoned,
    finished_places,
    hand_back,
    machine_id,
    places_taken,
)
from ._overall import OverallProgress
from ._plan import Options, Plan
from ._repeats import repeated, replace_repeat, resume_seed
from ._results import remaining_time, write_results
from ._space import job_overrides, one_line
from ._storage import open_study, printable_url, storage_failure

log = logging.getLogger(__name__)

STOP_WAIT_S = 120.0  # once told to stop, how long the workers this one started have to stop


class Worker:
    """Worker ``index`` of a sweep over ``plans`` (one per study); ``workers``: how many this
    command runs (for the estimate of the time left, which worker 0 gives after its first
    finished trial)."""

    def __init__(self, options: Options, plans, runner: JobRunner, index: int, workers=1):
        self.options, self.runner = options, runner
        self.plans = plans if isinstance(plans, list) else [plans]
        self.index, self.workers = index, workers
        self.machine = machine_id()
        self.signals = WorkerSignals()
        self.children = []  # (Popen, log path) of the workers this one started
        self.estimated = index != 0  # only the command's own worker says how long is left
        self.failed_seeds: set = set()  # (study, seed) of confirmation runs that failed here
        self.overall = None  # the overall progress bar (_overall.py), on a terminal only

    def work(self, config, children=()) -> None:
        """Trials until every study is complete, the confirmation runs, the results (written
        also when stopped). ``children``: worker processes this one started, waited for at the
        end."""
        options = self.options
        seed = self.plans[0].seed + self.index if self.plans[0].seed is not None else None
        if "seed" in options.sampler and seed is None:
            seed = secrets.randbelow(2**31)  # this worker's own; logged so it can be replayed
        self.studies = []  # (plan, study, lock)
        seeds = []
        for k, plan in enumerate(self.plans):  # study k's sampler: seed + 1000 k (a benchmark's)
            study, _, lock = open_study(
                plan.url,
                plan.study_name,
                options.direction,
                pruner=instantiate(options.pruner),
                timeout_s=options.storage_timeout_s,
            )
            own = None if seed is None else seed + 1000 * k
            own = resume_seed(own, len(study.get_trials(deepcopy=False)))  # a rerun: new draws
            seeds.append(own)
            study.sampler = instantiate(options.sampler, **({} if own is None else {"seed": own}))
            self.studies.append((plan, study, lock))
        log.info(
            "%s in %s: %d trials each, %s %s, sampler %s (seed %s), pruner %s",
            ", ".join(repr(p.study_name) for p in self.plans),
            printable_url(self.plans[0].url),
            options.n_trials,
            options.direction,
            options.objective,
            type(study.sampler).__name__,
            seeds[0] if len(seeds) == 1 else seeds,
            type(study.pruner).__name__,
        )
        self.signals = WorkerSignals()
        self.children = list(children)
        failed_children = []
        if self.index == 0:  # the command's own worker: on a terminal, the bar of all runs
            self.overall = OverallProgress.on_terminal(
                self.studies, options.n_trials, options.confirm_seeds
            )
        try:  # a signal to this command reaches every worker it started, also during a job
            with passing_signals_to(proc for proc, _ in children), self.signals:
                try:
                    self._loop()
                except Exception as err:
                    failure = storage_failure(err, self.plans[0].url, options.storage_timeout_s)
                    if failure is None:
                        raise
                    raise failure from err
                finally:
                    failed_children = self._wait_for_children()
        finally:
            for plan, study, _ in self.studies:
                try:
                    write_results(study, plan, options, config)
                except Exception as err:  # a full disk: the error that stopped the loop counts
                    log.warning("no results written to %s: %s", plan.sweep_dir, one_line(err))
        if failed_children:
            proc, path = failed_children[0]
            raise FdfaError(f"worker pid {proc.pid} exited with code {proc.returncode}; see {path}")

    def _reap_children(self) -> None:
        """Collect the exit of any worker this one started that has ended (a dead one is then
        gone, not a zombie: its trial is handed back by the next liveness check, at once)."""
        for proc, path in self.children:
            if proc.returncode is None and proc.poll() is not None and proc.returncode < 0:
                name = signal.Signals(-proc.returncode).name
                log.warning("worker pid %d was killed by %s (see %s)", proc.pid, name, path)

    def _wait_for_children(self) -> list:
        """Wait until the workers this one started have ended; once a signal came, for
        STOP_WAIT_S at most (then they are killed and their trials handed back). Returns the
        (Popen, log) of those that failed (one killed by a signal only warned: its trial was
        handed back and redone)."""
        deadline = None
        while any(proc.poll() is None for proc, _ in self.children):
            if self.signals.received and deadline is None:
                deadline = time.monotonic() + STOP_WAIT_S
            if deadline is not None and time.monotonic() > deadline:
                for proc, path in self.children:
                    if proc.poll() is None:
                        log.warning("worker pid %d did not stop; killed (see %s)", proc.pid, path)
                        proc.kill()
                        proc.wait()
                self._running()  # hands their trials back
                break
            time.sleep(0.1)
        self._reap_children()
        return [(proc, path) for proc, path in self.children if proc.returncode > 0]

    def _loop(self) -> None:
        told = False
        while True:
            self.signals.stop_if_told()
            self._reap_children()
            if self.overall is not None:
                self.overall.draw()  # when a run finished since the last bar
            job = self._next_trial()
            if job is not None:
                self._run_trial(*job)
                self._check_failures(job[0], job[1])
                continue
            if self.options.confirm_seeds and self._confirm_one():
                continue
            running = self._running()
            if not running:
                return
            if not told:
                log.info("all trials started; waiting for running trials %s", running)
                told = True
            time.sleep(min(self.options.heartbeat_interval, 1.0))

    def _next_trial(self):
        """(plan, study, trial): a new trial of the study with the fewest trials taken among
        those with fewer than n_trials (or a queued trial); None when no study has one."""

        def taken(entry) -> int:
            return places_taken(entry[1].get_trials(deepcopy=False))

        for plan, study, lock in sorted(self.studies, key=taken):
            with lock():
                fail_abandoned(study, self.machine, self.options.grace_period)
                trials = study.get_trials(deepcopy=False)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if waiting or places_taken(trials) < self.options.n_trials:
                    trial = self._ask(plan, study)
                    if not waiting and repeated(study, trial) is not None:  # a queued one may
                        if replace_repeat(study, trial, plan.space, plan.seed):
                            trial = self._ask(plan, study)  # the point queued in its place
                    claim(trial, self.machine)
                    return plan, study, trial
        return None

    def _ask(self, plan: Plan, study: optuna.Study) -> optuna.Trial:
        try:
            return study.ask(plan.space)
        except ValueError as err:
            raise FdfaError(
                f"the search space does not fit study {study.study_name!r}: "
                f"{one_line(err)}; use a new hydra.sweeper.study_name"
            ) from err

    def _running(self) -> list[str]:
        """The running trials of every study (their worker's liveness checked first)."""
        running = []
        for plan, study, lock in self.studies:
            with lock():
                fail_abandoned(study, self.machine, self.options.grace_period)
                trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            running += [f"{plan.label + ' ' if plan.label else ''}{t.number}" for t in trials]
        return running

    def _confirm_one(self) -> bool:
        """Run one confirmation seed of a study whose trials have all finished; False if none
        is left to take."""
        for plan, study, lock in self.studies:
            trials = study.get_trials(deepcopy=False)
            if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
                continue
            if confirm_one(
                study,
                plan,
                self.options.confirm_seeds,
                self.runner,
                self.signals,
                lock,
                self.failed_seeds,
            ):
                return True
        return False

    def _run_trial(self, plan: Plan, study: optuna.Study, trial: optuna.Trial) -> None:
        """The trial's job (one per seed with seeds_per_trial > 1), then tell the study."""
        seeds = plan.trial_seeds()
        started = time.time()
        values = {}
        for j, seed in enumerate(seeds):
            extra = (
                []
                if len(seeds) == 1
                else [f"seed={seed}", f"hydra.sweep.subdir={trial.number}/seed{seed}"]
            )
            reporter = TrialReporter(
                trial if j == 0 else None, self.options.objective, self.options.direction
            )
            status, result = self._run_job(plan, study, trial, extra, reporter)
            value = self._job_value(trial, status, result, reporter)
            if value is None:
                self._tell_unfinished(plan, study, trial, status, result)
                return
            values[seed] = value
        mean = statistics.fmean(values.values())
        if len(values) > 1:
            trial.set_user_attr("seed_values", {str(s): v for s, v in values.items()})
            trial.set_user_attr("seed_std", statistics.stdev(values.values()))
        study.tell(trial, mean)
        self._progress(plan, study, trial, f"complete: {self.options.objective} {mean:.4f}")
        self._estimate(study, time.time() - started)

    def _run_job(self, plan, study, trial, extra, reporter):
        """(status, result) of one job of ``trial``; a stopped worker hands the trial back."""
        link = plan.links("trial", trial.number)
        overrides = job_overrides(plan.fixed, trial.params, *extra, *link)
        job_dir = plan.sweep_dir / str(trial.number)  # as the default subdir has it
        try:
            with Heartbeat(trial, self.options.heartbeat_interval), self.signals.job():
                ret = self.runner.run(overrides, trial.number, callbacks=[reporter])
            status, result = job_result(ret)
            job_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        except Exception as err:  # the job could not start
            status, result = JobStatus.FAILED, err
        except KeyboardInterrupt as err:  # the trainer stopped on a signal (Interrupted)
            status, result = JobStatus.FAILED, err
        if status == JobStatus.FAILED and (
            self.signals.received
            or isinstance(result, KeyboardInterrupt)
            or isinstance(find_fdfa_error(result), Preempted)
            or job_status(job_dir) == "interrupted"  # the trainer handled the signal itself
        ):
            why = self.signals.received or getattr(result, "signal_name", None) or "interrupted"
            self.signals.received = why  # also when the trainer's handler took the signal
            with study_lock(self.studies, study)():
                hand_back(study, trial, f"its worker was stopped ({why})")
            raise Preempted(f"stopped by {why}: trial {trial.number} handed back (queued again)")
        if status == JobStatus.FAILED and (
            isinstance(find_fdfa_error(result), DiskFullError) or is_disk_full(result)
        ):  # not the params' fault, and no later trial can run either
            with study_lock(self.studies, study)():
                hand_back(study, trial, "the disk was full")
            raise FdfaError(
                f"trial {trial.number} stopped: {one_line(find_fdfa_error(result) or result)}; "
                "free space and rerun the same command: the trial is queued again"
            )
        return status, result

    def _job_value(self, trial, status, result, reporter: TrialReporter) -> float | None:
        """A completed job's value (its best objective), or None (pruned, failed, not finite)."""
        if status != JobStatus.COMPLETED:
            return None
        value = reporter.best if reporter.best is not None else result
        if not reporter.values:
            log.warning(
                "trial %d reported no per-epoch %s: the task function must pass its "
                "callbacks to train() for pruning (fdfa/sweep_job.py)",
                trial.number,
                self.options.objective,
            )
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        return None

    def _tell_unfinished(self, plan, study, trial, status, result) -> None:
        """Tell the study that a job of ``trial`` was pruned or failed."""
        if status == JobStatus.COMPLETED:
            self._fail(study, trial, f"the job's result {result!r} is not a finite number")
        elif isinstance(result, Pruned):
            study.tell(trial, state=TrialState.PRUNED)
            self._progress(plan, study, trial, f"pruned: {result}")
            return
        else:
            self._fail(study, trial, result)
        self._progress(plan, study, trial, "failed (the reason: the warning above)")

    def _progress(self, plan: Plan, study: optuna.Study, trial, what: str) -> None:
        """One line per finished trial: its study's label, the trial, the best so far, what is
        left."""
        trials = study.get_trials(deepcopy=False)
        done = len(finished_places(trials))
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = ""
        if complete:
            top = study.best_trial
            best = f"best {top.value:.4f} (trial {top.number}), "
        log.info(
            "%strial %d %s; %s%d trial(s) left",
            f"[{plan.label}] " if plan.label else "",
            trial.number,
            what,
            best,
            max(self.options.n_trials - done, 0),
        )

    def _estimate(self, study: optuna.Study, seconds: float) -> None:
        """After this worker's first finished trial: how long the sweep may still take."""
        if self.estimated:
            return
        self.estimated = True
        left = sum(
            self.options.n_trials - places_taken(s.get_trials(deepcopy=False))
            for _, s, _ in self.studies
        )
        confirm_runs = self.options.confirm_seeds * len(self.studies)
        log.info(remaining_time(seconds, left, self.workers, confirm_runs))

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

    def _check_failures(self, plan: Plan, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        gone = abandoned(trials)
        failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in gone]
        if len(failed) > self.options.max_failure_rate * self.options.n_trials:
            raise FdfaError(
                f"{len(failed)} trials of study {study.study_name!r} failed, more than "
                f"hydra.sweeper.max_failure_rate={self.options.max_failure_rate} of n_trials="
                f"{self.options.n_trials}; the last: {failed[-1].user_attrs.get('fail_reason')}"
            )


def study_lock(studies, study):
    """The lock of ``study`` among (plan, study, lock) entries."""
    return next(lock for _, s, lock in studies if s is study)


def job_status(job_dir: Path) -> str | None:
    """The ``status`` in a job's summary.json, if there is one."""
    summary = RunFiles(job_dir).read_summary()
    return None if summary is None else summary.get("status")
