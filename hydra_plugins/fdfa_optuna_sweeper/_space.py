"""The search space: Hydra sweep overrides (the official plugin's grammar) as Optuna distributions,
and sampled values back as override text."""

from __future__ import annotations

from functools import partial
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from fdfa import errors
from fdfa.errors import FdfaError
from fdfa.rundir import quote

# Hydra's, Optuna's and the databases' messages explain themselves on later lines: keep them all
one_line = partial(errors.one_line, limit=400, whole=True)


def override_value(value: Any) -> str:
    """A sampled parameter as the text of a Hydra override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    return quote(str(value))


def to_distribution(override: Override):
    """An Optuna distribution from ``interval``, ``range`` or ``choice`` (with ``tag(log|int)``)."""
    sweep, key = override.value(), override.get_key_element()
    tags = set(sweep.tags)
    if tags - {"log", "int"}:
        raise FdfaError(
            f"sweep param {key}: unknown tag {sorted(tags - {'log', 'int'})}; "
            "use tag(log, interval(a, b)) or tag(int, interval(a, b))"
        )
    if isinstance(sweep, ChoiceSweep):
        if tags:
            raise FdfaError(
                f"sweep param {key}: tags apply to interval() and range(), not choice()"
            )
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())  # like Python's range: the stop is excluded
        if not values:
            raise FdfaError(f"sweep param {key}: {override.input_line} is empty")
        low, high, step = min(values), max(values), abs(sweep.step)
        if "log" in tags and len(values) > 1:
            raise FdfaError(f"sweep param {key}: a log scale needs interval(), not range()")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(low, high, step=step)
        return FloatDistribution(low, high, step=step)
    if isinstance(sweep, IntervalSweep):
        if not sweep.start < sweep.end:
            raise FdfaError(f"sweep param {key}: interval({sweep.start}, {sweep.end}) is empty")
        if "log" in tags and sweep.start <= 0:
            raise FdfaError(f"sweep param {key}: a log interval needs a positive start")
        if "int" in tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log="log" in tags)
        return FloatDistribution(sweep.start, sweep.end, log="log" in tags)
    raise FdfaError(f"sweep param {key}: {override.input_line} is not interval, range or choice")


def first_value(dist) -> Any:
    return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low


def search_space(config_loader, params: dict, arguments: list[str]):
    """(name -> distribution, fixed overrides) from hydra.sweeper.params and the command line
    (which wins for a key given in both)."""
    parser = OverridesParser.create(config_loader=config_loader)
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    try:
        overrides = parser.parse_overrides(lines)
    except Exception as err:
        raise FdfaError(f"cannot parse the sweep's params: {one_line(err)}") from err
    space, fixed = {}, {}
    for override in overrides:
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = to_distribution(override)
        else:
            fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
    if not space:
        raise FdfaError(
            "the sweep has nothing to search: give hydra.sweeper.params (see sweeps/*.yaml) "
            "or a sweep override such as optimizer.lr='tag(log,interval(1e-5,1e-2))'"
        )
    return space, list(fixed.values())


def probe_points(space: dict) -> list[dict]:
    """One point at every distribution's low, plus one per other categorical value: the configs
    that must compose before any trial runs."""
    base = {k: first_value(d) for k, d in space.items()}
    return [base] + [
        {**base, k: c}
        for k, d in space.items()
        if isinstance(d, CategoricalDistribution)
        for c in d.choices[1:]
    ]


def job_overrides(fixed: list[str], params: dict, *extra: str) -> list[str]:
    """A job's overrides: the fixed ones, then the sampled params, then ``extra``."""
    return [*fixed, *(f"{k}={override_value(v)}" for k, v in params.items()), *extra]
