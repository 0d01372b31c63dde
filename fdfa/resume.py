"""Which checkpoint a run continues from (``trainer.resume``), and whether it fits the config.

- ``auto`` (default): this run dir's last.ckpt, if there is one;
- ``latest``: that, else the last.ckpt of the newest unfinished run of the same config beside this
  run dir (``outputs/<name>/*/`` for single runs, ``multirun/*/<job>/`` in sweeps);
- ``never`` (or null/false): start afresh; a path: that checkpoint file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fdfa import checkpoint
from fdfa.errors import FdfaError, RunDirRefused
from fdfa.runfiles import RunFiles

log = logging.getLogger(__name__)


def resume_source(choice, files: RunFiles, config: dict) -> Path | None:
    """The checkpoint to resume from for ``trainer.resume=choice`` (None: a fresh start)."""
    if choice in (None, False, "never"):
        return None
    if choice == "auto":
        return files.last if files.last.exists() else None
    if choice == "latest":
        return files.last if files.last.exists() else latest_unfinished(files, config)
    path = Path(choice)
    if not path.is_file():
        raise FdfaError(f"trainer.resume={choice}: no such checkpoint file")
    return path


def latest_unfinished(files: RunFiles, config: dict) -> Path | None:
    """The last.ckpt of the newest unfinished run of ``config`` (all but trainer, logger,
    metrics) beside ``files.dir``; None (a fresh start) if there is none."""
    here = files.dir.resolve()
    found = []
    for d in {*here.parent.glob("*/"), *here.parent.parent.glob(f"*/{here.name}/")}:
        other = RunFiles(d)
        if d == here or not (other.last.is_file() and other.config.is_file()):
            continue
        try:
            saved = OmegaConf.to_container(OmegaConf.load(other.config), resolve=True)
            summary = other.summary
            status = json.loads(summary.read_text())["status"] if summary.is_file() else None
        except Exception:  # an unreadable or foreign run dir is not one of this config's
            continue
        if status != "completed" and not checkpoint.config_differences(saved, config):
            found.append(other.last)
    if not found:
        log.info("trainer.resume=latest: no unfinished run of this config; starting fresh")
        return None
    return max(found, key=lambda path: path.stat().st_mtime)


_ABSENT = object()
# What last.ckpt holds (fdfa/train.py's save_checkpoint) and of which type; its "progress" holds
# where training stands (fdfa/progress.py's Progress), each field of the type of its default.
FIELDS = {
    "config": dict, "rule": dict, "optimizers": dict, "scheduler": dict, "rng": dict,
    "progress": dict, "records": list,
}  # fmt: skip
PROGRESS = {
    "epoch": int, "step": int, "train_time": (int, float), "wall_time": (int, float),
    "train_samples": int, "perm": (torch.Tensor, type(None)), "batch": int,
    "loss_sum": (int, float),
}  # fmt: skip


def check_fields(ckpt: dict, path: Path) -> None:
    """Refuse a checkpoint of the right format that lacks a field or holds one of another type
    (written by another tool, or damaged), in one line naming the field, before anything is
    restored from it (the run dir stays as it was)."""
    fields = [(key, ckpt, kind) for key, kind in FIELDS.items()]
    if isinstance(ckpt.get("progress"), dict):
        fields += [(f"progress.{k}", ckpt["progress"], kind) for k, kind in PROGRESS.items()]
    for key, holder, kind in fields:
        name = key.rpartition(".")[2]
        value = holder.get(name, _ABSENT)
        if value is _ABSENT or not isinstance(value, kind) or isinstance(value, bool):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            wanted = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            got = "missing" if value is _ABSENT else f"a {type(value).__name__}, not {wanted}"
            raise RunDirRefused(
                f"checkpoint {path} is damaged: its field {key} is {got}; resume from another "
                "checkpoint (trainer.resume=<path>), or start over here with trainer.resume=never"
            )


def check_compatible(ckpt: dict, path: Path, config: dict) -> None:
    """Refuse a damaged checkpoint (check_fields) or one of another config (RunDirRefused: the
    run dir stays as it was)."""
    check_fields(ckpt, path)
    diffs = checkpoint.config_differences(ckpt["config"], config)
    if diffs:
        raise RunDirRefused(
            f"checkpoint {path} belongs to another config ({'; '.join(diffs[:3])}); "
            "use a new hydra.run.dir, or trainer.resume=never to start over here"
        )
