"""The written results: results.csv, the Markdown table, the notes under it and results.md."""

from __future__ import annotations

import csv
from pathlib import Path

from fdfa.report.load import Skip


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
    tuned = ["chosen_params", "trials"] if any("chosen_params" in s for s in stats) else []
    head = keys + [k.replace("_", " ") for k in tuned] + TABLE_COLUMNS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        diff = _pct(s["diff_to_bp_mean"], s["diff_to_bp_ci95"], signed=True)
        cells = (
            [s[k] for k in keys]
            + [s[k] or "—" for k in tuned]
            + [
                s["seeds"],
                _pct(s["selected_test_acc_mean"], s["selected_test_acc_ci95"]),
                diff if s["diff_to_bp_pairs"] else "—",
                _pct(s["best_val_acc_mean"]),
                _pct(s["final_test_acc_mean"], s["final_test_acc_ci95"]),
                s["epochs"],
                "—" if s["time_per_epoch_s"] is None else f"{s['time_per_epoch_s']:.3g}",
                "—" if s["align_mean_cos"] is None else f"{s['align_mean_cos']:.3f}",
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = [
    "test acc at best-val epoch: for each run, the test accuracy at the epoch of its best "
    "validation accuracy (the first on ties; the last epoch for runs without a validation set), "
    "then the mean over seeds ± the half-width of the 95 % Student-t confidence interval "
    "(t_{0.975, n-1} s / sqrt(n)); no ± for a single run.",
    "Δ vs BP: this row's selected test accuracy minus BP's on the same seeds, mean ± 95 % CI of "
    "the paired differences, against the BP runs whose settings agree in everything but the rule "
    "and its own options (algorithm.*, and an optimizer key the rule's own preset sets, e.g. "
    "FG-W's lr); — where there is none (why: below).",
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


def unpaired_notes(stats: list[dict]) -> list[str]:
    """One note per (dataset, model, reason) saying which rows have no Δ vs BP and why."""
    rows_by_why = {}
    for s in stats:
        if s["diff_to_bp_unpaired_why"]:
            key = (s["dataset"], s["model"], s["diff_to_bp_unpaired_why"])
            label = s["algorithm"] + (f" [{s['variant']}]" if s["variant"] else "")
            rows_by_why.setdefault(key, []).append(label)
    return [
        f"Δ vs BP empty for {', '.join(labels)} ({dataset} / {model}): {why}."
        for (dataset, model, why), labels in rows_by_why.items()
    ]


def _by_kind(skipped: list[Skip]) -> dict[str, list[Skip]]:
    kinds = {}
    for item in skipped:
        kinds.setdefault(item.kind, []).append(item)
    return kinds


def skip_summary(skipped: list[Skip]) -> str:
    """'5 items: 2 interrupted or running, 3 plot' (how many of each kind of reason)."""
    counts = ", ".join(f"{len(items)} {kind}" for kind, items in _by_kind(skipped).items())
    return f"{len(skipped)} item{'s' if len(skipped) > 1 else ''}: {counts}"


def write_results_md(
    path: Path, summary: str, stats: list[dict], notes: list[str], plots: list[Path], skipped
) -> None:
    """results.md: ``summary`` (what was read), the table, the notes, the plots, the skipped."""
    lines = [
        "# Results",
        "",
        summary + (f"; {len(skipped)} items skipped (listed below)." if skipped else "."),
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
    path.write_text("\n".join(lines) + "\n")
