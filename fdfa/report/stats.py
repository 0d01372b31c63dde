"""The numbers of one table row: selected test accuracy over seeds, the paired difference to the
BP row of the same settings (baseline_row), best validation, final accuracy, time, alignment."""

from __future__ import annotations

import statistics

from omegaconf import OmegaConf

from fdfa.protocol import mean_ci
from fdfa.report.group import Row
from fdfa.report.rundata import RunData
from fdfa.report.values import fmt_value
from fdfa.validate import CONF_DIR


def _by_seed(row: Row) -> dict:
    """seed -> selected test accuracy of a row's runs (runs without a seed left out)."""
    return {r.seed: r.selected_acc() for r in row.runs if r.seed is not None}


def own_options(algorithm: str) -> set[str]:
    """The optimizer keys a rule sets itself (conf/algorithm/optimizer/<algorithm>_<optimizer>.yaml,
    e.g. FG-W's lr): like algorithm.*, they are the rule's own options, not the experiment's."""
    keys = set()
    for preset in (CONF_DIR / "algorithm" / "optimizer").glob(f"{algorithm}_*.yaml"):
        keys |= {f"optimizer.{k}" for k in (OmegaConf.load(preset) or {})}
    return keys


def setting_differences(run: RunData, base: RunData, tuned_keys=frozenset()) -> list[str]:
    """The relevant keys in which two runs differ, except the rules' own options (algorithm.*,
    own_options, and ``tuned_keys``: what each rule's own search chose): runs without any are the
    same experiment with another rule."""
    own = own_options(run.names[2]) | own_options(base.names[2]) | set(tuned_keys)
    a, b = run.relevant, base.relevant
    keys = {k for k in set(a) | set(b) if not k.startswith("algorithm.") and k not in own}
    return sorted(k for k in keys if repr(a.get(k, "<unset>")) != repr(b.get(k, "<unset>")))


def baseline_row(
    row: Row, rows: list[Row], tuned_keys=frozenset()
) -> tuple[Row | None, str | None]:
    """The BP row to pair ``row`` with: same dataset and model names, and settings that agree in
    all but the rule and its own options (setting_differences); else None and why not."""
    name = row.runs[0].names[2]
    if name == "bp":
        return None, None
    bp = [r for r in rows if r.runs[0].names == (*row.runs[0].names[:2], "bp")]
    if not bp:
        return None, f"no BP run of {row.dataset} / {row.runs[0].names[1]}"
    if row.runs[0].config is None or any(r.runs[0].config is None for r in bp):
        return None, "a run without .hydra/config.yaml: its settings cannot be checked against BP's"
    diffs = {id(r): setting_differences(row.runs[0], r.runs[0], tuned_keys) for r in bp}
    same = [r for r in bp if not diffs[id(r)]]
    if len(same) == 1:
        return same[0], None
    nearest = min(bp, key=lambda r: len(diffs[id(r)]))
    mine, theirs = row.runs[0].relevant, nearest.runs[0].relevant
    shown = [
        f"{k} ({fmt_value(mine.get(k, '<unset>'))} here, {fmt_value(theirs.get(k, '<unset>'))}"
        " in BP)"
        for k in diffs[id(nearest)][:3]
    ]
    more = len(diffs[id(nearest)]) - len(shown)
    return None, "no BP run with the same settings: BP's differ in " + ", ".join(shown) + (
        f" and {more} more key(s)" if more > 0 else ""
    )


def row_stats(row: Row, rows: list[Row] = (), tuned_keys=frozenset()) -> dict:
    """The numbers of one table row (accuracies as fractions, as in summary.json)."""
    selected_mean, selected_ci = mean_ci([r.selected_acc() for r in row.runs])
    final_mean, final_ci = mean_ci([r.final_acc() for r in row.runs])
    vals = [v for r in row.runs if (v := r.selection()["best/val/acc"]) is not None]
    diff_mean = diff_ci = None
    pairs = 0
    base, unpaired = baseline_row(row, list(rows), tuned_keys)
    if base is not None:
        mine, theirs = _by_seed(row), _by_seed(base)
        diffs = [mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs), key=str)]
        pairs = len(diffs)
        if diffs:
            diff_mean, diff_ci = mean_ci(diffs)
        else:
            unpaired = "no seed in common with BP's runs"
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
        "seeds": " ".join(fmt_value(s) for s in seeds),
        "selected_test_acc_mean": selected_mean,  # test acc at each run's best-val epoch
        "selected_test_acc_ci95": selected_ci,  # half-width of the 95 % Student-t interval
        "diff_to_bp_mean": diff_mean,  # paired by seed: this rule minus BP
        "diff_to_bp_ci95": diff_ci,
        "diff_to_bp_pairs": pairs,
        "diff_to_bp_unpaired_why": unpaired,  # None where paired (or for BP itself)
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
