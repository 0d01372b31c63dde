"""last.ckpt: everything a run needs to continue exactly where it stopped, written atomically."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from fdfa.errors import DiskFullError, FdfaError, is_disk_full, one_line
from fdfa.processes import pid_alive

FORMAT = 1  # bump when the checkpoint layout changes
# Config sections that may change between a run and its resumption (more epochs, another device...;
# sweep_job: how a sweeper launched it, absent from checkpoints of older fdfa).
RESUMABLE_CHANGES = ("trainer", "logger", "metrics", "sweep_job")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: Path, write: Callable[[BinaryIO], None], size_hint: int = 0) -> None:
    """Write ``path`` through a temp file beside it whose name is unique to this writer (and
    holds its pid: ``.<name>.<pid>.<random>.tmp``), fsync, then rename over ``path``: a crash, a
    signal or a full disk mid-write leaves ``path`` as it was and no temp file behind (SIGKILL's
    goes at the next remove_stale_temps there). A full disk raises DiskFullError naming the
    folder and the space needed (``size_hint`` bytes, or what was written when it ran out)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp's is private)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full(path.parent, path.name, max(size_hint, written)) from None
        raise


STALE_UNOWNED_S = 3600  # a temp file of an older fdfa (no pid in its name) is stale this old


def remove_stale_temps(folder: Path) -> None:
    """Remove the temp files of write_atomic in ``folder`` left by writers that were killed:
    those whose pid (in the name) is not a live process here, and those without a pid (older
    fdfa) unmodified for STALE_UNOWNED_S."""
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")  # "", name..., pid, random, "tmp"
        with contextlib.suppress(OSError):
            if parts[-3].isdigit():
                stale = not pid_alive(int(parts[-3]))
            else:
                stale = time.time() - tmp.stat().st_mtime > STALE_UNOWNED_S
            if stale:
                tmp.unlink()


def disk_full(folder: Path, name: str | None = None, needed: int = 0) -> DiskFullError:
    """The one-line error for a write (of ``name``) in ``folder`` that found no space left."""
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    what = f"writing {name} " if name else ""
    need = f"needs about {needed / 1e6:.1f} MB, " if needed else ""
    return DiskFullError(
        f"no space left in {folder} ({what}{need}{free}); free some space (or quota) there and "
        "rerun the same command to resume, or choose another hydra.run.dir"
    )


def write_text_atomic(path: Path, text: str) -> None:
    data = text.encode()
    write_atomic(path, lambda f: f.write(data), size_hint=len(data))


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through write_atomic: a crash mid-write leaves the previous checkpoint intact."""
    write_atomic(path, lambda f: torch.save(obj, f), size_hint=tensor_bytes(obj))


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists, tuples): about its size saved."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load(path: Path) -> dict:
    """Read a checkpoint (tensors and plain containers only: no code runs on load)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FdfaError(
            f"checkpoint {path} is corrupt or unreadable ({one_line(err)}); delete it to start "
            "over, or set trainer.resume to another checkpoint"
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
