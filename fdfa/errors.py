"""The one exception type fdfa raises for bad input: run.py prints its message as one line."""

from __future__ import annotations


class FdfaError(Exception):
    """A problem the user can fix (missing data, bad option); the message says how."""


class DivergedError(FdfaError):
    """The training loss became NaN or infinite; the run stops at once."""


def find_fdfa_error(err: BaseException) -> FdfaError | None:
    """The FdfaError behind ``err``, if any (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, FdfaError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
