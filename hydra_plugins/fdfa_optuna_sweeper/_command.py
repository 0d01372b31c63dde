"""The sweep command (``python run.py -m sweep=lr``): works out the plan before any trial runs
(the search space, every trial's config composed once, the study's settings checked against the
ones it recorded, the sweep dir claimed for this study), then starts the workers: with Hydra's
basic launcher the command is worker 0 and starts ``n_jobs - 1`` more as processes; with any
other launcher it submits ``n_jobs`` worker jobs (_launch.py), waits for them and writes the
results. Its last lines say where the results and the report are."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from fdfa.errors import FdfaError, find_fdfa_error
from fdfa.gpus import assign_gpu

from ._jobs import JobRunner, job_result, link_overrides
from ._launch import WorkerTask, resolve_n_jobs, start_processes, worker_jobs
from ._liveness import Preempted, abandoned, fail_abandoned, machine_id
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
        plan = self._plan(arguments)
        claim_sweep_dir(plan.sweep_dir, plan.study_name, plan.url)  # or refuse: another study's
        study, _, lock = open_study(plan.url, plan.study_name, self.options.direction)
        with lock():  # before any trial: a rerun with other settings must not join the study
            check_settings(study, plan.settings)
        OmegaConf.save(self.config, plan.sweep_dir / "multirun.yaml")
        if isinstance(self.launcher, BasicLauncher):  # trials run in this command's processes
            n_jobs = resolve_n_jobs(self.options.n_jobs)
            assign_gpu(0)  # worker 0; the others get theirs from start_processes
            children = start_processes(plan, n_jobs) if n_jobs > 1 else []
            runner = JobRunner(self.hydra_context, self.config, self.task_function)
            Worker(self.options, plan, runner, 0, n_jobs).work(self.config, children)
        else:
            self._drive_launcher(plan)
        for line in closing_lines(plan.sweep_dir):
            print(line, flush=True)

    def _plan(self, arguments: list[str]) -> Plan:
        """The search space, checked by composing the trials' configs now (not mid-sweep), the
        settings they share, and where the study lives."""
        loader = self.hydra_context.config_loader
        space, fixed = search_space(loader, self.options.params, arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        study_name = self.options.study_name or sweep_dir.name
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
        if self.options.confirm_seeds and "seed" in space:
            raise FdfaError(
                "hydra.sweeper.confirm_seeds needs trials at one seed, but the sweep searches "
                "seed: drop seed from the params, or set hydra.sweeper.confirm_seeds=0"
            )
        return Plan(
            space=space,
            fixed=fixed,
            sweep_dir=sweep_dir,
            study_name=study_name,
            url=self.options.storage or f"sqlite:///{sweep_dir / 'optuna.db'}",
            seed=self.options.sampler.get("seed"),
            trial_seed=trial_seed,
            settings=settings,
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

    def _drive_launcher(self, plan: Plan) -> None:
        """Submit n_jobs worker jobs through the configured launcher, wait, and report."""
        options = self.options
        n_jobs = resolve_n_jobs(options.n_jobs)
        study, _, lock = open_study(plan.url, plan.study_name, options.direction)
        task = WorkerTask(options, plan, self.config, self.hydra_context, self.task_function)
        self.launcher.setup(
            hydra_context=self.hydra_context, task_function=task, config=self.config
        )
        log.info(
            "study %r in %s: %d trials on %d workers, each a %s job (logs: %s/workers/)",
            plan.study_name,
            printable_url(plan.url),
            options.n_trials,
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
            status, result = job_result(ret)
            if status != JobStatus.COMPLETED:
                user_error = find_fdfa_error(result)
                errors.append(one_line(user_error or result))
                if user_error is not None and not isinstance(user_error, Preempted):
                    user_errors.append(user_error)
        self._wait_for_running(study, lock)
        write_results(study, plan.sweep_dir, plan.url, options, self.config)
        if user_errors:
            raise user_errors[0]
        trials = study.get_trials(deepcopy=False)
        gone = abandoned(trials)  # failed and queued again: their redos take their places
        done = sum(1 for t in trials if t.state.is_finished() and t.number not in gone)
        if errors and done < options.n_trials:
            raise FdfaError(
                f"{len(errors)} worker job(s) failed ({errors[0]}); study {plan.study_name!r} has "
                f"{done} of {options.n_trials} trials: run the same command again to resume"
            )
        for error in errors:
            log.warning("a worker job failed (the study finished all the same): %s", error)

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
