"""Confirmation runs: once a study is complete, its best trial's params again on seeds no trial
used, so that the reported test accuracy does not carry the luck that made the trial win.

The trials run at seeds s..s+k-1 (s: the config's ``seed``, k: ``seeds_per_trial``, 1 unless
set); confirmation runs use the next N seeds, s+k..s+k+N-1, in ``<sweep dir>/confirm/seed<seed>/``,
and the results file names the trial seeds and the confirmation seeds. ``confirm/trial.yaml``
records the trial, its params and s (and k when above 1): confirmation runs made for another best
trial (the study grew since) or other trial seeds are moved aside before new ones run. A rerun runs
only the seeds still missing. Each run is a ``sweep_job.kind=confirm`` job.

Workers share the seeds: a worker takes a seed by holding an exclusive lock on
``confirm/.seed<seed>.lock`` while it runs (the system lets go of it when the worker dies), so two
workers never run the same seed, and a seed whose worker died is free for the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fdfa.protocol import mean_ci
from fdfa.runfiles import RunFiles

from ._plots import write_atomic
from ._space import job_overrides, one_line

log = logging.getLogger(__name__)


def chosen_trial(study: optuna.Study, plan) -> optuna.trial.FrozenTrial | None:
    """The best trial, with confirm/trial.yaml written for it (an older one's runs moved aside);
    None when no trial completed. Call under the study's lock."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    confirm_dir = plan.sweep_dir / "confirm"
    chosen = {"trial": best.number, "params": best.params, "trial_seed": plan.trial_seed}
    if plan.seeds_per_trial != 1:  # runs of fdfa before seeds_per_trial keep their marker valid
        chosen["seeds_per_trial"] = plan.seeds_per_trial
    marker = confirm_dir / "trial.yaml"
    if marker.is_file() and OmegaConf.to_container(OmegaConf.load(marker)) != chosen:
        stale = confirm_dir.with_name(f"confirm.old-{time.strftime('%Y%m%d-%H%M%S')}")
        confirm_dir.rename(stale)
        log.warning("best trial changed: earlier confirmation runs moved to %s", stale)
    if not marker.is_file():
        confirm_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, OmegaConf.to_yaml(chosen))
    return best


@contextlib.contextmanager
def claimed(path: Path):
    """True while this process holds ``path``'s exclusive lock; False when another one does."""
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def confirm_one(study, plan, n: int, runner, signals, lock, skip: set) -> bool:
    """Run one of the ``n`` confirmation seeds that has no finished run and no worker (with
    ``runner``, a _jobs.JobRunner; ``signals``: the worker's WorkerSignals); False when none is
    left to take. ``skip``: (study, seed) pairs whose run failed in this worker (not retried)."""
    with lock():
        best = chosen_trial(study, plan)
    if best is None:
        return False
    confirm_dir = plan.sweep_dir / "confirm"
    seeds = plan.confirm_seeds(n)
    for seed in seeds:
        run_dir = confirm_dir / f"seed{seed}"
        if (plan.study_name, seed) in skip or confirmed_value(run_dir) is not None:
            continue
        with claimed(confirm_dir / f".seed{seed}.lock") as mine:
            if not mine or confirmed_value(run_dir) is not None:
                continue
            signals.stop_if_told()
            link = plan.links("confirm")
            subdir = f"hydra.sweep.subdir=confirm/seed{seed}"
            overrides = job_overrides(plan.fixed, best.params, f"seed={seed}", subdir, *link)
            log.info("confirmation run, seed %d, of trial %d's params", seed, best.number)
            try:
                with signals.job():
                    ret = runner.run(overrides, seed)
                ret.return_value  # noqa: B018  (raises the job's error)
            except Exception as err:
                skip.add((plan.study_name, seed))
                log.warning(
                    "%sconfirmation run seed %d failed: %s",
                    f"[{plan.label}] " if plan.label else "",
                    seed,
                    one_line(err),
                )
                return True
            left = sum(confirmed_value(confirm_dir / f"seed{s}") is None for s in seeds)
            value = confirmed_value(run_dir)
            log.info(
                "%sseed %d done: selected/test/acc %s (%d seed run(s) left)",
                f"[{plan.label}] " if plan.label else "",
                seed,
                "?" if value is None else f"{value:.4f}",
                left,
            )
            return True
    return False


def confirmation_results(sweep_dir: Path, n: int) -> dict | None:
    """The ``confirm:`` section of optimization_results.yaml (None without confirmation)."""
    marker = sweep_dir / "confirm" / "trial.yaml"
    if not n or not marker.is_file():
        return None
    chosen = OmegaConf.to_container(OmegaConf.load(marker))
    if chosen.get("trial_seed") is None:  # an older fdfa's runs (seeds 0..N-1): redone
        return None
    per_trial = chosen.get("seeds_per_trial", 1)
    seeds = [chosen["trial_seed"] + per_trial + i for i in range(n)]
    values = {s: confirmed_value(sweep_dir / "confirm" / f"seed{s}") for s in seeds}
    done = [v for v in values.values() if v is not None]
    section = {
        "trial": chosen["trial"],
        "params": chosen["params"],
        "trial_seed": chosen["trial_seed"],  # s: every trial ran at seeds s..s+k-1
        "trial_seeds": [chosen["trial_seed"] + j for j in range(per_trial)],
        "seeds": seeds,  # the confirmation runs' seeds: the N after the trials', s+k..s+k+N-1
        "selected_test_acc": values,  # per seed: test acc at its best-val epoch
        "missing_seeds": [s for s, v in values.items() if v is None],
    }
    if done:
        mean, half = mean_ci(done)
        section.update(mean=mean, ci95_half_width=half)
        if half is not None:
            section["ci95"] = [mean - half, mean + half]
    return section


def confirmed_value(run_dir: Path) -> float | None:
    """selected/test/acc of a finished run in run_dir (None: missing, unfinished or unreadable)."""
    summary = RunFiles(run_dir).read_summary()
    if summary is None or summary.get("status") != "completed":
        return None
    value = summary.get("selected/test/acc")
    return float(value) if isinstance(value, (int, float)) else None
