"""The sweeper's structured configs, registered with Hydra's ConfigStore:

- ``hydra/sweeper``: ``fdfa_optuna``
- ``hydra/sweeper/sampler``: ``tpe`` (default) | ``random``
- ``hydra/sweeper/pruner``: ``median`` (default) | ``hyperband`` | ``none``

Samplers and pruners are built from their ``_target_`` when the sweep starts, so any Optuna
sampler or pruner works: ``hydra.sweeper.pruner._target_=optuna.pruners.PercentilePruner ...``.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None  # null: every worker draws its own; set: worker i of n_jobs uses seed+i
    n_startup_trials: int = 10  # random trials before TPE models the results
    multivariate: bool = False  # model parameters jointly (better with correlated parameters)
    constant_liar: bool = True  # treat running trials as bad, so parallel workers spread out


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None  # as in tpe


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # never prune before this many trials have finished
    n_warmup_steps: int = 0  # never prune a trial before this epoch
    interval_steps: int = 1  # check every this many epochs


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1  # epochs every trial gets
    max_resource: Any = "auto"  # epochs of a full trial (auto: from the first finished trials)
    reduction_factor: int = 3  # keep 1 trial in this many at each rung


@dataclass
class NoPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class FdfaOptunaSweeperConf:
    _target_: str = "hydra_plugins.fdfa_optuna_sweeper.optuna_sweeper.FdfaOptunaSweeper"
    _recursive_: bool = False  # the sweeper builds sampler and pruner itself (per-worker seeds)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])

    sampler: Any = MISSING  # hydra/sweeper/sampler=tpe|random, or any _target_
    pruner: Any = MISSING  # hydra/sweeper/pruner=median|hyperband|none, or any _target_
    direction: str = "maximize"  # maximize | minimize the objective
    objective: str = "val/acc"  # the per-epoch metric reported for pruning; a trial's value is
    # its best over the epochs (test/acc selects on the test set: allowed, with a warning)
    study_name: str | None = None  # null: the name of the sweep dir
    storage: str | None = None  # null: SQLite file optuna.db in the sweep dir; any SQLAlchemy
    # URL (postgresql://user@host/db, mysql://...) or journal:PATH for a shared study
    n_trials: int = 20  # trials of the whole study (complete + pruned + failed), over all workers
    n_jobs: Any = 1  # workers this command starts (each one trial at a time): processes here with
    # the basic launcher, else jobs of hydra/launcher; auto: one per GPU here (one on a CPU)
    max_failure_rate: float = 0.5  # stop once more than this fraction of n_trials has failed
    heartbeat_interval: float = 10.0  # seconds between a running trial's heartbeats
    grace_period: float = 120.0  # a trial silent this long (its worker died) is failed and redone
    params: dict[str, str] | None = None  # key: search space (interval/range/choice/tag)
    confirm_seeds: int = 0  # then rerun the best trial's params on N seeds no trial used: the
    # trials' seeds are s..s+k-1 (s: the config's seed, k: seeds_per_trial), the confirmation's
    # the next N, s+k..s+k+N-1, in confirm/seed<seed>
    seeds_per_trial: int = 1  # k: each trial trains k seeds (s..s+k-1, in <trial>/seed<seed>/
    # when k > 1); its value is their mean; the pruner sees the first seed's epochs only
    storage_timeout_s: float = 300.0  # how long to wait for a study's SQLite file that another
    # process holds locked (said within 2 s), then stop with one line


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="fdfa_optuna", node=FdfaOptunaSweeperConf, provider="fdfa")
cs.store(group="hydra/sweeper/sampler", name="tpe", node=TPESamplerConf, provider="fdfa")
cs.store(group="hydra/sweeper/sampler", name="random", node=RandomSamplerConf, provider="fdfa")
cs.store(group="hydra/sweeper/pruner", name="median", node=MedianPrunerConf, provider="fdfa")
cs.store(group="hydra/sweeper/pruner", name="hyperband", node=HyperbandPrunerConf, provider="fdfa")
cs.store(group="hydra/sweeper/pruner", name="none", node=NoPrunerConf, provider="fdfa")
