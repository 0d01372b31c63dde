"""Grouping runs into table rows: one Row per (dataset, model, algorithm) and config variant,
labelled by the relevant keys whose values differ between runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from fdfa.report.rundata import RunData
from fdfa.report.values import fmt_value

# The usual order of the rules in tables and legends; other names follow, sorted.
ALGORITHM_ORDER = [
    "bp",
    "dfa",
    "dkp",
    "fdfa",
    "fg_w",
    "fg_a",
    "fa",
    "kp",
    "usf",
    "brsf",
    "frsf",
    "drtp",
]


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


def _differing_keys(configs: list[dict]) -> set[str]:
    """Keys whose value (or presence) is not the same in all of ``configs`` (relevant ones)."""
    keys = set().union(*configs) if configs else set()
    return {k for k in keys if len({repr(c.get(k, "<unset>")) for c in configs}) > 1}


def _describe(config: dict, keys, strip: str = "") -> str:
    """``k=v, ...`` for the keys this config has (a key its rule ignores is not in it)."""
    shown = sorted(k for k in keys if k in config)
    return ", ".join(f"{k.removeprefix(strip)}={fmt_value(config[k])}" for k in shown)


def group_rows(runs: list[RunData], tuned_keys=frozenset()) -> list[Row]:
    """One Row per (dataset, model, algorithm) and config variant, in table order: the labels
    show the relevant keys whose values differ between runs of the same dataset and model.
    ``tuned_keys``: keys each rule's own search chose (a benchmark's): shown in their own column,
    not in labels."""
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
            model_wide = _differing_keys(by_model[dataset, model]) - set(tuned_keys)
            model_keys = {k for k in model_wide if k.startswith("model.")}
            other_keys = {k for k in model_wide if not k.startswith(("model.", "algorithm."))}
            algo_keys = {
                k
                for k in _differing_keys(by_algorithm[run.names]) - set(tuned_keys)
                if k.startswith("algorithm.")
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
