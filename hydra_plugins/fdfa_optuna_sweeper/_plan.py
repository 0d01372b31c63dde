"""What every worker of one sweep shares: the sweeper's settings, checked once (``Options``), and
the plan of the sweep the command works out before any trial runs (``Plan``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fdfa.errors import FdfaError


@dataclass
class Options:
    """The fields of config.FdfaOptunaSweeperConf (their comments say what each does)."""

    sampler: DictConfig
    pruner: DictConfig
    direction: str = "maximize"
    objective: str = "val/acc"
    study_name: str | None = None
    storage: str | None = None
    n_trials: int = 20
    n_jobs: Any = 1
    max_failure_rate: float = 0.5
    heartbeat_interval: float = 10.0
    grace_period: float = 120.0
    params: Any = None
    confirm_seeds: int = 0

    def __post_init__(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise FdfaError(
                f"hydra.sweeper.direction must be maximize or minimize, not {self.direction}"
            )
        if self.n_trials < 1:
            raise FdfaError("hydra.sweeper.n_trials must be at least 1")
        if self.confirm_seeds < 0:
            raise FdfaError("hydra.sweeper.confirm_seeds must be >= 0 (0: no confirmation runs)")
        if not 0 <= self.max_failure_rate <= 1:
            raise FdfaError("hydra.sweeper.max_failure_rate must be between 0 and 1")
        if not 0 < self.heartbeat_interval < self.grace_period:
            raise FdfaError(
                "need 0 < hydra.sweeper.heartbeat_interval < hydra.sweeper.grace_period, got "
                f"{self.heartbeat_interval} and {self.grace_period}"
            )
        if OmegaConf.is_config(self.params):
            self.params = OmegaConf.to_container(self.params)
        self.params = self.params or {}


@dataclass
class Plan:
    """What every worker of one sweep command shares."""

    space: dict  # param -> Optuna distribution
    fixed: list  # the overrides every trial gets
    sweep_dir: Path
    study_name: str
    url: str  # the storage
    seed: int | None  # the sampler seed as given (worker i uses seed + i), or None
    trial_seed: int  # the config's seed, every trial's; confirmation runs use trial_seed + 1..N
    settings: dict = field(default_factory=dict)  # what every trial shares (_settings.py)
