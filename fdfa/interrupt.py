"""SIGINT (Ctrl-C) and SIGTERM (what SLURM and `kill` send first) as a clean stop of a run, and
of the worker processes a sweep command started (``passing_signals_to``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from contextlib import contextmanager

from fdfa.errors import Interrupted

_CHILDREN: list = []  # processes (Popen) sent each SIGINT/SIGTERM this one gets


@contextmanager
def passing_signals_to(children):
    """While entered, every SIGINT and SIGTERM this process gets under a SignalHandler (the
    sweeper's or a run's, whichever is installed then) is sent on to ``children``: the worker
    processes (Popen) it started, in their own process group so that a terminal's Ctrl-C reaches
    each of them once, through this one."""
    children = list(children)
    _CHILDREN.extend(children)
    try:
        yield
    finally:
        for child in children:
            _CHILDREN.remove(child)


class SignalHandler:
    """While entered (``with``), SIGINT and SIGTERM call ``self._handle(signum, frame)``; the
    previous handlers come back at the end of the block. Only in the main thread (Python lets no
    other thread set handlers): elsewhere entering changes nothing. The one place that installs
    and restores them, for a run (StopSignals below) and for a sweep's worker (the sweeper's);
    each signal goes on to the children of ``passing_signals_to`` first."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._receive)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _receive(self, signum, frame) -> None:
        for child in _CHILDREN:
            with contextlib.suppress(OSError):
                child.send_signal(signum)  # nothing once it has exited (and been reaped)
        self._handle(signum, frame)

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError


class StopSignals(SignalHandler):
    """``with StopSignals() as stop:`` catches SIGINT and SIGTERM (see SignalHandler).

    Outside ``stop.deferred()`` a signal raises Interrupted at once: nothing is lost while a run
    is still being built. Inside it, the first signal only sets ``stop.signum``; the training
    loop looks at it after each step, writes last.ckpt and raises Interrupted itself. A second
    signal raises at once (the last checkpoint written stays intact)."""

    def __init__(self):
        self.signum: int | None = None
        self._deferring = False

    @contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._deferring and self.signum is None:
            self.signum = signum  # the loop stops after this step
            return
        if self._deferring:
            raise Interrupted(
                signum,
                f"interrupted by {name} a second time: stopped at once; the last "
                "checkpoint written is intact",
            )
        raise Interrupted(
            signum,
            f"interrupted by {name} before training started",
        )
