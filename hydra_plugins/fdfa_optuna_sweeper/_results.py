"""What a sweep leaves for its reader: optimization_results.yaml (trial counts, the best trial,
the confirmation runs), the plots beside the trials, the study's W&B run when jobs log to W&B,
the time a sweep has left once a trial has finished, and the closing lines that say where all
of it is."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from fdfa.study_report import log_study

from ._confirm import confirmation_results
from ._plan import Options, Plan
from ._plots import save_plots, write_atomic
from ._space import override_value
from ._storage import printable_url

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"


def write_results(study: optuna.Study, plan: Plan, options: Options, config: DictConfig) -> None:
    """optimization_results.yaml, the plots and the W&B study run, from the study as it is now."""
    sweep_dir, url = plan.sweep_dir, plan.url
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    results = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": printable_url(url),
        "direction": options.direction,
        "objective": options.objective,
        "trials": dict(sorted(states.items())),
        "seeds_per_trial": plan.seeds_per_trial,
        "trial_seeds": plan.trial_seeds(),  # every trial trained these seeds; value: their mean
    }
    if states["complete"]:
        best = study.best_trial
        results.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        if "seed_values" in best.user_attrs:  # the spread of the best trial's seeds
            results.update(
                best_seed_values={int(k): v for k, v in best.user_attrs["seed_values"].items()},
                best_seed_std=best.user_attrs["seed_std"],
            )
        log.info(
            "%sBest trial %d: %s = %.4f with %s",
            f"[{plan.label}] " if plan.label else "",
            best.number,
            options.objective,
            best.value,
            " ".join(f"{k}={override_value(v)}" for k, v in best.params.items()),
        )
    else:
        log.warning("no trial of study %r completed: no best trial", study.study_name)
    confirm = confirmation_results(sweep_dir, options.confirm_seeds)
    if confirm is not None:
        results["confirm"] = confirm
        if "mean" in confirm:
            half = confirm["ci95_half_width"]
            log.info(
                "%sconfirmation: test acc at best-val epoch %.4f%s over seeds %s",
                f"[{plan.label}] " if plan.label else "",
                confirm["mean"],
                "" if half is None else f" ± {half:.4f} (95% CI)",
                [s for s in confirm["seeds"] if s not in confirm["missing_seeds"]],
            )
    write_atomic(sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(results))
    if states["complete"]:
        save_plots(study, sweep_dir)
    log_study(study, sweep_dir, config, plan.group or None)  # its W&B run, when jobs log there


def closing_lines(sweep_dir: Path) -> list[str]:
    """The last lines of a sweep command: where its results and its report are."""
    return [
        f"results: {sweep_dir / RESULTS_FILE} (plots: {sweep_dir}/*.png)",
        f"report: python -m fdfa.report {sweep_dir} --out report/{sweep_dir.name}",
    ]


def remaining_time(trial_seconds: float, trials_left: int, workers: int, confirm_runs: int) -> str:
    """One line: how long the sweep may still take, from one trial's time: the trials left and
    the confirmation runs in waves of ``workers`` (the workers share the confirmation seeds)."""
    runs = max(trials_left, 0) + confirm_runs
    seconds = math.ceil(runs / workers) * trial_seconds
    then = f", then {confirm_runs} confirmation runs" if confirm_runs else ""
    return (
        f"a trial took {duration(trial_seconds)}: about {duration(seconds)} left for "
        f"{max(trials_left, 0)} more trial(s) on {workers} worker(s){then} "
        "(pruned trials end sooner)"
    )


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
