"""The W&B run of a whole Optuna study (job type ``study``), written at the end of a sweep whose
jobs log to W&B (``logger=wandb``, or any logger set with a ``wandb`` entry); and a benchmark's
run (job type ``benchmark``, :func:`log_benchmark`) with its comparison table.

It holds the best value and params (summary), a table of every trial (number, state, value and
one column per param) and the PNG plots the sweeper saved in the sweep dir, as images. Its id is
derived from the study (name and first trial's start), so the workers of one study, on one
machine or many, all write the same W&B run: online the later report continues it (the table and
plots at a later step, the summary overwritten); offline the earlier sessions of that id in the
same wandb dir are superseded, as for a resumed training run (fdfa/loggers.py).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fdfa.loggers import _one_line, supersede_offline_sessions

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


def log_study(study, sweep_dir: Path, config: DictConfig, group: str | None = None) -> None:
    """Write (or update) the study's W&B run; a no-op without a wandb logger. Never raises: a
    report that cannot be written is one warning line. ``group``: its jobs' W&B group when not
    the study's name (a benchmark's name)."""
    settings = OmegaConf.select(config, "logger.wandb", default=None)
    if settings is None:
        return
    try:
        settings = OmegaConf.to_container(settings, resolve=True)
        settings["group"] = settings.get("group") or group  # the configured group wins
        _log_study(study, Path(sweep_dir), settings, config)
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
    run_id = study_run_id(study)
    run = _summing_run(
        settings,
        sweep_dir,
        id=run_id,
        group=settings.get("group") or study.study_name,  # as its trials' (sweep_job.group)
        job_type="study",
        name=f"study-{study.study_name}",
        config={
            "study_name": study.study_name,
            "objective": objective,
            "direction": study.direction.name.lower(),
        },
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
    log.info("W&B study run %s (%s): %d trials", run_id, settings.get("mode"), len(rows))


def _summing_run(settings: dict, out_dir: Path, **init):
    """A W&B run that sums up others (a study's, a benchmark's): the logger's project, entity,
    tags and mode, its offline files under ``<dir>/wandb/`` (``dir``: the logger's, else
    $WANDB_DIR, else ``out_dir``), continued by a later call with the same ``id``."""
    import wandb

    mode = settings.get("mode") or "offline"
    wandb_dir = Path(settings.get("dir") or os.environ.get("WANDB_DIR") or out_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    if mode in ("offline", "dryrun"):
        supersede_offline_sessions(wandb_dir / "wandb", init["id"])
    return wandb.init(
        project=settings.get("project"),
        entity=settings.get("entity"),
        resume="allow",
        tags=[str(t) for t in settings.get("tags") or []],
        mode=mode,
        dir=str(wandb_dir),
        reinit="create_new",
        **init,
    )


def log_benchmark(report_dir: Path, name: str, config: DictConfig) -> None:
    """The benchmark's W&B run (job type ``benchmark``, in the W&B group ``name`` with all its
    rules' runs): the report's results.csv as the table ``comparison`` (numbers as numbers) and
    its plots as images. A no-op without a wandb logger; never raises (one warning line)."""
    settings = OmegaConf.select(config, "logger.wandb", default=None)
    if settings is None:
        return
    try:
        settings = OmegaConf.to_container(settings, resolve=True)
        with (Path(report_dir) / "results.csv").open(newline="") as f:
            columns, *rows = list(csv.reader(f))
        run_id = "benchmark-" + hashlib.sha256(f"{name}|{report_dir}".encode()).hexdigest()[:16]
        run = _summing_run(
            settings,
            Path(report_dir),
            id=run_id,
            group=settings.get("group") or name,
            job_type="benchmark",
            name=f"benchmark-{name}",
            config={"benchmark": name, "report": str(report_dir)},
        )
    except Exception as err:  # wandb raises many types; the report is on disk anyway
        log.warning("W&B benchmark run not written (%s)", _one_line(err))
        return
    try:
        import wandb

        table = wandb.Table(columns=columns, data=[[table_cell(v) for v in row] for row in rows])
        plots = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(report_dir.glob("*.png"))}
        run.log({"comparison": table, **plots})
        run.summary.update({"rows": len(rows)})
    except Exception as err:
        log.warning("W&B benchmark run incomplete (%s)", _one_line(err))
    finally:
        run.finish()
    log.info("W&B benchmark run %s: the comparison table, %d rows", run_id, len(rows))


def table_cell(text: str):
    """A results.csv cell for a W&B table: a number as a float, empty as None, else the text."""
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text
