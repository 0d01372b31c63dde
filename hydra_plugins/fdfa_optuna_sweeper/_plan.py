"""What every worker of one sweep shares: the sweeper's settings, checked once (``Options``), and
the plan of the sweep the command works out before any trial runs (``Plan``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fdfa.errors import FdfaError

from ._jobs import link_overrides


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
    seeds_per_trial: int = 1
    storage_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise FdfaError(
                f"hydra.sweeper.direction must be maximize or minimize, not {self.direction}"
            )
        if self.n_trials < 1:
            raise FdfaError("hydra.sweeper.n_trials must be at least 1")
        if self.confirm_seeds < 0:
            raise FdfaError("hydra.sweeper.confirm_seeds must be >= 0 (0: no confirmation runs)")
        if self.seeds_per_trial < 1:
            raise FdfaError("hydra.sweeper.seeds_per_trial must be >= 1 (1: one seed per trial)")
        if not 0 <= self.max_failure_rate <= 1:
            raise FdfaError("hydra.sweeper.max_failure_rate must be between 0 and 1")
        if not 0 < self.heartbeat_interval < self.grace_period:
            raise FdfaError(
                "need 0 < hydra.sweeper.heartbeat_interval < hydra.sweeper.grace_period, got "
                f"{self.heartbeat_interval} and {self.grace_period}"
            )
        if not self.storage_timeout_s > 0:
            raise FdfaError(
                "hydra.sweeper.storage_timeout_s must be > 0 (seconds to wait for a locked "
                f"study), not {self.storage_timeout_s}"
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
    trial_seed: int  # the config's seed s: trials run at s..s+k-1 (k: seeds_per_trial)
    settings: dict = field(default_factory=dict)  # what every trial shares (_settings.py)
    label: str = ""  # how progress lines name this study (a benchmark: its rule)
    seeds_per_trial: int = 1  # k: each trial trains seeds trial_seed..trial_seed+k-1
    group: str = ""  # the W&B group of its jobs: a benchmark's name ("": the study's name)

    def links(self, kind: str, number: int | None = None) -> list[str]:
        """The ``sweep_job`` overrides of one of its jobs (``kind``: trial or confirm): its W&B
        group, and a benchmark's rule."""
        return link_overrides(kind, self.group or self.study_name, number, self.label or None)

    def trial_seeds(self) -> list[int]:
        """The seeds every trial trains: s..s+k-1."""
        return [self.trial_seed + j for j in range(self.seeds_per_trial)]

    def confirm_seeds(self, n: int) -> list[int]:
        """The n confirmation seeds, the next ones after the trials': s+k..s+k+n-1."""
        return [self.trial_seed + self.seeds_per_trial + i for i in range(n)]
