"""A resumed study never repeats a trial's params (fdfa's trials train the same seed, so a repeat
is the same result again, for nothing), unless the search space has no point left.

- ``resume_seed``: a worker's sampler seed ``s`` (``hydra.sweeper.sampler.seed`` plus the worker's
  index) is used as given for a fresh study; on a study that already holds n trials it becomes
  ``sha256(f"{s}/{n}")`` mod 2^31, so a rerun does not replay the draws of the first run, and the
  same rerun of the same study draws the same again (the log line names the seed used);
- ``replace_repeat``: a trial the sampler gave the params of an earlier trial (any state) is
  failed with its reason and a new point is queued in its place (``redo_of``: it takes the
  repeat's place among n_trials, as a redo does, _liveness.py): an unused point of a finite space
  (every param a choice, an int or a stepped float), else a uniform random draw. When a finite
  space has no unused point the repeat runs, and one warning says so.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

log = logging.getLogger(__name__)

MAX_POINTS = 100_000  # a finite space with more points is drawn from, not listed
DRAWS = 100  # random draws for a point no trial has (a space too large to list)


def resume_seed(seed: int | None, trials_in_study: int) -> int | None:
    """The sampler seed of a worker whose own seed is ``seed``, on a study of that many trials."""
    if seed is None or trials_in_study == 0:
        return seed
    digest = hashlib.sha256(f"{seed}/{trials_in_study}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def repeated(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of an earlier trial whose params ``trial``'s are, or None."""
    for other in study.get_trials(deepcopy=False):
        if other.number != trial.number and other.params and other.params == trial.params:
            return other.number
    return None


def replace_repeat(study: optuna.Study, trial: optuna.Trial, space: dict, seed) -> bool:
    """Fail ``trial`` (whose params repeat an earlier trial's) and queue a point no trial has in
    its place; False (and one warning) when the space has none left. Call under the study's
    lock."""
    earlier = repeated(study, trial)
    used = {_key(t.params) for t in study.get_trials(deepcopy=False) if t.params}
    rng = random.Random(f"{seed}/{trial.number}")
    point = _unused_point(space, used, rng)
    if point is None:
        log.warning(
            "all %d points of the search space have been tried: trial %d repeats the params of "
            "trial %d",
            len(used),
            trial.number,
            earlier,
        )
        return False
    reason = f"repeats the params of trial {earlier}; replaced by a point no trial has"
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial(point, user_attrs={"redo_of": trial.number, "redo_reason": reason})
    log.info("trial %d %s", trial.number, reason)
    return True


def _unused_point(space: dict, used: set, rng: random.Random) -> dict | None:
    values = {name: _values(dist) for name, dist in space.items()}
    size = math.prod(len(v) if v is not None else math.inf for v in values.values())
    if size <= MAX_POINTS:
        points = [dict(zip(space, combo)) for combo in itertools.product(*values.values())]
        unused = [p for p in points if _key(p) not in used]
        return rng.choice(unused) if unused else None
    for _ in range(DRAWS):
        point = {name: _draw(dist, rng) for name, dist in space.items()}
        if _key(point) not in used:
            return point
    return None


def _values(dist) -> list | None:
    """Every value of a finite distribution; None for a continuous one."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n = round((dist.high - dist.low) / dist.step)
        return [dist.low + i * dist.step for i in range(n + 1)]
    return None


def _draw(dist, rng: random.Random):
    values = _values(dist)
    if values is not None:
        return rng.choice(values)
    if dist.log:
        return math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
    return rng.uniform(dist.low, dist.high)


def _key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))
