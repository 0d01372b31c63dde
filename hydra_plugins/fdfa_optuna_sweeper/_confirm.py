"""Confirmation runs: once a study is complete, its best trial's params again on seeds no trial
used, so that the reported test accuracy does not carry the luck that made the trial win.

The trials run at the config's ``seed`` s; confirmation run i (1..confirm_seeds) uses seed s + i,
in ``<sweep dir>/confirm/seed<s+i>/``, and the results file names the trial seed and the seeds.
``confirm/trial.yaml`` records the trial, its params and s: confirmation runs made for another
best trial (the study grew since) or another trial seed are moved aside before new ones run. A
rerun runs only the seeds still missing. Each run is a ``sweep_job.kind=confirm`` job.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fdfa.protocol import mean_ci

from ._jobs import link_overrides
from ._plots import write_atomic
from ._space import job_overrides, one_line

log = logging.getLogger(__name__)


def confirm_seeds(trial_seed: int, n: int) -> list[int]:
    """The confirmation seeds: the trials' seed + 1..n, seeds no trial used."""
    return [trial_seed + i for i in range(1, n + 1)]


def run_confirmation(study: optuna.Study, plan, n: int, runner, signals) -> None:
    """Run the best trial's params on each of the ``n`` confirmation seeds that has no finished
    run yet, with ``runner`` (a _jobs.JobRunner); ``signals`` (the worker's WorkerSignals) stop
    it between runs or inside one."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        log.warning("no trial completed: no confirmation runs")
        return
    best = study.best_trial
    confirm_dir = plan.sweep_dir / "confirm"
    chosen = {"trial": best.number, "params": best.params, "trial_seed": plan.trial_seed}
    marker = confirm_dir / "trial.yaml"
    if marker.is_file() and OmegaConf.to_container(OmegaConf.load(marker)) != chosen:
        stale = confirm_dir.with_name(f"confirm.old-{time.strftime('%Y%m%d-%H%M%S')}")
        confirm_dir.rename(stale)
        log.warning("best trial changed: earlier confirmation runs moved to %s", stale)
    confirm_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, OmegaConf.to_yaml(chosen))
    for seed in confirm_seeds(plan.trial_seed, n):
        if confirmed_value(confirm_dir / f"seed{seed}") is not None:
            continue
        signals.stop_if_told()
        link = link_overrides("confirm", plan.study_name)
        overrides = job_overrides(
            plan.fixed, best.params, f"seed={seed}", f"hydra.sweep.subdir=confirm/seed{seed}", *link
        )
        log.info("confirmation run, seed %d, of trial %d's params", seed, best.number)
        try:
            with signals.job():
                ret = runner.run(overrides, seed)
            ret.return_value  # noqa: B018  (raises the job's error)
        except Exception as err:
            log.warning("confirmation run seed %d failed: %s", seed, one_line(err))


def confirmation_results(sweep_dir: Path, n: int) -> dict | None:
    """The ``confirm:`` section of optimization_results.yaml (None without confirmation)."""
    marker = sweep_dir / "confirm" / "trial.yaml"
    if not n or not marker.is_file():
        return None
    chosen = OmegaConf.to_container(OmegaConf.load(marker))
    if chosen.get("trial_seed") is None:  # an older fdfa's runs (seeds 0..N-1): redone
        return None
    seeds = confirm_seeds(chosen["trial_seed"], n)
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
