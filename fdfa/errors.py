"""The exception types fdfa raises for what a user can fix or did on purpose, and the one helper
that turns any error into a line: run.py prints these as one line, never a traceback."""

from __future__ import annotations

import errno
import signal


class FdfaError(Exception):
    """A problem the user can fix (missing data, bad option); the message says how."""


class DivergedError(FdfaError):
    """The training loss became NaN or infinite; the run stops at once."""


class RunDirRefused(FdfaError):
    """The run dir belongs to another run (a live one, or a checkpoint of another config): the
    attempt stops before writing anything there, so the run dir stays as it was."""


class DiskFullError(FdfaError):
    """A write found no space left (or the quota spent); its temp file is removed and the file it
    would have replaced (e.g. the previous last.ckpt) is intact."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run. Raised after the step under way finished and last.ckpt
    and summary.json (status ``interrupted``) were written, so rerunning the same command
    resumes exactly; a second signal raises it at once (the last checkpoint on disk is intact).

    A KeyboardInterrupt, not an Exception: ``except Exception`` handlers (Hydra's job runner, a
    sweeper's catch-all) let it through, so the process stops, as on Ctrl-C. ``exit_code`` is the
    shell's convention for death by that signal: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def one_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's message (its type's name when it has none), at most
    ``limit`` characters: for messages that quote another library's error."""
    text = (str(err).strip().splitlines() or [""])[0].strip().rstrip(":")
    if not text and isinstance(err, BaseException):
        text = type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_fdfa_error(err: BaseException) -> FdfaError | None:
    """The FdfaError behind ``err``, if any (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, FdfaError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` or an error behind it is "no space left" or "quota exceeded" (torch.save
    reports a full disk as a RuntimeError whose context is the OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False
