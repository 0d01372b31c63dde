"""last.ckpt: everything a run needs to continue exactly where it stopped, written atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from fdfa.errors import FdfaError

FORMAT = 1  # bump when the checkpoint layout changes
# Config sections that may change between a run and its resumption (more epochs, another device...).
RESUMABLE_CHANGES = ("trainer", "logger", "metrics")


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temp file beside ``path``, fsync, then rename over it: a crash mid-write
    leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """Read a checkpoint (tensors and plain containers only: no code runs on load)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise FdfaError(
            f"checkpoint {path} is corrupt or unreadable ({first}); delete it to start over, "
            "or set trainer.resume to another checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FdfaError(
            f"{path} is not an fdfa checkpoint of format {FORMAT}; delete it to start over, "
            "or set trainer.resume to another checkpoint"
        )
    return ckpt


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ, ignoring the sections in RESUMABLE_CHANGES."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return diffs


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
