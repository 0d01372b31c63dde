"""What a job of an Optuna sweep (``python run.py -m sweep=lr``) gets from the sweeper, and how it
reports back. Two explicit links, nothing else:

- the config node ``sweep_job`` (conf/config.yaml): ``kind`` (``train``, ``trial`` or
  ``confirm``), the trial's ``number``, the study's name as ``group`` (a benchmark's name for
  all its rules' jobs) and, in a benchmark, the ``rule`` the job belongs to. The sweeper sets it
  by overrides for each job it runs, so a run's .hydra/config.yaml says how it ran; the loggers
  read it (W&B's group, job type, tags and run name; TensorBoard's hparams) through
  :func:`job_of`, and the report ignores it.
- the trainer callbacks given to the task function (``fdfa.cli.task(cfg, callbacks)``): for a
  trial, a :class:`TrialReporter` that reports the objective after each evaluation and ends the
  job by raising :class:`Pruned` when the trial's pruner says so.

Outside a sweep the node keeps its defaults and the task gets no callbacks. This module imports
nothing heavy: the reporter only calls the trial's public ``report`` and ``should_prune``.
"""

from __future__ import annotations

import math

from fdfa.errors import FdfaError

KINDS = ("train", "trial", "confirm")  # a plain run, a study's trial, a rerun of its best params


class Pruned(Exception):
    """Raised by a trial's reporter to end its job early: the trainer records the run as
    ``pruned`` and the sweeper tells the study the trial was pruned."""


def job_of(run_config: dict) -> dict:
    """The ``sweep_job`` node of a resolved config, with its defaults where a key is missing
    (configs written before the node existed)."""
    node = run_config.get("sweep_job") or {}
    return {
        "kind": node.get("kind") or "train",
        "number": node.get("number"),
        "group": node.get("group"),
        "rule": node.get("rule"),
    }


class TrialReporter:
    """A trainer callback: reports ``record[objective]`` at each epoch to an Optuna trial, keeps
    the best value seen (the job's result), and prunes the job when the pruner says so. With
    ``trial=None`` (a trial's later seeds, ``hydra.sweeper.seeds_per_trial`` > 1) it only keeps
    the values: the pruner decides on a trial's first seed, whose epochs every trial reports."""

    def __init__(self, trial, objective: str = "val/acc", direction: str = "maximize"):
        if direction not in ("maximize", "minimize"):
            raise FdfaError(f"sweep direction must be maximize or minimize, got {direction!r}")
        self.trial = trial
        self.objective = objective
        self.direction = direction
        self.values: list[float] = []  # the objective at each evaluation, in order

    @property
    def best(self) -> float | None:
        """The best objective over the evaluations so far (None before the first)."""
        if not self.values:
            return None
        return max(self.values) if self.direction == "maximize" else min(self.values)

    def on_evaluation(self, run, record: dict) -> None:
        if self.objective not in record:
            metrics = ", ".join(sorted(k for k in record if k not in ("epoch", "step")))
            raise FdfaError(
                f"sweep objective {self.objective!r} is not a metric of this run; "
                f"set hydra.sweeper.objective to one of: {metrics}"
            )
        value = float(record[self.objective])
        self.values.append(value)
        if not math.isfinite(value) or self.trial is None:
            return  # nothing to report; the trial fails when the job ends with a non-finite value
        self.trial.report(value, step=record["epoch"])
        if self.trial.should_prune():
            raise Pruned(f"at epoch {record['epoch']} with {self.objective} {value:.4g}")
