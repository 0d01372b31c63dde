"""The comparison protocol: choose on validation data, read the test set once, interval over seeds.

- ``select_epoch(records)``: the epoch with the best ``val/acc`` (the first on ties) and the test
  accuracy there. A run without a validation set selects its last epoch, never the max over
  epochs: that max is chosen on the test set itself and overstates it.
- ``mean_ci(values)``: mean and half-width of the two-sided Student-t confidence interval,
  ``t_{1-a/2, n-1} * s / sqrt(n)`` with s the sample standard deviation.
"""

from __future__ import annotations

import math
import statistics


def evaluation_records(records: list[dict]) -> list[dict]:
    """The per-epoch evaluation records (the ones with ``test/acc``), not the metrics records."""
    return [r for r in records if "test/acc" in r]


def select_epoch(records: list[dict]) -> dict:
    """``best/val/acc``, ``best/epoch`` and ``selected/test/acc`` of a run's records (all None
    before the first evaluation); ``best/val/acc`` is None for a run without a validation set."""
    evaluations = evaluation_records(records)
    if not evaluations:
        return {"best/val/acc": None, "best/epoch": None, "selected/test/acc": None}
    if all("val/acc" in r for r in evaluations):
        chosen = evaluations[0]
        for r in evaluations[1:]:
            if r["val/acc"] > chosen["val/acc"]:  # strictly: the first of equal ones stays
                chosen = r
        best_val = chosen["val/acc"]
    else:
        chosen, best_val = evaluations[-1], None
    return {
        "best/val/acc": best_val,
        "best/epoch": chosen["epoch"],
        "selected/test/acc": chosen["test/acc"],
    }


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's T with an integer ``df`` >= 1, in closed form (Abramowitz &
    Stegun 26.7.3-4): a finite series in cos(theta), theta = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        return 2 / math.pi * (theta + s * math.cos(theta) * series)
    term, series = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        series += term
    return s * series


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p in (0.5, 1)) of Student's t with ``df`` degrees of freedom, by
    bisection on the exact distribution function (to 1e-12)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    mass = 2 * p - 1  # P(|T| <= q)
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < mass:
        hi *= 2
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < mass else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of its ``level`` Student-t interval (None for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, t_quantile((1 + level) / 2, len(values) - 1) * sem
