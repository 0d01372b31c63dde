"""The sweep command (``python run.py -m sweep=lr``): works out the plan before any trial runs
(the search space, every trial's config composed once, the study's settings checked against the
ones it recorded, the sweep dir claimed for this study), then starts the workers: with Hydra's
basic launcher the command is worker 0 and starts ``n_jobs - 1`` more as processes; with any
other launcher it submits ``n_jobs`` worker jobs (_launch.py), waits for them and writes the
results. Its last lines say where the results and the report are."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import optuna
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from fdfa.errors import FdfaError, find_fdfa_error
from fdfa.gpus import assign_gpu

from ._benchmark import flat_params, read_benchmark, rule_arguments, write_report
from ._jobs import JobRunner, job_result, link_overrides
from ._launch import WorkerTask, fixed_arguments, resolve_n_jobs, start_processes, worker_jobs
from ._liveness import Preempted, fail_abandoned, finished_places, machine_id
from ._loop import Worker
from ._plan import Options, Plan
from ._results import closing_lines, write_results
from ._settings import check_settings, shared_settings
from ._space import job_overrides, one_line, probe_points, search_space
from ._storage import claim_sweep_dir, open_study, printable_url

log = logging.getLogger(__name__)


class SweepCommand:
    def __init__(self, options: Options, hydra_context, task_function, config: DictConfig):
        self.options = options
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        study_name = self.options.study_name or sweep_dir.name
        url = self.options.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        bench = read_benchmark(self.config)
        if bench is None:
            plans = [self._plan(self.options.params, arguments, sweep_dir, study_name, url)]
        else:  # one study per rule, in <sweep dir>/<rule>/ (_benchmark.py)
            self.options = replace(self.options, n_trials=bench.trials, confirm_seeds=bench.seeds)
            claim_sweep_dir(sweep_dir, study_name, url)
            plans = []
            for rule in bench.rules:
                rule_dir = sweep_dir / rule
                rule_args = rule_arguments(bench, rule, arguments, rule_dir)
                params = flat_params(bench.spaces[rule].get("params"))
                plan = self._plan(params, rule_args, rule_dir, f"{study_name}-{rule}", url)
                plans.append(replace(plan, label=rule, group=study_name))
        for plan in plans:
            claim_sweep_dir(plan.sweep_dir, plan.study_name, plan.url)  # or refuse
            study, _, lock = self._open(plan)
            with lock():  # before any trial: a rerun with other settings must not join the study
                check_settings(study, plan.settings)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if isinstance(self.launcher, BasicLauncher):  # trials run in this command's processes
            n_jobs = resolve_n_jobs(self.options.n_jobs)
            assign_gpu(0)  # worker 0; the others get theirs from start_processes
            children = []
            if n_jobs > 1:
                children = start_processes(sweep_dir, url, study_name, plans[0].seed, n_jobs)
            runner = JobRunner(self.hydra_context, self.config, self.task_function)
            Worker(self.options, plans, runner, 0, n_jobs).work(self.config, children)
        else:
            self._drive_launcher(plans, sweep_dir, arguments)
        if bench is None:
            lines = closing_lines(sweep_dir)
        else:
            studies = [self._open(p)[0] for p in plans]
            report = write_report(sweep_dir, plans, studies, bench.seeds, self.config)
            lines = [f"results: {sweep_dir}/<rule>/optimization_results.yaml"]
            if report is None:
                lines.append("report: not yet (confirmation runs missing): rerun the command")
            else:
                lines.append(f"report: {report / 'results.md'} (results.csv, plots)")
        for line in lines:
            print(line, flush=True)

    def _open(self, plan: Plan):
        """(study, storage, lock) of ``plan``'s study (_storage.open_study)."""
        options = self.options
        return open_study(
            plan.url, plan.study_name, options.direction, timeout_s=options.storage_timeout_s
        )

    def _plan(self, params: dict, arguments: list[str], sweep_dir, study_name, url) -> Plan:
        """The search space, checked by composing the trials' configs now (not mid-sweep), the
        settings they share, and where the study lives."""
        loader = self.hydra_context.config_loader
        space, fixed = search_space(loader, params, arguments)
        trial_seed = settings = None
        for point in probe_points(space):
            overrides = job_overrides(fixed, point, *link_overrides("trial", study_name, 0))
            try:
                job_config = loader.load_sweep_config(self.config, overrides)
            except Exception as err:
                raise FdfaError(
                    f"a trial's config does not compose ({' '.join(overrides)}): {one_line(err)}"
                ) from err
            self._check_selection(job_config)
            trial_seed = job_config.seed
            if settings is None:  # from the first point: the same for every rerun
                settings = shared_settings(job_config, list(space))
        if (self.options.confirm_seeds or self.options.seeds_per_trial > 1) and "seed" in space:
            raise FdfaError(
                "hydra.sweeper.confirm_seeds and seeds_per_trial need the trials' seeds fixed, "
                "but the sweep searches seed: drop seed from the params, or set "
                "hydra.sweeper.confirm_seeds=0 and hydra.sweeper.seeds_per_trial=1"
            )
        return Plan(
            space=space,
            fixed=fixed,
            sweep_dir=sweep_dir,
            study_name=study_name,
            url=url,
            seed=self.options.sampler.get("seed"),
            trial_seed=trial_seed,
            settings=settings,
            seeds_per_trial=self.options.seeds_per_trial,
        )

    def _check_selection(self, job_config: DictConfig) -> None:
        """Trials are chosen on validation data; selecting on the test set must be asked for."""
        objective = self.options.objective
        val_size = OmegaConf.select(job_config, "dataset.val_size", default=0)
        if objective.startswith("test/"):
            log.warning(
                "hydra.sweeper.objective=%s selects trials on the test set: the best value "
                "overstates the test accuracy a fresh run would get; prefer val/acc",
                objective,
            )
        elif objective.startswith("val/") and not val_size:
            raise FdfaError(
                f"hydra.sweeper.objective={objective} needs a validation set, but "
                f"dataset.val_size={val_size}: set dataset.val_size (e.g. 5000), or select on "
                "the test set knowingly with hydra.sweeper.objective=test/acc"
            )

    def _drive_launcher(self, plans: list[Plan], sweep_dir: Path, arguments: list[str]) -> None:
        """Submit n_jobs worker jobs through the configured launcher, wait, and report."""
        options = self.options
        n_jobs = resolve_n_jobs(options.n_jobs)
        task = WorkerTask(options, plans, self.config, self.hydra_context, self.task_function)
        self.launcher.setup(
            hydra_context=self.hydra_context, task_function=task, config=self.config
        )
        log.info(
            "%s in %s: %d trials each on %d workers, each a %s job (logs: %s/workers/)",
            ", ".join(repr(p.study_name) for p in plans),
            printable_url(plans[0].url),
            options.n_trials,
            n_jobs,
            type(self.launcher).__name__,
            sweep_dir,
        )
        errors, user_errors = [], []
        try:
            jobs = worker_jobs(fixed_arguments(arguments), sweep_dir, n_jobs)
            returns = self.launcher.launch(jobs, initial_job_idx=0)
        except Exception as err:  # e.g. submitit: a worker job was killed
            errors.append(one_line(err))
            returns = []
        for ret in returns:
            status, result = job_result(ret)
            if status != JobStatus.COMPLETED:
                user_error = find_fdfa_error(result)
                errors.append(one_line(user_error or result))
                if user_error is not None and not isinstance(user_error, Preempted):
                    user_errors.append(user_error)
        short = []  # (study name, finished trials) of the studies short of n_trials
        for plan in plans:
            study, _, lock = self._open(plan)
            self._wait_for_running(study, lock)
            write_results(study, plan, options, self.config)
            done = len(finished_places(study.get_trials(deepcopy=False)))
            if done < options.n_trials:
                short.append((plan.study_name, done))
        launch_outcome(errors, user_errors, short, options.n_trials)

    def _wait_for_running(self, study: optuna.Study, lock) -> None:
        """Until no trial runs (a killed worker's is failed and queued: this machine's at once,
        others' after the grace period), and none has run for a heartbeat interval."""
        machine, quiet_since = machine_id(), None
        while True:
            with lock():
                fail_abandoned(study, machine, self.options.grace_period)
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if running:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.time()
            elif time.time() - quiet_since > min(self.options.heartbeat_interval, 2.0):
                return
            time.sleep(0.5)


def launch_outcome(errors: list[str], user_errors: list, short: list, n_trials: int) -> None:
    """After the worker jobs: a user's error as it is; a study short of ``n_trials`` is an error
    line that says how to resume (also when no job failed: a worker that ends early without one
    must not pass for a finished sweep); job failures of a finished study are warnings."""
    if user_errors:
        raise user_errors[0]
    if short:
        name, done = short[0]
        why = (
            f"{len(errors)} worker job(s) failed ({errors[0]})"
            if errors
            else "the worker jobs ended without an error"
        )
        raise FdfaError(
            f"{why}; study {name!r} has {done} of {n_trials} trials: run the same command "
            "again to resume"
        )
    for error in errors:
        log.warning("a worker job failed (the study finished all the same): %s", error)
