"""One finished run as the report sees it (RunData), and which config keys make two runs
different experiments (IGNORED_KEYS, MATTERS_ONLY_WHEN, relevant_config)."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from fdfa.protocol import evaluation_records, select_epoch
from fdfa.report.values import first_number, is_integer, is_number

# Config keys (and key prefixes) that never make two runs different experiments.
IGNORED_KEYS = (
    "seed",
    "dataset.root",
    "dataset.download",
    "trainer.device",
    "trainer.progress",
    "trainer.resume",
    "trainer.ckpt_every_n_steps",
    "trainer.cuda_graph",  # the same numbers with CUDA graphs and without
    "logger",
    "metrics",
    "wandb",
    "hydra",
    "sweep_job",  # how a sweeper ran the job (fdfa/sweep_job.py): bookkeeping
    "optuna_trial",  # the trial number in runs of fdfa before sweep_job: bookkeeping
)


# Keys that matter only when their config says so (the rule or the data ignores them otherwise):
# where the condition is false the key is dropped, so it neither splits rows nor shows in labels.
MATTERS_ONLY_WHEN = {
    "algorithm.momentum": lambda c: c.get("algorithm.feedback_update") == "ema",
    # DKP has no feedback_update: its Adam always uses feedback_lr
    "algorithm.feedback_lr": lambda c: c.get("algorithm.feedback_update", "adam") == "adam",
    "dataset.split_seed": lambda c: c.get("dataset.val_size") != 0,
}


def key_pattern(key_fmt: str) -> re.Pattern:
    """The regex of a per-layer key: "align/{}/cos" -> ^align/(.+)/cos$ (group 1: the layer)."""
    return re.compile("^" + re.escape(key_fmt).replace(r"\{\}", "(.+)") + "$")


ALIGN_KEY = key_pattern("align/{}/cos")


def relevant_config(config: dict) -> dict:
    """A flat config without IGNORED_KEYS and without the keys MATTERS_ONLY_WHEN drops."""
    kept = {k: v for k, v in config.items() if not _ignored(k)}
    return {k: v for k, v in kept.items() if MATTERS_ONLY_WHEN.get(k, lambda c: True)(config)}


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED_KEYS)


@dataclass(eq=False)
class RunData:
    """One finished run: its folder, summary.json, metrics.jsonl records and flat config."""

    path: Path
    summary: dict
    records: list[dict]
    config: dict | None  # dotted key -> value from .hydra/config.yaml; None if it has none

    @property
    def names(self) -> tuple[str, str, str]:
        return self.summary["dataset"], self.summary["model"], self.summary["algorithm"]

    @property
    def seed(self):
        return self.summary.get("seed", (self.config or {}).get("seed"))

    @property
    def relevant(self) -> dict | None:
        """The config keys that make it an experiment (see IGNORED_KEYS, MATTERS_ONLY_WHEN)."""
        return None if self.config is None else relevant_config(self.config)

    def identity(self) -> tuple:
        """Runs with the same identity are reruns of one experiment (same config and seed)."""
        config = None if self.config is None else sorted(map(repr, self.relevant.items()))
        return self.names, self.seed, repr(config)

    def finished_at(self) -> float:
        return (self.path / "summary.json").stat().st_mtime

    def epochs_done(self) -> int:
        epochs = self.summary.get("epochs")
        return epochs if is_integer(epochs) and epochs > 0 else self.evaluations()[-1]["epoch"]

    def evaluations(self) -> list[dict]:
        return [
            r for r in evaluation_records(self.records) if "epoch" in r and is_number(r["test/acc"])
        ]

    def final_acc(self) -> float:
        return first_number(self.summary.get("test/acc"), self.evaluations()[-1]["test/acc"])

    def selection(self) -> dict:
        """best/val/acc, best/epoch and selected/test/acc, from the records (runs written before
        summary.json had them are read the same way)."""
        return select_epoch(self.evaluations())

    def selected_acc(self) -> float:
        return self.selection()["selected/test/acc"]

    def epoch_seconds(self) -> tuple[float | None, str]:
        """Seconds per epoch and how they were found (records' time_s, else summary's wall_s)."""
        timed = [r for r in self.evaluations() if is_number(r.get("time_s"))]
        if timed:
            return timed[-1]["time_s"] / timed[-1]["epoch"], "time_s"
        wall, epochs = self.summary.get("wall_s"), self.summary.get("epochs")
        if is_number(wall) and is_number(epochs) and epochs > 0:
            return wall / epochs, "wall_s"
        return None, "none"

    def final_alignment(self) -> float | None:
        """The last logged align/mean_cos (or the mean of the last per-layer align/*/cos)."""
        for r in reversed(self.records):
            if is_number(r.get("align/mean_cos")):
                return r["align/mean_cos"]
            layer_cos = [v for k, v in r.items() if ALIGN_KEY.match(k) and is_number(v)]
            if layer_cos:
                return statistics.fmean(layer_cos)
        return None

    def curve(self, key: str, x: str) -> dict[float, float]:
        """{x: value} over the records that have both x and a finite value of key."""
        return {r[x]: r[key] for r in self.records if is_number(r.get(x)) and is_number(r.get(key))}

    def layers(self, key_fmt: str) -> list[str]:
        """Layer names of the records' keys of the form key_fmt, in the order they first appear."""
        pattern, found = key_pattern(key_fmt), {}
        for r in self.records:
            for k in r:
                m = pattern.match(k)
                if m:
                    found.setdefault(m.group(1), None)
        return list(found)
