"""Compare finished runs offline: one table (Markdown and CSV) and PNG plots, from the run dirs.

    python -m fdfa.report multirun/mnist_fc2/2025-01-01_12-00-00 --out report/
    python -m fdfa.report outputs/ multirun/ --out report/      # any mix of sweeps and single runs

Every folder under the given dirs that holds summary.json, metrics.jsonl or .hydra/ is a run. A
run is used if its summary.json says status "completed" and its metrics.jsonl has at least one
evaluation record (one with epoch and test/acc); every other one is listed as skipped, with why.

Runs are grouped into rows by the (dataset, model, algorithm) names of their summary.json. When
runs of a row differ in their config (.hydra/config.yaml) in anything but the seed and where they
ran, they are split and the differing keys are added to the label: model.* keys to the model
(``fc (n_layers=3)``), algorithm.* keys to the algorithm, any other key to the variant column.

Each row gives, over its seeds, the test accuracy at each run's best-validation epoch (the
protocol: chosen on validation data, test set read there) as mean ± 95 % Student-t interval, the
paired difference to BP on the same seeds, the best validation and the final test accuracy.

Writes into --out: results.md and results.csv (one row per dataset, model, algorithm, variant),
acc_*.png (test accuracy vs epoch), align_*.png (per-layer alignment cosine vs step),
feedback_*.png (feedback cosine vs step), grad_error_*.png (relative squared error of each rule's
weight update against the true gradient vs step, every rule) and jacobian_error_*.png (FDFA's
Jacobian estimate against the true Jacobian vs step), one PNG of each kind per (dataset, model)
for which some run logged those metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from fdfa.errors import FdfaError
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
    "logger",
    "metrics",
    "wandb",
    "hydra",
)

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


@dataclass
class Report:
    rows: list[Row]
    plots: list[Path]
    skipped: list[tuple[str, str]]  # (what, why): runs and plots left out
    notes: list[str]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


def load_run(path: Path) -> RunData:
    """Read one run dir; raises FdfaError saying why when the run cannot be compared."""
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    if not summary_path.is_file():
        raise FdfaError("no summary.json (the run failed before training, or is still running)")
    try:
        summary = json.loads(summary_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FdfaError(f"summary.json is not valid JSON ({err})") from None
    status = summary.get("status")
    if status != "completed":
        raise FdfaError(f"status is {status!r}, not 'completed' (only finished runs are compared)")
    missing = [k for k in ("dataset", "model", "algorithm") if not summary.get(k)]
    if missing:
        raise FdfaError(f"summary.json lacks {', '.join(missing)}")
    if not metrics_path.is_file():
        raise FdfaError("no metrics.jsonl")
    records = []
    for i, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise FdfaError(f"metrics.jsonl line {i} is not valid JSON") from None
    config = None
    config_path = path / ".hydra" / "config.yaml"
    if config_path.is_file():
        try:
            config = _flatten(OmegaConf.to_container(OmegaConf.load(config_path), resolve=False))
        except (yaml.YAMLError, ValueError) as err:
            raise FdfaError(f".hydra/config.yaml is not a valid config ({err})") from None
    run = RunData(path, summary, records, config)
    if not run.evaluations():
        raise FdfaError("metrics.jsonl has no evaluation record (one with epoch and test/acc)")
    return run


def collect_runs(dirs) -> tuple[list[RunData], list[tuple[str, str]]]:
    """Usable runs under dirs, and (run dir, reason) for every run dir left out."""
    runs, skipped = [], []
    for path in find_run_dirs(dirs):
        try:
            runs.append(load_run(path))
        except FdfaError as err:
            skipped.append((str(path), str(err)))
    return runs, skipped


# ---------------------------------------------------------------------------------------------
# Grouping runs into rows


def _differing_keys(configs: list[dict]) -> set[str]:
    keys = set().union(*configs) if configs else set()
    keys = {k for k in keys if not any(k == p or k.startswith(p + ".") for p in IGNORED_KEYS)}
    return {k for k in keys if len({repr(c.get(k, "<unset>")) for c in configs}) > 1}


def _describe(config: dict, keys, strip: str = "") -> str:
    return ", ".join(f"{k.removeprefix(strip)}={_fmt_value(config.get(k))}" for k in sorted(keys))


def group_rows(runs: list[RunData]) -> list[Row]:
    """One Row per (dataset, model, algorithm) and config variant, in table order."""
    by_model, by_algorithm = {}, {}
    for run in runs:
        if run.config is not None:
            dataset, model, algorithm = run.names
            by_model.setdefault((dataset, model), []).append(run.config)
            by_algorithm.setdefault(run.names, []).append(run.config)
    rows = {}
    for run in runs:
        dataset, model, algorithm = run.names
        variant = ""
        if run.config is not None:
            model_wide = _differing_keys(by_model[dataset, model])
            model_keys = {k for k in model_wide if k.startswith("model.")}
            other_keys = {k for k in model_wide if not k.startswith(("model.", "algorithm."))}
            algo_keys = {
                k for k in _differing_keys(by_algorithm[run.names]) if k.startswith("algorithm.")
            }
            if model_keys:
                model += f" ({_describe(run.config, model_keys, 'model.')})"
            if algo_keys:
                algorithm += f" ({_describe(run.config, algo_keys, 'algorithm.')})"
            variant = _describe(run.config, other_keys)
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
    epochs = sorted({r.summary.get("epochs") or r.evaluations()[-1]["epoch"] for r in row.runs})
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
        ax.fill_between(x, (mean - std) * scale, (mean + std) * scale, alpha=0.2, lw=0,
                        color=line.get_color())  # fmt: skip


def plot_accuracy(rows: list[Row], title: str, path: Path) -> None:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for row in rows:
        _plot_band(ax, [r.curve("test/acc", "epoch") for r in row.runs], row.label, scale=100)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title}: mean ± std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)


def plot_layers(rows: list[Row], key_fmt: str, title: str, ylabel: str, path: Path, log=False):
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
        ax.set(xlabel="step", ylabel=ylabel, title=row.label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def make_plots(rows: list[Row], out: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """All plots of every (dataset, model); returns the PNGs and (plot, why) for those left out."""
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
                skipped.append((name, f"no run of {title} logged {key}"))
                continue
            without = [row.label for row in group if row not in with_data]
            if without:
                skipped.append((f"{name}, {', '.join(without)}", f"those runs logged no {key}"))
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
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped[:5]) or "no run dirs found"
        raise FdfaError(
            f"no completed run under {', '.join(map(str, dirs))} ({reasons}); "
            "pass the sweep or run dirs that hold summary.json and metrics.jsonl"
        )
    notes = list(NOTES)
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
        lines += ["", "## Skipped", "", *[f"- {what}: {why}" for what, why in skipped]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return Report(rows, plots, skipped, notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdfa.report",
        description="Compare finished runs: results.md, results.csv and PNG plots.",
    )
    parser.add_argument("dirs", nargs="+", help="sweep or run dirs (searched recursively)")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    try:
        report = make_report(args.dirs, args.out)
    except FdfaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_runs = sum(len(row.runs) for row in report.rows)
    print(f"{n_runs} runs in {len(report.rows)} rows -> {Path(args.out) / 'results.md'}, "
          f"results.csv and {len(report.plots)} PNG plots")  # fmt: skip
    for what, why in report.skipped:
        print(f"skipped {what}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
