"""Finding run dirs and reading them: every run dir is either a RunData or a Skip saying why it
is left out (unfinished, unreadable, a benchmark run, a rerun of the same config and seed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import yaml
from omegaconf import OmegaConf

from fdfa.errors import FdfaError, one_line
from fdfa.report.rundata import RunData
from fdfa.report.values import flatten, is_integer, is_number, short_path


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
        if "epoch" in record and not (is_integer(epoch) and epoch >= 1):
            raise Unusable(f"metrics.jsonl line {i}: epoch must be an integer >= 1, got {epoch!r}")
        acc = record.get("test/acc")
        if "test/acc" in record and not (is_number(acc) and 0 <= acc <= 1 and "epoch" in record):
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
    return flatten(config)


def unfinished_reason(path: Path, status: str | None, config: dict | None) -> Unusable:
    """Why a run without a completed summary is left out: what its records and checkpoint say."""
    records = read_records(path) if (path / "metrics.jsonl").is_file() else []
    evaluations = [r for r in records if "test/acc" in r]
    target = (config or {}).get("trainer.epochs")
    done = evaluations[-1]["epoch"] if evaluations else 0
    progress = f"{done}{f' of {target}' if is_integer(target) else ''} epochs done"
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
    if re.fullmatch(r"previous-\d+", path.name):
        raise Unusable(
            f"an earlier run, moved aside when a run started afresh in {path.parent}: "
            "only the run there counts",
            "moved aside",
        )
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
    if run.seed is not None and not is_integer(run.seed):
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
    runs, unusable = [], []
    for path in find_run_dirs(dirs):
        try:
            runs.append(load_run(path))
        except Unusable as err:
            unusable.append((path, err))
    skipped = []
    for path, err in unusable:
        later = resumed_in(path, runs) if err.kind == "interrupted or running" else None
        if later is not None:
            err = Unusable(
                f"interrupted, then resumed and finished in {short_path(later.path)} "
                "(trainer.resume=latest): counted there",
                "resumed elsewhere",
            )
        skipped.append(Skip(short_path(path), str(err), err.kind))
    kept, duplicates = drop_reruns(runs)
    return kept, skipped + duplicates


def resumed_in(path: Path, runs: list[RunData]) -> RunData | None:
    """The finished run that continued the unfinished run in ``path`` from its last.ckpt (as
    ``trainer.resume=latest`` does, in a new run dir), if one is among ``runs``. A resumed run
    starts with the checkpoint's records, copied: an evaluation record equal in every value
    (its time_s, the wall clock since the start, included) is one written by the same run."""
    try:
        first = next(r for r in read_records(path) if "test/acc" in r)
    except (Unusable, StopIteration, OSError):
        return None
    return next((run for run in runs if first in run.records and run.path != path), None)


def drop_reruns(runs: list[RunData]) -> tuple[list[RunData], list[Skip]]:
    """One run per (config, seed): the one that finished last; a Skip for each of the others.
    Runs without a seed are all kept (nothing says they repeat each other)."""
    latest, skipped = {}, []
    for run in sorted(runs, key=RunData.finished_at, reverse=True):
        key = run.identity() if run.seed is not None else id(run)
        if key not in latest:
            latest[key] = run
            continue
        kept = short_path(latest[key].path)
        why = f"same config and seed {run.seed} as {kept}, which finished later: counted once"
        skipped.append(Skip(short_path(run.path), why, "rerun of the same seed"))
    kept_runs = set(map(id, latest.values()))
    return [r for r in runs if id(r) in kept_runs], skipped
