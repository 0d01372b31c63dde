"""fdfa's Optuna sweeper for Hydra: ``hydra/sweeper=fdfa_optuna`` (or ``sweep=<name>``).

Search spaces use the official hydra-optuna-sweeper's grammar (``params:`` with ``interval``,
``range``, ``choice``, ``tag(log, ...)``), on stable Optuna and hydra-core 1.3, plus pruning, an
exact ``n_trials`` shared by any number of workers on one storage, resume, failure handling, and
workers submitted through any Hydra launcher (submitit_slurm, submitit_local, joblib).
Configs: config.py; the sweeps/ files as the ``sweep`` group: sweeps.py; the Hydra-facing class:
optuna_sweeper.py; the work: _impl.py and the _*.py beside it (modules starting with ``_`` are not
imported by Hydra's plugin scan, so plain runs never import Optuna).
"""
