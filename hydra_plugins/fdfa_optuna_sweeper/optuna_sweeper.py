"""The Hydra-facing sweeper class; the work is in _command.py and the modules it imports, loaded
only when a sweep starts.

The sweeper's user errors (``FdfaError``) become one line on stderr and exit code 2 (a worker
stopped by SIGTERM: 143) through fdfa.errors.user_errors, instead of Hydra's traceback report."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

import hydra_plugins.fdfa_optuna_sweeper.config  # noqa: F401  (registers the configs)
from fdfa.errors import user_errors


class FdfaOptunaSweeper(Sweeper):
    """``hydra/sweeper=fdfa_optuna``: an Optuna study over the ``params`` search space."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings  # the fields of config.FdfaOptunaSweeperConf
        self.command = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra_plugins.fdfa_optuna_sweeper._command import SweepCommand
        from hydra_plugins.fdfa_optuna_sweeper._plan import Options

        with user_errors():
            self.command = SweepCommand(
                Options(**self.settings), hydra_context, task_function, config
            )

    def sweep(self, arguments: list[str]) -> Any:
        with user_errors():
            return self.command.sweep(arguments)
