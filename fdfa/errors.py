"""The exception types fdfa raises for what a user can fix or did on purpose; ``one_line``, the
one helper that turns any error into a line; and ``user_errors``, the one place where a command
(fdfa/cli.py, the report, the benchmark, the sweeper) turns them into ``error: <line>`` and exit
code 2, never a traceback."""

from __future__ import annotations

import errno
import os
import re
import signal
import sys


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


class OptionError(FdfaError, ValueError):
    """A bad option value (``algorithm.*``, ``dataset.*``, ...). Also a ValueError, the type Python
    code expects from a constructor."""


RERUN = "rerun with the same run dir to resume"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run. Raised after the step under way finished and last.ckpt
    and summary.json (status ``interrupted``) were written, so a rerun with the same run dir
    resumes exactly; a second signal raises it at once (the last checkpoint on disk is intact).

    A KeyboardInterrupt, not an Exception: ``except Exception`` handlers (Hydra's job runner, a
    sweeper's catch-all) let it through, so the process stops, as on Ctrl-C. ``exit_code`` is the
    shell's convention for death by that signal: 130 for SIGINT, 143 for SIGTERM.

    ``how_to_resume`` ends the message: the command line (fdfa/cli.py) puts the exact command
    there, with the run dir filled in; Python callers rerun ``train()`` with the same dir."""

    def __init__(self, signum: int, message: str, how_to_resume: str = RERUN):
        super().__init__(message)
        self.signum = signum
        self.how_to_resume = how_to_resume

    def __str__(self) -> str:
        return f"{self.args[0]}; {self.how_to_resume}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def one_line(
    err: BaseException | str, limit: int | None = 200, *, whole: bool = False, typed: bool = False
) -> str:
    """An error's message as one line of at most ``limit`` characters (None: no limit): its first
    line (for messages that quote another library's error), or with ``whole`` all of it with its
    whitespace collapsed (for a parser's message that explains itself on later lines). ``typed``
    puts the error's type first (``OSError: ...``); a message-less error gives its type's name."""
    text = str(err).strip()
    text = " ".join(text.split()) if whole else (text.splitlines() or [""])[0].strip().rstrip(":")
    if isinstance(err, BaseException) and (typed or not text):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def error_chain(err: BaseException | None):
    """``err``, then the error it was raised from or during, and so on (each once)."""
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def find_fdfa_error(err: BaseException) -> FdfaError | None:
    """The FdfaError behind ``err``, if any (Hydra wraps errors raised while instantiating)."""
    return next((e for e in error_chain(err) if isinstance(e, FdfaError)), None)


class user_errors:  # noqa: N801 (used as a context manager, like contextlib's)
    """``with user_errors():`` around a command's work: an FdfaError (also behind Hydra's
    wrapping, found by ``find_fdfa_error``) or one of the ``also`` types becomes ``error: <the
    message as one line>`` on stderr and exit code 2 (the error's ``exit_code`` if it has one);
    Interrupted prints its message and exits with its code (130 / 143). Anything else is a bug
    and propagates with its traceback.

    ``on_error(err, line)`` sees the error and the line first (e.g. to copy it to run.log).
    ``exit=False`` returns instead of exiting: the code is then ``.exit_code`` (0: no error).
    ``active=False`` lets everything through (a sweeper's job: the sweeper records the failure)."""

    def __init__(self, also=(), on_error=None, exit: bool = True, active: bool = True):
        self.also, self.on_error, self.exit, self.active = tuple(also), on_error, exit, active
        self.exit_code = 0

    def __enter__(self) -> user_errors:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or not self.active:
            return False
        if isinstance(err, Interrupted):  # last.ckpt and summary.json are written; a rerun resumes
            line, code = str(err), err.exit_code
        elif isinstance(err, Exception):
            user_error = find_fdfa_error(err)
            if user_error is None and not isinstance(err, self.also):
                return False  # a bug: its traceback
            user_error = user_error or err
            line, code = f"error: {one_line(user_error, None, whole=True)}", 2
            code = getattr(user_error, "exit_code", code)
            if self.on_error is not None:
                self.on_error(user_error, line)
        else:
            return False
        print(line, file=sys.stderr)
        self.exit_code = code
        if self.exit:
            raise SystemExit(code) from None
        return True


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` or an error behind it is "no space left" or "quota exceeded" (torch.save
    reports a full disk as a RuntimeError whose context is the OSError)."""
    return any(isinstance(e, OSError) and e.errno in NO_SPACE for e in error_chain(err))


NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)  # also an immutable file (chattr +i)


def machine_refusal(err: BaseException, resume: str) -> FdfaError | None:
    """The one-line error for what the machine refused and the user can fix, behind ``err``: a
    path that may not be changed (permission, an immutable file or folder, a read-only file
    system: ``resume`` follows the fix) or memory that cannot be allocated (a model too large);
    None for anything else (a bug, or an FdfaError: it has its line)."""
    if find_fdfa_error(err) is not None:
        return None
    for e in error_chain(err):
        if isinstance(e, OSError) and e.errno in NOT_PERMITTED and e.filename:
            path = str(e.filename)  # a file to change, or one a write would have made
            what = f"change {path}" if os.path.exists(path) else f"write in {os.path.dirname(path)}"
            return FdfaError(
                f"cannot {what} ({e.strerror}): make it writable (chmod u+w, or chattr -i if "
                f"immutable), then {resume}"
            )
        if isinstance(e, MemoryError) or re.search(r"out of memory|can't allocate", str(e)):
            wanted = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]iB)", str(e))
            size = f" ({int(wanted[1]) / 1e9:.1f} GB wanted)" if wanted and wanted[1] else ""
            size = f" ({wanted[2]} wanted)" if wanted and wanted[2] else size
            building = re.search(r"full_key: ([\w.]+)", str(err))
            where = f" building {building[1]}" if building else ""
            return FdfaError(
                f"out of memory{where}{size}: choose a smaller model (model.width, ...) or "
                "dataset.batch_size, or free memory"
            )
    return None
