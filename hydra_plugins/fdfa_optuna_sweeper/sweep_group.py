"""The ``sweep`` config group (``python run.py -m sweep=lr``): every ``sweeps/*.yaml``, registered
with Hydra's ConfigStore when Hydra scans its plugins, so the files stay at the top of the
checkout (the layout users know) and ship in the wheel as ``fdfa/sweeps/`` (pyproject.toml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def sweeps_dir() -> Path | None:
    """The checkout's sweeps/ beside hydra_plugins/, else the installed package's fdfa/sweeps/."""
    checkout = Path(__file__).resolve().parents[2] / "sweeps"
    if checkout.is_dir():
        return checkout
    spec = importlib.util.find_spec("fdfa")  # finds the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "sweeps").is_dir():
            return Path(location) / "sweeps"
    return None


def register(directory: Path | None) -> None:
    for path in sorted(directory.glob("*.yaml")) if directory else []:
        node = OmegaConf.load(path)  # each file is `# @package _global_`
        ConfigStore.instance().store(
            group="sweep", name=path.stem, node=node, package="_global_", provider="fdfa"
        )


register(sweeps_dir())
