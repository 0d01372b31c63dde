"""Compare finished runs offline: one table (Markdown and CSV) and PNG plots, from the run dirs.

    python -m fdfa.report multirun/mnist_fc2/2025-01-01_12-00-00 --out report/
    python -m fdfa.report outputs/ multirun/ --out report/      # any mix of sweeps and single runs

Every folder under the given dirs that holds summary.json, metrics.jsonl or .hydra/ is a run. A
run is used if its summary.json says status "completed" and its metrics.jsonl has at least one
evaluation record (one with epoch and test/acc); every other one is listed as skipped, with why:
a run killed or still running says how many epochs its records and last.ckpt hold, a run dir with
unreadable files says which, the benchmark's runs (``fdfa.bench``) are left out. Runs of the same
config and seed (a rerun) count once: the one that finished last.

Runs are grouped into rows by the (dataset, model, algorithm) names of their summary.json. When
runs of a row differ in their config (.hydra/config.yaml) in anything that matters (not the seed,
where they ran, the loggers, the side metrics: IGNORED_KEYS; nor a key the rule ignores in that
config: MATTERS_ONLY_WHEN), they are split and the differing keys are added to the label: model.*
keys to the model (``fc (n_layers=3)``), algorithm.* keys to the algorithm, any other key to the
variant column.

Each row gives, over its seeds, the test accuracy at each run's best-validation epoch (the
protocol: chosen on validation data, test set read there) as mean ± 95 % Student-t interval, the
paired difference to BP on the same seeds, the best validation and the final test accuracy.

Writes into --out: results.md and results.csv (one row per dataset, model, algorithm, variant),
acc_*.png (test accuracy vs epoch), align_*.png (per-layer alignment cosine vs step),
feedback_*.png (feedback cosine vs step), grad_error_*.png (relative squared error of each rule's
weight update against the true gradient vs step, every rule) and jacobian_error_*.png (FDFA's
Jacobian estimate against the true Jacobian vs step), one PNG of each kind per (dataset, model)
for which some run logged those metrics. What was
skipped is listed at the end of results.md; the command prints one line counting it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from fdfa.errors import FdfaError, one_line, user_errors
from fdfa.protocol import evaluation_records, mean_ci, select_epoch

# The usual order of the rules in tables and legends; other names follow, sorted.
ALGORITHM_ORDER = ["bp", "dfa", "dkp", "fdfa", "fg_w", "fg_a"]

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

# Per-layer metrics plotted against the step: file prefix, record key ({} is the layer name),
# title, y label, log scale. The two errors measure different things and get their own figures.
LAYER_PLOTS = [
    ("align", "align/{}/cos", "alignment with BP", "cosine(update, BP gradient)", False),
    ("feedback", "feedback/{}/cos", "feedback vs true Jacobian", "cosine", False),
    (
        "grad_error",
        "estimator/{}/grad_rel_mse",
        "weight-update error vs the true gradient (every rule)",
        "|update - dL/dW|² / |dL/dW|²",
        True,
    ),
    (
        "jacobian_error",
        "estimator/{}/jacobian_rel_mse",
        "FDFA's Jacobian estimate Ĵ vs the true Jacobian J",
        "|Ĵ - J|² / |J|²",
        True,
    ),
]


def key_pattern(key_fmt: str) -> re.Pattern:
    """The regex of a per-layer key: "align/{}/cos" -> ^align/(.+)/cos$ (group 1: the layer)."""
    return re.compile("^" + re.escape(key_fmt).replace(r"\{\}", "(.+)") + "$")


ALIGN_KEY = key_pattern("align/{}/cos")


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
        return epochs if _integer(epochs) and epochs > 0 else self.evaluations()[-1]["epoch"]

    def evaluations(self) -> list[dict]:
        return [
            r for r in evaluation_records(self.records) if "epoch" in r and _number(r["test/acc"])
        ]

    def final_acc(self) -> float:
        return _first_number(self.summary.get("test/acc"), self.evaluations()[-1]["test/acc"])

    def selection(self) -> dict:
        """best/val/acc, best/epoch and selected/test/acc, from the records (runs written before
        summary.json had them are read the same way)."""
        return select_epoch(self.evaluations())

    def selected_acc(self) -> float:
        return self.selection()["selected/test/acc"]

    def epoch_seconds(self) -> tuple[float | None, str]:
        """Seconds per epoch and how they were found (records' time_s, else summary's wall_s)."""
        timed = [r for r in self.evaluations() if _number(r.get("time_s"))]
        if timed:
            return timed[-1]["time_s"] / timed[-1]["epoch"], "time_s"
        wall, epochs = self.summary.get("wall_s"), self.summary.get("epochs")
        if _number(wall) and _number(epochs) and epochs > 0:
            return wall / epochs, "wall_s"
        return None, "none"

    def final_alignment(self) -> float | None:
        """The last logged align/mean_cos (or the mean of the last per-layer align/*/cos)."""
        for r in reversed(self.records):
            if _number(r.get("align/mean_cos")):
                return r["align/mean_cos"]
            layer_cos = [v for k, v in r.items() if ALIGN_KEY.match(k) and _number(v)]
            if layer_cos:
                return statistics.fmean(layer_cos)
        return None

    def curve(self, key: str, x: str) -> dict[float, float]:
        """{x: value} over the records that have both x and a finite value of key."""
        return {r[x]: r[key] for r in self.records if _number(r.get(x)) and _number(r.get(key))}

    def layers(self, key_fmt: str) -> list[str]:
        """Layer names of the records' keys of the form key_fmt, in the order they first appear."""
        pattern, found = key_pattern(key_fmt), {}
        for r in self.records:
            for k in r:
                m = pattern.match(k)
                if m:
                    found.setdefault(m.group(1), None)
        return list(found)


@dataclass(eq=False)
class Row:
    """Runs of one (dataset, model, algorithm, variant): one table row, one curve per plot."""

    dataset: str
    model: str
    algorithm: str
    variant: str
    runs: list[RunData] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.algorithm} [{self.variant}]" if self.variant else self.algorithm


class Skip(NamedTuple):
    """A run dir or plot left out of the report: what, why, and the kind of reason (counted in
    the command's one-line summary)."""

    what: str
    why: str
    kind: str


class Unusable(FdfaError):
    """A run dir that cannot be compared; ``kind`` is the reason's kind (see Skip)."""

    def __init__(self, why: str, kind: str = "unreadable"):
        super().__init__(why)
        self.kind = kind


@dataclass
class Report:
    rows: list[Row]
    plots: list[Path]
    skipped: list[Skip]  # runs and plots left out
    notes: list[str]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _first_number(*values) -> float:
    return next(v for v in values if _number(v))


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return "null" if v is None else str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _short_path(path) -> str:
    """A path relative to the working directory when it lies under it (shorter lines)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def relevant_config(config: dict) -> dict:
    """A flat config without IGNORED_KEYS and without the keys MATTERS_ONLY_WHEN drops."""
    kept = {k: v for k, v in config.items() if not _ignored(k)}
    return {k: v for k, v in kept.items() if MATTERS_ONLY_WHEN.get(k, lambda c: True)(config)}


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED_KEYS)


# ---------------------------------------------------------------------------------------------
# Finding and reading runs


def find_run_dirs(dirs) -> list[Path]:
    """Every folder in or under dirs that holds summary.json, metrics.jsonl or .hydra/."""
    found = set()
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FdfaError(f"no such directory: {d}; pass the sweep or run dirs of your runs")
        for name in ("summary.json", "metrics.jsonl", ".hydra"):
            found.update(p.parent.resolve() for p in d.rglob(name))
    return sorted(found)


def _read_text(run_dir: Path, name: str) -> str:
    """The text of the file ``name`` (e.g. "summary.json") of a run dir."""
    try:
        return (run_dir / name).read_text()
    except UnicodeDecodeError as err:
        raise Unusable(f"{name} is not text (a bad byte at offset {err.start})") from None
    except OSError as err:
        raise Unusable(f"{name} cannot be read ({err.strerror or err})") from None


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; Unusable names the first line that is not a JSON object, or an
    evaluation record whose epoch or test/acc cannot be right."""
    records = []
    for i, line in enumerate(_read_text(path, "metrics.jsonl").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise Unusable(f"metrics.jsonl line {i} is not valid JSON") from None
        if not isinstance(record, dict):
            raise Unusable(f"metrics.jsonl line {i} is not a JSON object")
        epoch = record.get("epoch")
        if "epoch" in record and not (_integer(epoch) and epoch >= 1):
            raise Unusable(f"metrics.jsonl line {i}: epoch must be an integer >= 1, got {epoch!r}")
        acc = record.get("test/acc")
        if "test/acc" in record and not (_number(acc) and 0 <= acc <= 1 and "epoch" in record):
            raise Unusable(
                f"metrics.jsonl line {i}: test/acc must be a fraction in [0, 1] with an epoch, "
                f"got {acc!r}"
            )
        records.append(record)
    return records


def read_config(path: Path) -> dict | None:
    """The flat .hydra/config.yaml of a run dir (None without one)."""
    config_path = path / ".hydra" / "config.yaml"
    if not config_path.is_file():
        return None
    _read_text(path, ".hydra/config.yaml")  # bad bytes: one clear reason
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    except (yaml.YAMLError, ValueError) as err:
        raise Unusable(f".hydra/config.yaml is not a valid config ({one_line(err, 120)})") from None
    if not isinstance(config, dict):
        raise Unusable(".hydra/config.yaml is not a mapping")
    return _flatten(config)


def unfinished_reason(path: Path, status: str | None, config: dict | None) -> Unusable:
    """Why a run without a completed summary is left out: what its records and checkpoint say."""
    records = read_records(path) if (path / "metrics.jsonl").is_file() else []
    evaluations = [r for r in records if "test/acc" in r]
    target = (config or {}).get("trainer.epochs")
    done = evaluations[-1]["epoch"] if evaluations else 0
    progress = f"{done}{f' of {target}' if _integer(target) else ''} epochs done"
    if records:
        last = ", ".join(f"{k} {records[-1][k]}" for k in ("epoch", "step") if k in records[-1])
        progress += f" (last record: {last})"
    has_ckpt = (path / "last.ckpt").is_file()
    progress += "; last.ckpt " + ("present" if has_ckpt else "absent")
    if status is None and not records and not has_ckpt:
        return Unusable(
            "no summary.json, no records: stopped or failed before its first epoch ended, "
            "or still in it",
            "no records",
        )
    if status is None or status == "interrupted":
        what = "interrupted" if status else "no summary.json: interrupted or still running"
        resume = "; rerun with hydra.run.dir=<this dir> to resume" if has_ckpt else ""
        return Unusable(f"{what}, {progress}{resume}", "interrupted or running")
    return Unusable(
        f"status {status!r}, not 'completed' (only finished runs are compared): {progress}",
        "not completed",
    )


def load_run(path: Path) -> RunData:
    """Read one run dir; raises Unusable saying why when the run cannot be compared."""
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    config = read_config(path)
    if config is None and path.parent.name == "bench":
        raise Unusable("a benchmark run (python -m fdfa.bench), not an experiment", "benchmark run")
    if not summary_path.is_file():
        raise unfinished_reason(path, None, config)
    try:
        summary = json.loads(_read_text(path, "summary.json"))
    except json.JSONDecodeError as err:
        raise Unusable(f"summary.json is not valid JSON ({err})") from None
    if not isinstance(summary, dict):
        raise Unusable(f"summary.json is not a JSON object (it is {type(summary).__name__})")
    status = summary.get("status")
    if status != "completed":
        raise unfinished_reason(path, status, config)
    missing = [k for k in ("dataset", "model", "algorithm") if not summary.get(k)]
    if missing:
        raise Unusable(f"summary.json lacks {', '.join(missing)}")
    bad = [k for k in ("dataset", "model", "algorithm") if not isinstance(summary[k], str)]
    if bad:
        raise Unusable(f"summary.json's {', '.join(bad)} must be text")
    if not metrics_path.is_file():
        raise Unusable("no metrics.jsonl", "no records")
    run = RunData(path, summary, read_records(path), config)
    if run.seed is not None and not _integer(run.seed):
        raise Unusable(f"seed must be an integer, got {run.seed!r}")
    if not run.evaluations():
        raise Unusable(
            "metrics.jsonl has no evaluation record (one with epoch and test/acc)", "no records"
        )
    try:  # every number the table reads: a run that breaks one is skipped, not the report
        run.selection(), run.final_acc(), run.epoch_seconds(), run.final_alignment()
    except (TypeError, ValueError, KeyError, StopIteration) as err:
        raise Unusable(f"its records cannot be compared ({type(err).__name__}: {err})") from None
    return run


def collect_runs(dirs) -> tuple[list[RunData], list[Skip]]:
    """Usable runs under dirs (reruns counted once), and a Skip for every run dir left out."""
    runs, skipped = [], []
    for path in find_run_dirs(dirs):
        try:
            runs.append(load_run(path))
        except Unusable as err:
            skipped.append(Skip(_short_path(path), str(err), err.kind))
    kept, duplicates = drop_reruns(runs)
    return kept, skipped + duplicates


def drop_reruns(runs: list[RunData]) -> tuple[list[RunData], list[Skip]]:
    """One run per (config, seed): the one that finished last; a Skip for each of the others.
    Runs without a seed are all kept (nothing says they repeat each other)."""
    latest, skipped = {}, []
    for run in sorted(runs, key=RunData.finished_at, reverse=True):
        key = run.identity() if run.seed is not None else id(run)
        if key not in latest:
            latest[key] = run
            continue
        kept = _short_path(latest[key].path)
        why = f"same config and seed {run.seed} as {kept}, which finished later: counted once"
        skipped.append(Skip(_short_path(run.path), why, "rerun of the same seed"))
    kept_runs = set(map(id, latest.values()))
    return [r for r in runs if id(r) in kept_runs], skipped


# ---------------------------------------------------------------------------------------------
# Grouping runs into rows


def _differing_keys(configs: list[dict]) -> set[str]:
    """Keys whose value (or presence) is not the same in all of ``configs`` (relevant ones)."""
    keys = set().union(*configs) if configs else set()
    return {k for k in keys if len({repr(c.get(k, "<unset>")) for c in configs}) > 1}


def _describe(config: dict, keys, strip: str = "") -> str:
    """``k=v, ...`` for the keys this config has (a key its rule ignores is not in it)."""
    shown = sorted(k for k in keys if k in config)
    return ", ".join(f"{k.removeprefix(strip)}={_fmt_value(config[k])}" for k in shown)


def group_rows(runs: list[RunData]) -> list[Row]:
    """One Row per (dataset, model, algorithm) and config variant, in table order: the labels
    show the relevant keys whose values differ between runs of the same dataset and model."""
    by_model, by_algorithm = {}, {}
    for run in runs:
        if run.config is not None:
            dataset, model, algorithm = run.names
            by_model.setdefault((dataset, model), []).append(run.relevant)
            by_algorithm.setdefault(run.names, []).append(run.relevant)
    rows = {}
    for run in runs:
        dataset, model, algorithm = run.names
        variant = ""
        if run.config is not None:
            config = run.relevant
            model_wide = _differing_keys(by_model[dataset, model])
            model_keys = {k for k in model_wide if k.startswith("model.")}
            other_keys = {k for k in model_wide if not k.startswith(("model.", "algorithm."))}
            algo_keys = {
                k for k in _differing_keys(by_algorithm[run.names]) if k.startswith("algorithm.")
            }
            if model_keys:
                model += f" ({_describe(config, model_keys, 'model.')})"
            if algo_keys:
                algorithm += f" ({_describe(config, algo_keys, 'algorithm.')})"
            variant = _describe(config, other_keys)
        key = (dataset, model, algorithm, variant)
        rows.setdefault(key, Row(*key)).runs.append(run)

    def order(row: Row):
        name = row.runs[0].names[2]
        rank = ALGORITHM_ORDER.index(name) if name in ALGORITHM_ORDER else len(ALGORITHM_ORDER)
        return row.dataset, row.model, rank, row.algorithm, row.variant

    return sorted(rows.values(), key=order)


# ---------------------------------------------------------------------------------------------
# The table


def _by_seed(row: Row) -> dict:
    """seed -> selected test accuracy of a row's runs (runs without a seed left out)."""
    return {r.seed: r.selected_acc() for r in row.runs if r.seed is not None}


def baseline_row(row: Row, rows: list[Row]) -> Row | None:
    """The BP row to pair ``row`` with: same dataset and model, the same variant if several."""
    bp = [r for r in rows if (r.dataset, r.model) == (row.dataset, row.model)]
    bp = [r for r in bp if r.runs[0].names[2] == "bp" and r is not row]
    if len(bp) > 1:
        bp = [r for r in bp if r.variant == row.variant]
    return bp[0] if len(bp) == 1 and row.runs[0].names[2] != "bp" else None


def row_stats(row: Row, rows: list[Row] = ()) -> dict:
    """The numbers of one table row (accuracies as fractions, as in summary.json)."""
    selected_mean, selected_ci = mean_ci([r.selected_acc() for r in row.runs])
    final_mean, final_ci = mean_ci([r.final_acc() for r in row.runs])
    vals = [v for r in row.runs if (v := r.selection()["best/val/acc"]) is not None]
    diff_mean = diff_ci = None
    pairs = 0
    base = baseline_row(row, list(rows))
    if base is not None:
        mine, theirs = _by_seed(row), _by_seed(base)
        diffs = [mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs), key=str)]
        pairs = len(diffs)
        if diffs:
            diff_mean, diff_ci = mean_ci(diffs)
    epochs = sorted({r.epochs_done() for r in row.runs})
    times = [t for t, _ in map(RunData.epoch_seconds, row.runs) if t is not None]
    aligns = [a for a in map(RunData.final_alignment, row.runs) if a is not None]
    seeds = sorted((r.seed for r in row.runs), key=lambda s: (s is None, s or 0))  # int or None
    return {
        "dataset": row.dataset,
        "model": row.model,
        "algorithm": row.algorithm,
        "variant": row.variant,
        "n_runs": len(row.runs),
        "seeds": " ".join(_fmt_value(s) for s in seeds),
        "selected_test_acc_mean": selected_mean,  # test acc at each run's best-val epoch
        "selected_test_acc_ci95": selected_ci,  # half-width of the 95 % Student-t interval
        "diff_to_bp_mean": diff_mean,  # paired by seed: this rule minus BP
        "diff_to_bp_ci95": diff_ci,
        "diff_to_bp_pairs": pairs,
        "best_val_acc_mean": statistics.fmean(vals) if vals else None,
        "final_test_acc_mean": final_mean,
        "final_test_acc_ci95": final_ci,
        # optimistic: the max over epochs is picked on the test set itself
        "max_test_acc_optimistic_mean": statistics.fmean(
            max(e["test/acc"] for e in r.evaluations()) for r in row.runs
        ),
        "epochs": str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
        "time_per_epoch_s": statistics.fmean(times) if times else None,
        "align_mean_cos": statistics.fmean(aligns) if aligns else None,
        "run_dirs": " ".join(str(r.path) for r in row.runs),
    }


def _pct(mean: float | None, ci: float | None = None, signed: bool = False) -> str:
    if mean is None:
        return "—"
    text = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    return text + ("" if ci is None else f" ± {100 * ci:.2f}")


def write_csv(stats: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(stats[0]))
        writer.writeheader()
        for s in stats:
            writer.writerow({k: "" if v is None else v for k, v in s.items()})


TABLE_COLUMNS = [
    "seeds",
    "test acc at best-val epoch (%), mean ± 95% CI",
    "Δ vs BP (points), paired by seed, mean ± 95% CI",
    "best val acc (%)",
    "final test acc (%), mean ± 95% CI",
    "epochs",
    "s / epoch",
    "align cos",
]


def markdown_table(stats: list[dict]) -> str:
    keys = ["dataset", "model", "algorithm"] + (
        ["variant"] if any(s["variant"] for s in stats) else []
    )
    head = keys + TABLE_COLUMNS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        diff = _pct(s["diff_to_bp_mean"], s["diff_to_bp_ci95"], signed=True)
        cells = [s[k] for k in keys] + [
            s["seeds"],
            _pct(s["selected_test_acc_mean"], s["selected_test_acc_ci95"]),
            diff if s["diff_to_bp_pairs"] else "—",
            _pct(s["best_val_acc_mean"]),
            _pct(s["final_test_acc_mean"], s["final_test_acc_ci95"]),
            s["epochs"],
            "—" if s["time_per_epoch_s"] is None else f"{s['time_per_epoch_s']:.3g}",
            "—" if s["align_mean_cos"] is None else f"{s['align_mean_cos']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The plots


def _mean_band(curves: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, mean and sample std over the curves that have each x (std 0 where only one has it)."""
    xs = sorted(set().union(*curves))
    values = [[c[x] for c in curves if x in c] for x in xs]
    std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
    return np.array(xs), np.array([np.mean(v) for v in values]), np.array(std)


def _plot_band(ax, curves, label, scale: float = 1.0) -> None:
    x, mean, std = _mean_band(curves)
    (line,) = ax.plot(x, mean * scale, label=label, marker="." if len(x) < 30 else None)
    if len(curves) > 1:
        ax.fill_between(
            x, (mean - std) * scale, (mean + std) * scale, alpha=0.2, lw=0, color=line.get_color()
        )


LEGEND_WRAP = 70  # characters per legend line; longer labels wrap


def _plain_y(ax) -> None:
    """y tick labels without an offset ("1e-12+1"): a flat curve gets a small span around it."""
    if ax.get_yscale() != "linear":
        return
    lo, hi = ax.get_ylim()
    if hi - lo < 1e-6 * max(1.0, abs(hi)):
        pad = 0.05 * max(1.0, abs(hi))
        ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False)


def plot_accuracy(rows: list[Row], title: str, path: Path) -> Figure:
    """Test accuracy against epoch, one curve per row; the legend goes below the axes and the
    figure grows with it, so no number of rows or length of label squeezes the plot."""
    labels = [textwrap.fill(row.label, LEGEND_WRAP, subsequent_indent="  ") for row in rows]
    legend_lines = sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(6.4, 4.2 + 0.19 * legend_lines + 0.2), layout="constrained")
    ax = fig.add_subplot()
    for row, label in zip(rows, labels):
        _plot_band(ax, [r.curve("test/acc", "epoch") for r in row.runs], label, scale=100)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: mean ± std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no epoch 1.5
    _plain_y(ax)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    fig.savefig(path, dpi=110)
    return fig


def plot_layers(
    rows: list[Row], key_fmt: str, title: str, ylabel: str, path: Path, log=False
) -> Figure:
    """One panel per row, one line (mean over seeds, band ± std) per layer, against the step."""
    ncols = min(3, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, row in zip(axes, rows):
        layers = list(dict.fromkeys(name for r in row.runs for name in r.layers(key_fmt)))
        for layer in layers:
            curves = [c for r in row.runs if (c := r.curve(key_fmt.format(layer), "step"))]
            if curves:
                _plot_band(ax, curves, layer)
        if log and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        _plain_y(ax)
        ax.set(xlabel="step", ylabel=ylabel, title=textwrap.fill(row.label, 45))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return fig


def make_plots(rows: list[Row], out: Path) -> tuple[list[Path], list[Skip]]:
    """All plots of every (dataset, model); returns the PNGs and a Skip for each left out."""
    plots, skipped = [], []
    panels = {}
    for row in rows:
        panels.setdefault((row.dataset, row.model), []).append(row)
    for (dataset, model), group in panels.items():
        title = f"{dataset} / {model}"
        path = out / f"acc_{_slug(dataset)}_{_slug(model)}.png"
        plot_accuracy(group, title, path)
        plots.append(path)
        for prefix, key_fmt, what, ylabel, log in LAYER_PLOTS:
            key = key_fmt.format("<layer>")
            with_data = [row for row in group if any(r.layers(key_fmt) for r in row.runs)]
            name = f"{prefix}_{_slug(dataset)}_{_slug(model)}.png"
            if not with_data:
                skipped.append(Skip(name, f"no run of {title} logged {key}", "plot not drawn"))
                continue
            without = [row for row in group if row not in with_data]
            if without:
                rules = ", ".join(dict.fromkeys(row.runs[0].names[2] for row in without))
                why = f"{len(without)} of {len(group)} rows logged no {key} ({rules})"
                skipped.append(Skip(name, why, "plot missing some rows"))
            path = out / name
            plot_layers(with_data, key_fmt, f"{title}: {what}", ylabel, path, log)
            plots.append(path)
    return plots, skipped


# ---------------------------------------------------------------------------------------------
# The whole report


NOTES = [
    "test acc at best-val epoch: for each run, the test accuracy at the epoch of its best "
    "validation accuracy (the first on ties; the last epoch for runs without a validation set), "
    "then the mean over seeds ± the half-width of the 95 % Student-t confidence interval "
    "(t_{0.975, n-1} s / sqrt(n)); no ± for a single run.",
    "Δ vs BP: this row's selected test accuracy minus BP's on the same seeds (same dataset and "
    "model), mean ± 95 % CI of the paired differences; — where no BP run shares a seed.",
    "best val acc: mean over seeds of each run's best validation accuracy (— without one). "
    "final test acc: the last epoch's, mean ± 95 % CI. The max of test accuracy over epochs is "
    "in results.csv only (max_test_acc_optimistic_mean): it is chosen on the test set itself.",
    "s / epoch: time_s of a run's last evaluation record divided by its epoch (training plus "
    "evaluation, from the start of training), mean over seeds; summary.json's wall_s / epochs "
    "for runs whose records lack time_s.",
    "align cos: each run's last logged align/mean_cos (the mean over blocks of the cosine "
    "between the rule's update of W_l and the true gradient dL/dW_l), mean over seeds; — where "
    "not logged.",
    "Plots: mean over seeds, band ± sample std over seeds.",
]


def make_report(dirs, out: str | Path) -> Report:
    """Read every run under dirs and write results.md, results.csv and the PNGs into out."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FdfaError(f"--out {out} is a file; give a directory (it is created if missing)")
    runs, skipped = collect_runs(dirs)
    if not runs:
        found = "no run dirs found"
        if skipped:
            first = skipped[0].why if len(skipped[0].why) <= 120 else skipped[0].why[:117] + "..."
            found = f"skipped {skip_summary(skipped)}; first: {skipped[0].what}: {first}"
        raise FdfaError(
            f"no completed run under {', '.join(map(str, dirs))} ({found}); "
            "pass the sweep or run dirs that hold summary.json and metrics.jsonl"
        )
    notes = list(NOTES)
    reruns = sum(s.kind == "rerun of the same seed" for s in skipped)
    if reruns:
        notes.append(
            f"{reruns} run(s) repeat the config and seed of another run: each (config, seed) is "
            "counted once, the run that finished last (the others are listed under Skipped)."
        )
    no_config = [str(r.path) for r in runs if r.config is None]
    if no_config:
        notes.append(
            f"{len(no_config)} run(s) have no .hydra/config.yaml; they are grouped by the names "
            "in their summary.json only."
        )
    wall_timed = [str(r.path) for r in runs if r.epoch_seconds()[1] != "time_s"]
    if wall_timed:
        notes.append(f"s / epoch from wall_s / epochs for: {', '.join(wall_timed)}.")
    rows = group_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    stats = [row_stats(row, rows) for row in rows]
    write_csv(stats, out / "results.csv")
    plots, skipped_plots = make_plots(rows, out)
    skipped += skipped_plots
    lines = [
        "# Results",
        "",
        f"{len(runs)} completed runs in {len(rows)} rows, from {', '.join(map(str, dirs))}"
        + (f"; {len(skipped)} items skipped (listed below)." if skipped else "."),
        "",
        markdown_table(stats),
        "",
        *[f"- {n}" for n in notes],
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
    ]
    if skipped:
        lines += ["", "## Skipped"]
        for kind, items in _by_kind(skipped).items():
            lines += ["", f"### {kind} ({len(items)})", ""]
            lines += [f"- {item.what}: {item.why}" for item in items]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return Report(rows, plots, skipped, notes)


def _by_kind(skipped: list[Skip]) -> dict[str, list[Skip]]:
    kinds = {}
    for item in skipped:
        kinds.setdefault(item.kind, []).append(item)
    return kinds


def skip_summary(skipped: list[Skip]) -> str:
    """'5 items: 2 interrupted or running, 3 plot' (how many of each kind of reason)."""
    counts = ", ".join(f"{len(items)} {kind}" for kind, items in _by_kind(skipped).items())
    return f"{len(skipped)} item{'s' if len(skipped) > 1 else ''}: {counts}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdfa.report",
        description="Compare finished runs: results.md, results.csv and PNG plots.",
    )
    parser.add_argument("dirs", nargs="+", help="sweep or run dirs (searched recursively)")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    with user_errors(exit=False) as errors:
        report = make_report(args.dirs, args.out)
    if errors.exit_code:
        return errors.exit_code
    n_runs = sum(len(row.runs) for row in report.rows)
    print(
        f"{n_runs} runs in {len(report.rows)} rows -> {Path(args.out) / 'results.md'}, "
        f"results.csv and {len(report.plots)} PNG plots"
    )
    if report.skipped:
        print(f"skipped {skip_summary(report.skipped)} (each with why: end of results.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
