"""One worker of a study: it asks the study for a trial, runs that trial's job in this process
(_jobs.py), tells the study how it ended, and repeats until the study holds ``n_trials``
finished trials; then (one worker, under the lock) the confirmation runs, then the results.

- the steps that decide whether another trial may start run under the study's lock
  (_storage.py), so ``n_trials`` is exact however many workers start at once;
- a trial whose worker died is failed and queued again (_liveness.py); a worker stopped by
  SIGTERM or SIGINT hands its trial back at once;
- a job that raises fails its trial only (the reason is the trial's ``fail_reason`` user attr);
  ``fdfa.sweep_job.Pruned`` from the trial's reporter makes it PRUNED;
- a trial's value is the best of its per-epoch objective (``objective: val/acc``: chosen on
  validation data).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from optuna.trial import TrialState

from fdfa.errors import FdfaError, find_fdfa_error
from fdfa.sweep_job import Pruned, TrialReporter

from ._confirm import run_confirmation
from ._jobs import JobRunner, job_result, link_overrides
from ._liveness import (
    Heartbeat,
    Preempted,
    WorkerSignals,
    abandoned,
    claim,
    fail_abandoned,
    hand_back,
    machine_id,
    places_taken,
)
from ._plan import Options, Plan
from ._results import remaining_time, write_results
from ._space import job_overrides, one_line
from ._storage import open_study, printable_url

log = logging.getLogger(__name__)


class Worker:
    """Worker ``index`` of a sweep; ``workers``: how many this command runs (for the estimate of
    the time left, which worker 0 gives after its first finished trial)."""

    def __init__(self, options: Options, plan: Plan, runner: JobRunner, index: int, workers=1):
        self.options, self.plan, self.runner = options, plan, runner
        self.index, self.workers = index, workers
        self.machine = machine_id()
        self.signals = WorkerSignals()
        self.estimated = index != 0  # only the command's own worker says how long is left

    def work(self, config, children=()) -> None:
        """Trials until the study is complete, the confirmation runs, the results (written also
        when stopped). ``children``: worker processes this one started, waited for at the end."""
        options, plan = self.options, self.plan
        seed = plan.seed + self.index if plan.seed is not None else None
        if "seed" in options.sampler and seed is None:
            seed = secrets.randbelow(2**31)  # this worker's own; logged so it can be replayed
        sampler = instantiate(options.sampler, **({"seed": seed} if seed is not None else {}))
        pruner = instantiate(options.pruner)
        study, _, self.lock = open_study(
            plan.url, plan.study_name, options.direction, sampler, pruner
        )
        log.info(
            "study %r in %s: %d trials, %s %s, sampler %s (seed %s), pruner %s",
            plan.study_name,
            printable_url(plan.url),
            options.n_trials,
            options.direction,
            options.objective,
            type(sampler).__name__,
            seed,
            type(pruner).__name__,
        )
        self.signals = WorkerSignals([proc for proc, _ in children])
        try:
            with self.signals:
                while (trial := self._next_trial(study)) is not None:
                    self._run_trial(study, trial)
                    self._check_failures(study)
                if options.confirm_seeds:
                    with self.lock():  # one worker runs them; the others then find them done
                        run_confirmation(
                            study, plan, options.confirm_seeds, self.runner, self.signals
                        )
        finally:
            failed_children = [c for c in children if c[0].wait() != 0]
            write_results(study, plan.sweep_dir, plan.url, options, config)
        if failed_children:
            proc, path = failed_children[0]
            raise FdfaError(f"worker pid {proc.pid} exited with code {proc.returncode}; see {path}")

    def _next_trial(self, study: optuna.Study) -> optuna.Trial | None:
        """A new trial while the study has fewer than n_trials; else wait for the other
        workers' running trials (one may be abandoned and need redoing), then None."""
        told = False
        while True:
            self.signals.stop_if_told()
            with self.lock():
                fail_abandoned(study, self.machine, self.options.grace_period)
                trials = study.get_trials(deepcopy=False)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if waiting or places_taken(trials) < self.options.n_trials:
                    try:
                        trial = study.ask(self.plan.space)
                    except ValueError as err:
                        raise FdfaError(
                            f"the search space does not fit study {study.study_name!r}: "
                            f"{one_line(err)}; use a new hydra.sweeper.study_name"
                        ) from err
                    claim(trial, self.machine)
                    return trial
                running = [t.number for t in trials if t.state == TrialState.RUNNING]
            if not running:
                return None
            if not told:
                log.info("all trials started; waiting for running trials %s", running)
                told = True
            time.sleep(min(self.options.heartbeat_interval, 1.0))

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial) -> None:
        plan, options = self.plan, self.options
        link = link_overrides("trial", plan.study_name, trial.number)
        overrides = job_overrides(plan.fixed, trial.params, *link)
        reporter = TrialReporter(trial, options.objective, options.direction)
        job_dir = plan.sweep_dir / str(trial.number)  # as the default subdir has it
        started = time.time()
        try:
            with Heartbeat(trial, options.heartbeat_interval), self.signals.job():
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
            with self.lock():
                hand_back(study, trial, f"its worker was stopped ({why})")
            raise Preempted(f"stopped by {why}: trial {trial.number} handed back (queued again)")
        self._tell(study, trial, status, result, reporter)
        self._estimate(study, time.time() - started)

    def _tell(self, study, trial, status, result, reporter: TrialReporter) -> None:
        if status == JobStatus.COMPLETED:
            value = reporter.best if reporter.best is not None else result
            if not reporter.values:
                log.warning(
                    "trial %d reported no per-epoch %s: the task function must pass its "
                    "callbacks to train() for pruning (fdfa/sweep_job.py)",
                    trial.number,
                    self.options.objective,
                )
            if isinstance(value, (int, float)) and math.isfinite(value):
                study.tell(trial, float(value))
                log.info("trial %d complete: %s %.4f", trial.number, self.options.objective, value)
                return
            result = f"the job's result {value!r} is not a finite number"
        elif isinstance(result, Pruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, result)
            return
        self._fail(study, trial, result)

    def _estimate(self, study: optuna.Study, seconds: float) -> None:
        """After this worker's first finished trial: how long the sweep may still take."""
        if self.estimated:
            return
        self.estimated = True
        left = self.options.n_trials - places_taken(study.get_trials(deepcopy=False))
        log.info(remaining_time(seconds, left, self.workers, self.options.confirm_seeds))

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
        trials = study.get_trials(deepcopy=False)
        gone = abandoned(trials)
        failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in gone]
        if len(failed) > self.options.max_failure_rate * self.options.n_trials:
            raise FdfaError(
                f"{len(failed)} trials of study {study.study_name!r} failed, more than "
                f"hydra.sweeper.max_failure_rate={self.options.max_failure_rate} of n_trials="
                f"{self.options.n_trials}; the last: {failed[-1].user_attrs.get('fail_reason')}"
            )


def job_status(job_dir: Path) -> str | None:
    """The ``status`` in a job's summary.json, if there is one."""
    try:
        return json.loads((job_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
