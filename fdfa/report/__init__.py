"""Compare finished runs offline: one table (Markdown and CSV) and PNG plots, from the run dirs.

    python -m fdfa.report multirun/mnist_fc2/2025-01-01_12-00-00 --out report/
    python -m fdfa.report outputs/ multirun/ --out report/      # any mix of sweeps and single runs

Every folder under the given dirs that holds summary.json, metrics.jsonl or .hydra/ is a run. A
run is used if its summary.json says status "completed" and its metrics.jsonl has at least one
evaluation record (one with epoch and test/acc); every other one is listed as skipped, with why:
a run killed or still running says how many epochs its records and last.ckpt hold (or, when
``trainer.resume=latest`` continued it in a new run dir that finished, that it was resumed there),
a run dir with unreadable files says which, the benchmark's runs (``fdfa.bench``) and runs moved
aside by a fresh start in their dir (``previous-<n>/``) are left out.
Runs of the same config and seed (a rerun) count once: the one that finished last.

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

The package, one concern a module, each readable alone (in the order the data flows):
values.py (finite numbers, flat configs, short texts), rundata.py (one run: RunData, the keys that
make an experiment), load.py (finding and reading run dirs, Skip), group.py (runs into rows),
stats.py (a row's numbers, the BP row it is paired with), tables.py (results.csv, results.md),
plots.py (the PNGs), make.py (make_report: all of it), cli.py (the command line).
"""

from fdfa.report.cli import main
from fdfa.report.group import ALGORITHM_ORDER, Row, group_rows
from fdfa.report.load import (
    Skip,
    Unusable,
    collect_runs,
    drop_reruns,
    find_run_dirs,
    load_run,
    read_config,
    read_records,
    unfinished_reason,
)
from fdfa.report.make import Report, make_report
from fdfa.report.plots import LAYER_PLOTS, _mean_band, make_plots, plot_accuracy, plot_layers
from fdfa.report.rundata import (
    ALIGN_KEY,
    IGNORED_KEYS,
    MATTERS_ONLY_WHEN,
    RunData,
    key_pattern,
    relevant_config,
)
from fdfa.report.stats import baseline_row, own_options, row_stats, setting_differences
from fdfa.report.tables import markdown_table, skip_summary, unpaired_notes, write_csv

__all__ = [
    "ALGORITHM_ORDER",
    "ALIGN_KEY",
    "IGNORED_KEYS",
    "LAYER_PLOTS",
    "MATTERS_ONLY_WHEN",
    "Report",
    "Row",
    "RunData",
    "Skip",
    "Unusable",
    "_mean_band",
    "baseline_row",
    "collect_runs",
    "drop_reruns",
    "find_run_dirs",
    "group_rows",
    "key_pattern",
    "load_run",
    "main",
    "make_plots",
    "make_report",
    "markdown_table",
    "own_options",
    "plot_accuracy",
    "plot_layers",
    "read_config",
    "read_records",
    "relevant_config",
    "row_stats",
    "setting_differences",
    "skip_summary",
    "unfinished_reason",
    "unpaired_notes",
    "write_csv",
]
