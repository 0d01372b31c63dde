"""fdfa's Optuna sweeper for Hydra: ``hydra/sweeper=fdfa_optuna`` (or ``sweep=<name>``).

Search spaces use the official hydra-optuna-sweeper's grammar (``params:`` with ``interval``,
``range``, ``choice``, ``tag(log, ...)``), on stable Optuna and hydra-core 1.3, plus pruning, an
exact ``n_trials`` shared by any number of workers on one storage, resume, and failure handling.
Configs: config.py; the Hydra-facing class: optuna_sweeper.py; the work: _impl.py (imported only
when a sweep runs, so plain runs never import Optuna).
"""
