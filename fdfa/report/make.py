"""The whole report: read the runs, group them, write the tables and the plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fdfa.errors import FdfaError
from fdfa.report.group import Row, group_rows
from fdfa.report.load import Skip, collect_runs
from fdfa.report.plots import make_plots
from fdfa.report.rundata import RunData
from fdfa.report.stats import row_stats
from fdfa.report.tables import NOTES, skip_summary, unpaired_notes, write_csv, write_results_md
from fdfa.report.values import fmt_value


@dataclass
class Report:
    rows: list[Row]
    plots: list[Path]
    skipped: list[Skip]  # runs and plots left out
    notes: list[str]


def make_report(dirs, out: str | Path, tuned: dict | None = None) -> Report:
    """Read every run under dirs and write results.md, results.csv and the PNGs into out.
    ``tuned`` (a benchmark's): {dir: {"params": {key: value}, "trials": text}}: the runs under
    each dir ran with params a search chose for their rule; their row shows them and the trials
    it took, and those keys are the rule's own options (they neither split rows nor keep a rule
    from its pairing with BP)."""
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
    notes = run_notes(runs, skipped)
    tuned = {Path(d).resolve(): info for d, info in (tuned or {}).items()}
    tuned_keys = {k for info in tuned.values() for k in info["params"]}
    rows = group_rows(runs, tuned_keys)
    out.mkdir(parents=True, exist_ok=True)
    stats = [row_stats(row, rows, tuned_keys) for row in rows]
    if tuned:
        for row, s in zip(rows, stats):
            where = row.runs[0].path.resolve().parents
            info = next((i for d, i in tuned.items() if d in where), {})
            params = info.get("params", {})
            s["chosen_params"] = " ".join(f"{k}={fmt_value(v)}" for k, v in params.items())
            s["trials"] = info.get("trials", "")
    notes += unpaired_notes(stats)
    write_csv(stats, out / "results.csv")
    plots, skipped_plots = make_plots(rows, out)
    skipped += skipped_plots
    summary = f"{len(runs)} completed runs in {len(rows)} rows, from {', '.join(map(str, dirs))}"
    write_results_md(out / "results.md", summary, stats, notes, plots, skipped)
    return Report(rows, plots, skipped, notes)


def run_notes(runs: list[RunData], skipped: list[Skip]) -> list[str]:
    """The notes under the table: NOTES, then what this set of runs needs said."""
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
    return notes
