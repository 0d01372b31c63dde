"""The W&B run of a whole Optuna study (job type ``study``), written at the end of a sweep whose
jobs log to W&B (``logger=wandb``, or any logger set with a ``wandb`` entry).

It holds the best value and params (summary), a table of every trial (number, state, value and
one column per param) and the PNG plots the sweeper saved in the sweep dir, as images. Its id is
derived from the study (name and first trial's start), so the workers of one study, on one
machine or many, all write the same W&B run: online the later report continues it (the table and
plots at a later step, the summary overwritten); offline the earlier sessions of that id in the
same wandb dir are superseded, as for a resumed training run (fdfa/loggers.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fdfa.loggers import _one_line, supersede_offline_sessions

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


def log_study(study, sweep_dir: Path, config: DictConfig) -> None:
    """Write (or update) the study's W&B run; a no-op without a wandb logger. Never raises: a
    report that cannot be written is one warning line."""
    settings = OmegaConf.select(config, "logger.wandb", default=None)
    if settings is None:
        return
    try:
        _log_study(study, Path(sweep_dir), OmegaConf.to_container(settings, resolve=True), config)
    except Exception as err:  # wandb raises many types; the sweep's results are on disk anyway
        log.warning("W&B study run not written (%s)", _one_line(err))


def study_run_id(study) -> str:
    """The same for every worker of one study, and different for another study of that name."""
    trials = study.get_trials(deepcopy=False)
    first = trials[0].datetime_start.isoformat() if trials and trials[0].datetime_start else ""
    return "study-" + hashlib.sha256(f"{study.study_name}|{first}".encode()).hexdigest()[:16]


def trials_table(study) -> tuple[list[str], list[list]]:
    """Columns and rows: number, state, value, then each param (None where a trial lacks it)."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({name for t in trials for name in t.params})
    rows = [
        [t.number, t.state.name.lower(), t.value if t.values else None]
        + [t.params.get(name) for name in params]
        for t in trials
    ]
    return ["number", "state", "value", *params], rows


def _log_study(study, sweep_dir: Path, settings: dict, config: DictConfig) -> None:
    import wandb

    objective = OmegaConf.select(config, "hydra.sweeper.objective", default=None) or "value"
    columns, rows = trials_table(study)
    states = [row[1] for row in rows]
    summary = {f"trials/{s}": states.count(s) for s in sorted(set(states))}
    completed = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if completed:
        best = study.best_trial
        summary.update(
            {f"best/{objective}": best.value, "best/trial": best.number},
            **{f"best/params/{k}": v for k, v in best.params.items()},
        )
    run_id, mode = study_run_id(study), settings.get("mode") or "offline"
    wandb_dir = Path(settings.get("dir") or os.environ.get("WANDB_DIR") or sweep_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    if mode in ("offline", "dryrun"):
        supersede_offline_sessions(wandb_dir / "wandb", run_id)
    run = wandb.init(
        project=settings.get("project"),
        entity=settings.get("entity"),
        group=settings.get("group") or study.study_name,  # as its trials' (sweep_job.group)
        job_type="study",
        name=f"study-{study.study_name}",
        id=run_id,
        resume="allow",
        tags=[str(t) for t in settings.get("tags") or []],
        mode=mode,
        dir=str(wandb_dir),
        config={
            "study_name": study.study_name,
            "objective": objective,
            "direction": study.direction.name.lower(),
        },
        reinit="create_new",
    )
    try:
        images = {
            f"plots/{name}": wandb.Image(str(sweep_dir / f"{name}.png"))
            for name in PLOTS
            if (sweep_dir / f"{name}.png").is_file()
        }
        run.log({"trials": wandb.Table(columns=columns, data=rows), **images})
        run.summary.update(summary)
    finally:
        run.finish()
    log.info("W&B study run %s (%s): %d trials", run_id, mode, len(rows))
