"""Every check of user input that can run before any work, in one place.

- ``preflight(argv)``: before Hydra composes the config (unknown group options, an unwritable
  run dir): Hydra's own messages for these are long or come with a traceback.
- ``validate_config(cfg)``: types and ranges of the composed config's values.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fdfa.errors import FdfaError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _number(v):
    """A finite int or float (inf and nan are never a valid setting)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v):
    return isinstance(v, int) and not isinstance(v, bool)


SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit

# key -> (accepts the value, what it must be). A key absent from the config is not checked.
CHECKS = {
    "seed": (lambda v: _integer(v) and 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]"),
    "optimizer.lr": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "optimizer.weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "algorithm.feedback_lr": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "algorithm.feedback_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "algorithm.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "algorithm.n_directions": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "algorithm.feedback_update": (lambda v: v in ("adam", "ema"), "adam or ema"),
    "algorithm.feedback_init": (lambda v: v in ("zeros", "kaiming"), "zeros or kaiming"),
    "algorithm.per_sample": (lambda v: isinstance(v, bool), "true or false"),
    "algorithm.perturbation": (lambda v: v in ("gaussian", "rademacher"), "gaussian or rademacher"),
    "model.n_layers": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "model.width": (lambda v: v is None or (_integer(v) and v >= 1), "null or an integer >= 1"),
    "model.input_size": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1"),
    "dataset.batch_size": (
        lambda v: _integer(v) and v >= 2,
        "an integer >= 2 (BatchNorm needs 2 samples per batch)",
    ),
    "dataset.test_batch_size": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "dataset.val_size": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "dataset.split_seed": (_integer, "an integer"),
    "dataset.subset": (lambda v: v is None or (_integer(v) and v >= 2), "null or an integer >= 2"),
    "dataset.augment": (lambda v: v in ("none", "flip_crop"), "none or flip_crop"),
    "scheduler.gamma": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "trainer.epochs": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "trainer.max_steps": (
        lambda v: v is None or (_integer(v) and v >= 1),
        "null or an integer >= 1",
    ),
    "trainer.ckpt_every_n_steps": (
        lambda v: v is None or (_integer(v) and v >= 1),
        "null or an integer >= 1",
    ),
    "trainer.device": (
        lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
        "auto, cpu or cuda",
    ),
    "trainer.cuda_graph": (lambda v: isinstance(v, bool), "true or false"),
    "metrics.every_n_steps": (
        lambda v: v is None or (_integer(v) and v >= 1),
        "null or an integer >= 1",
    ),
}


def validate_config(cfg: DictConfig) -> None:
    """Raise FdfaError naming the first value of the wrong type or out of range."""
    for key, (ok, requirement) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue
        if not ok(value):
            raise FdfaError(f"{key} must be {requirement}, got {value!r}")


GROUP_OVERRIDE = re.compile(r"^(\w+)=(.*)$")


def preflight(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Command-line checks before Hydra runs: group options exist, the run dir is writable."""
    if any(a.startswith(("hydra.searchpath", "--config-dir", "-cd", "--info", "--help", "-h"))
           for a in argv):  # fmt: skip
        return  # the user brings their own configs or asks Hydra for help
    for arg in argv:
        m = GROUP_OVERRIDE.match(arg)
        if not m or not (conf_dir / m.group(1)).is_dir():
            continue
        group, value = m.groups()
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for option in _sweep_values(value):
            if option not in options and option != "null":
                raise FdfaError(f"unknown {group} {option!r}: choose one of {', '.join(options)}")
    for arg in argv:
        for key in ("hydra.run.dir=", "hydra.sweep.dir="):
            if arg.startswith(key):
                _check_writable(Path(arg[len(key) :].strip("'\"")), key[:-1])


def _sweep_values(value: str) -> list[str]:
    """'a,b' and 'choice(a,b)' and '[a,b]' (a list of options) -> [a, b]; else [value]."""
    inner = re.fullmatch(r"(?:choice\((.*)\)|\[(.*)\])", value)
    value = next((g for g in inner.groups() if g is not None), value) if inner else value
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_writable(path: Path, key: str) -> None:
    if "${" in str(path):
        return  # interpolated: Hydra resolves it later
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise FdfaError(
            f"{key} {path} is not a writable folder ({err.strerror or err}); "
            f"choose another with {key}=..."
        ) from None
    if not os.access(path, os.W_OK):
        raise FdfaError(f"{key} {path} is not writable; choose another with {key}=...")
