"""The benchmark (``python run.py -m sweep=benchmark experiment=mnist_fc2``): every rule tuned in
its own study, its best params confirmed on fresh seeds, then one report.

It is the sweeper run over several studies at once, nothing more:

- the ``benchmark`` node (sweeps/benchmark.yaml) names the rules, the trials each study gets
  (``benchmark.trials``, in place of ``hydra.sweeper.n_trials``) and the confirmation seeds
  (``benchmark.seeds``, in place of ``hydra.sweeper.confirm_seeds``); ``benchmark.spaces.<rule>``
  gives a rule's overrides (``algorithm=dkp``) and its search space (``params``, nested keys:
  ``optimizer.lr`` is ``params.optimizer.lr``); a search override on the command line applies to
  every rule;
- each rule is one study, ``<study name>-<rule>``, in the sweep's one storage, with its trials and
  confirmation runs in ``<sweep dir>/<rule>/`` (a sweep dir of its own: its study.yaml,
  optimization_results.yaml and plots as any sweep's);
- the workers share all the studies (_loop.py): each next trial comes from the rule with the
  fewest trials taken; a worker with no trial left takes a confirmation seed of a rule whose
  trials have finished. Every rule's trials run at the config's seed s (s..s+k-1 with
  ``seeds_per_trial`` k) and its confirmation runs at the same seeds s+k..s+k+N-1, so each rule's
  seed i pairs with BP's seed i in the report's difference to BP;
- once every rule's confirmation runs are done, the report (fdfa.report.make_report) of all of
  them goes to ``<sweep dir>/report/``, each row with the params its rule's study chose and the
  trials it took. A rerun of the command resumes every stage: finished trials and seed runs stay,
  the report is written again from them;
- W&B (a ``wandb`` logger): every job of the benchmark is in one W&B group, the benchmark's name
  (``sweep_job.group``), with job type ``trial`` or ``confirm`` and its rule as a tag
  (``sweep_job.rule``); each rule's study run (``study-<study>``) is in that group too, and the
  benchmark's own run (job type ``benchmark``) holds the report's table.

The benchmark node is the sweeper's: jobs get ``~benchmark`` (it is not in their config, so it
neither enters a study's settings nor a run's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from fdfa.errors import FdfaError

from ._confirm import confirmed_value
from ._liveness import finished_places

REPORT_DIR = "report"


@dataclass
class Benchmark:
    rules: list[str]
    trials: int
    seeds: int
    spaces: dict  # rule -> {"overrides": [...], "params": {nested key: search text}}


def read_benchmark(config: DictConfig) -> Benchmark | None:
    """The ``benchmark`` node of the command's config, checked; None for a plain sweep."""
    node = OmegaConf.select(config, "benchmark")
    if node is None:
        return None
    bench = OmegaConf.to_container(node, resolve=True)
    rules, spaces = bench.get("rules") or [], bench.get("spaces") or {}
    if isinstance(rules, str):
        rules = [rules]
    unknown = [r for r in rules if r not in spaces]
    if not rules or unknown:
        raise FdfaError(
            f"benchmark.rules={rules}: {'no rules' if not rules else f'no space for {unknown}'}; "
            f"the rules with a search space (benchmark.spaces) are {', '.join(spaces)}"
        )
    if len(set(rules)) != len(rules):
        raise FdfaError(f"benchmark.rules={rules} names a rule twice: name each once")
    for key in ("trials", "seeds"):
        if not isinstance(bench.get(key), int) or bench[key] < 1:
            raise FdfaError(f"benchmark.{key} must be an integer >= 1, not {bench.get(key)!r}")
    return Benchmark(rules, bench["trials"], bench["seeds"], {r: spaces[r] for r in rules})


def flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    """{"optimizer": {"lr": text}} -> {"optimizer.lr": text}."""
    flat = {}
    for key, value in (params or {}).items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def rule_arguments(bench: Benchmark, rule: str, arguments: list[str], rule_dir: Path) -> list[str]:
    """A rule's job overrides: the command line's (without benchmark.*), the rule's own, its
    sweep dir, and ``~benchmark`` (the node stays the sweeper's)."""
    own = [str(o) for o in bench.spaces[rule].get("overrides") or []]
    kept = [a for a in arguments if not a.lstrip("+~").startswith("benchmark")]
    return [*kept, *own, f"hydra.sweep.dir={rule_dir}", "~benchmark"]


def trials_text(study: optuna.Study) -> str:
    """How many trials a study took: '20 (3 pruned, 1 failed)'."""
    counted = finished_places(study.get_trials(deepcopy=False))
    pruned = sum(t.state == TrialState.PRUNED for t in counted)
    failed = sum(t.state == TrialState.FAIL for t in counted)
    extra = [f"{pruned} pruned"] * bool(pruned) + [f"{failed} failed"] * bool(failed)
    return f"{len(counted)}" + (f" ({', '.join(extra)})" if extra else "")


def write_report(sweep_dir: Path, plans, studies, seeds: int, config=None) -> Path | None:
    """<sweep dir>/report/ from every rule's confirmation runs, once all are done (else None);
    with a wandb logger in ``config``, also the benchmark's W&B run with the report's table."""
    from fdfa.report import make_report
    from fdfa.study_report import log_benchmark

    tuned = {}
    for plan, study in zip(plans, studies):
        confirm_dir = plan.sweep_dir / "confirm"
        runs = [confirm_dir / f"seed{s}" for s in plan.confirm_seeds(seeds)]
        if any(confirmed_value(run) is None for run in runs):
            return None
        marker = OmegaConf.to_container(OmegaConf.load(confirm_dir / "trial.yaml"))
        tuned[confirm_dir] = {"params": marker["params"], "trials": trials_text(study)}
    out = sweep_dir / REPORT_DIR
    make_report(list(tuned), out, tuned=tuned)
    if config is not None:
        log_benchmark(out, plans[0].group, config)
    return out
