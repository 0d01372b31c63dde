"""One run per run dir: the dir's lock, and the Hydra callback that checks and claims run dirs.

- ``RunDirLock``: an exclusive ``flock`` on ``<run dir>/.lock``, held for the run's life. The
  kernel drops it when the process ends, however it ends (kill -9 included), so a dead run never
  blocks its rerun, and a second live run in the same dir is refused with one line.
- ``RunDirCallback`` (``hydra.callbacks`` in conf/config.yaml): before Hydra creates the run dir,
  a dir that cannot be written is one line and exit 2 (also when it comes from an interpolation
  or the default ``outputs/``), and a run or sweep dir named by the time (``${now:...}``) is
  created exclusively: a second run (or grid) started in the same second gets ``<name>-1``,
  never the same dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from fdfa.distributed import from_env
from fdfa.errors import FdfaError, RunDirRefused, user_errors
from fdfa.runfiles import LOCK_NAME


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds the run dir for this process, or raises RunDirRefused
    naming the live run that holds it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def __enter__(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirRefused(
                f"run dir {self.run_dir} is in use by a live run ({holder}); wait for it to end "
                "(rerun then to resume it), or give this run its own hydra.run.dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        with contextlib.suppress(OSError):  # who holds it, for the message above (best effort)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # names its holder only while held
            os.close(self.fd)  # releases the lock; the file stays (deleting it would race)
            self.fd = None


def check_writable(path: Path, key: str) -> None:
    """Raise FdfaError unless ``path`` is, or can be created as, a folder this process can write
    to. Creates nothing: the nearest existing ancestor is checked instead of a missing path."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "a file is in the way", str(probe))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise FdfaError(
            f"{key} {path} is not a writable folder ({err.strerror or err}: {probe}); "
            f"choose another with {key}=..."
        ) from None


def claim_new_dir(path: Path) -> Path:
    """Create ``path``, or ``<path>-1``, ``<path>-2``... if taken: a folder no other run has."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        candidate = path if i == 0 else path.with_name(f"{path.name}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FdfaError(f"{path} and 999 numbered variants exist; set hydra.run.dir=...")


class RunDirCallback(Callback):
    """Checks (and, when named by the time, claims) the run or sweep dir before Hydra makes it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        with user_errors():
            self._claim_run_dir(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with user_errors():
            self._check_sweep_dir(config)

    @staticmethod
    def _check_sweep_dir(config: DictConfig) -> None:
        claimed = _claim_timed_dir(config, "sweep")
        if claimed is not None:  # each job's config is composed again: it must name the dir too
            with read_write(config.hydra.overrides):
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quote(str(claimed))}")

    @staticmethod
    def _claim_run_dir(config: DictConfig) -> None:
        _claim_timed_dir(config, "run")


def _claim_timed_dir(config: DictConfig, kind: str) -> Path | None:
    """Check hydra.<kind>.dir (``run`` or ``sweep``); when it is named by the time, create it
    exclusively (or ``<name>-1``...) and set it in ``config``: returns the dir claimed (None:
    a fixed dir, where a rerun resumes; the run's lock keeps runs apart)."""
    key = f"hydra.{kind}.dir"
    path = _resolved(config, kind)
    check_writable(path, key)
    raw = OmegaConf.to_container(config.hydra[kind], resolve=False)["dir"]
    if "${now:" not in str(raw):
        return None
    if kind == "run" and from_env().active:  # each rank would claim a dir of its own
        raise FdfaError(
            "under torchrun every rank must write to the same run dir: name it, e.g. "
            "hydra.run.dir=outputs/my-run (rerun the same command to resume)"
        )
    try:
        claimed = claim_new_dir(path)
    except OSError as err:
        raise FdfaError(
            f"{key} {path} cannot be created ({err.strerror or err}); choose another with {key}=..."
        ) from None
    with read_write(config.hydra[kind]):
        config.hydra[kind].dir = str(claimed)
    return claimed


def quote(value: str) -> str:
    """``value`` as a Hydra override value: bare when safe, else single-quoted."""
    if re.fullmatch(r"[\w./:@-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _resolved(config: DictConfig, kind: str) -> Path:
    HydraConfig.instance().set_config(config)  # for ${hydra:...} (Hydra does the same next)
    return Path(str(config.hydra[kind].dir))
