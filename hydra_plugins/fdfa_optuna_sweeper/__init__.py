"""fdfa's Optuna sweeper for Hydra: ``hydra/sweeper=fdfa_optuna`` (or ``sweep=<name>``).

Search spaces use the official hydra-optuna-sweeper's grammar (``params:`` with ``interval``,
``range``, ``choice``, ``tag(log, ...)``), on stable Optuna and hydra-core 1.3, plus pruning, an
exact ``n_trials`` shared by any number of workers on one storage, resume, failure handling, and
workers submitted through any Hydra launcher (submitit_slurm, submitit_local, joblib).
Configs: config.py; the sweeps/ files as the ``sweep`` config group: sweep_group.py; the
Hydra-facing class: optuna_sweeper.py. The work, in modules starting with ``_`` (not imported by
Hydra's plugin scan, so plain runs never import Optuna), one import direction, no circle:

- _command.py: the sweep command: the plan, the checks before any trial, starting the workers;
- _launch.py: worker processes of this command, or worker jobs of another Hydra launcher;
- _loop.py: one worker's loop over trials; _jobs.py: one job in this process, with its links;
- _confirm.py: confirmation runs on seeds no trial used; _results.py: the results file, plots,
  the W&B study run, the time left, the closing lines;
- _plan.py (options, plan), _space.py (search space), _settings.py (the settings a study's
  trials share), _storage.py (storage, lock, sweep dir claim), _liveness.py (workers,
  heartbeats, handing trials back), _plots.py (the study's plots).
"""
