"""The sweep's overall progress bar on a terminal: after each finished trial or seed run (and
while the command waits for the other workers' runs), one line with a bar over all its runs (every
study's ``n_trials`` trials and ``confirm_seeds`` seed runs; a benchmark: every rule's) and the
ETA (fdfa.progress.overall_bar). Only the command's own worker draws it, and only when its stderr
is a terminal: CI logs and worker logs get the plain per-run lines alone (_loop.py, _confirm.py).
"""

from __future__ import annotations

import sys
import time

from fdfa.progress import overall_bar

from ._confirm import confirmed_value
from ._liveness import finished_places


class OverallProgress:
    """Draws the bar for ``studies`` ((plan, study, lock) entries) on ``stream``."""

    def __init__(self, studies, n_trials: int, confirm_seeds: int, stream):
        self.studies, self.n_trials, self.confirm_seeds = studies, n_trials, confirm_seeds
        self.stream, self.started = stream, time.monotonic()
        self.done_before = self.counts()[0]  # finished by earlier commands: not in the ETA's rate
        self.last = None

    @classmethod
    def on_terminal(cls, studies, n_trials: int, confirm_seeds: int, stream=None):
        """The bar when ``stream`` (default: stderr) is a terminal, else None."""
        stream = stream or sys.stderr
        isatty = getattr(stream, "isatty", None)
        if isatty is None or not isatty():
            return None
        return cls(studies, n_trials, confirm_seeds, stream)

    def counts(self) -> tuple[int, int]:
        """(runs finished, runs in all): trials that took a place (at most n_trials a study)
        and confirmation runs with a result."""
        done = total = 0
        for plan, study, _ in self.studies:
            finished = len(finished_places(study.get_trials(deepcopy=False)))
            runs = [
                plan.sweep_dir / "confirm" / f"seed{s}"
                for s in plan.confirm_seeds(self.confirm_seeds)
            ]
            done += min(finished, self.n_trials) + sum(confirmed_value(r) is not None for r in runs)
            total += self.n_trials + self.confirm_seeds
        return done, total

    def draw(self) -> None:
        """One bar line, when the counts changed since the last one."""
        done, total = self.counts()
        if (done, total) == self.last:
            return
        self.last = (done, total)
        elapsed = time.monotonic() - self.started
        bar = overall_bar(done, total, elapsed, done - self.done_before)
        print(f"overall {bar}", file=self.stream, flush=True)
