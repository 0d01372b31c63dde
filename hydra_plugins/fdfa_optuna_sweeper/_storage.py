"""Where a study lives: an Optuna storage from a URL, the lock every worker of one study takes,
opening (or creating) the study when many workers start at once, and the sweep dir's claim: a
sweep dir belongs to one study (``<sweep dir>/study.yaml``).

Opening a storage also checks it can be used (_journal.py: a journal file's torn last record is
cut, a broken record refused; a locked SQLite file is waited for, saying so within seconds, for
``hydra.sweeper.storage_timeout_s`` at most), and a storage that fails mid-sweep (locked, disk
full) stops the worker with one line (``storage_failure``)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import random
import sqlite3
import time
from pathlib import Path

import optuna
import sqlalchemy
from omegaconf import OmegaConf

from fdfa.errors import FdfaError, error_chain, is_disk_full

from ._journal import check_journal
from ._space import one_line

log = logging.getLogger(__name__)


STORAGE_TIMEOUT_S = 300.0  # hydra.sweeper.storage_timeout_s's default (config.py)
NOTICE_S = 2.0  # a wait for a locked SQLite file is announced after this many seconds


def make_storage(url: str, timeout_s: float = STORAGE_TIMEOUT_S):
    """An Optuna storage from a SQLAlchemy URL or ``journal:PATH`` (its records checked first);
    a SQLite statement waits ``timeout_s`` at most for another process's lock."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = JournalFileBackend(str(path))
        check_journal(path)
        return JournalStorage(backend)
    kwargs = {}
    if sqlite_file(url) is not None:
        kwargs["connect_args"] = {"timeout": timeout_s}  # other workers' writes: wait, not fail
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def journal_path(url: str) -> Path:
    return Path(url[len("journal:") :]).expanduser()


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for other storages (and in-memory SQLite)."""
    if url.startswith("journal:"):
        return None
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def wait_while_locked(url: str, timeout_s: float) -> None:
    """Return once a SQLite study's file could be written (another process may hold it in a
    transaction); say so after NOTICE_S, and raise FdfaError after ``timeout_s``."""
    db = sqlite_file(url)
    if db is None or not db.is_file():
        return
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        wait = max(0.0, min(NOTICE_S, deadline - time.monotonic()))
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=wait, isolation_level=None)) as c:
                c.execute("BEGIN IMMEDIATE")  # the lock a write takes; given back at once
                c.execute("ROLLBACK")
            if told:
                log.info("%s is free again: going on", db)
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err):
                return  # not a lock (e.g. not a database): opening the study will say what
        if time.monotonic() >= deadline:
            raise FdfaError(locked_message(db, timeout_s))
        if not told:
            told = True
            log.warning(
                "waiting for the study's SQLite file %s: another process holds it locked (an "
                "open transaction; see: fuser %s); giving up after %g s "
                "(hydra.sweeper.storage_timeout_s)",
                db,
                db,
                timeout_s,
            )


def locked_message(db: Path, timeout_s: float) -> str:
    return (
        f"the study's SQLite file {db} stayed locked for {timeout_s:g} s: another process holds "
        f"a transaction open on it (find it with: fuser {db}); end that process and rerun, or "
        "wait longer with hydra.sweeper.storage_timeout_s=<seconds>"
    )


def storage_failure(err: BaseException, url: str, timeout_s: float) -> FdfaError | None:
    """One line for a storage error a user can fix (a SQLite file locked too long, a full disk),
    found anywhere in ``err``'s chain (Optuna wraps SQLAlchemy's errors); None for others."""
    chain = list(error_chain(err))
    db = sqlite_file(url)
    if db is not None and any("database is locked" in str(e).lower() for e in chain):
        return FdfaError(locked_message(db, timeout_s))
    full = [e for e in chain if is_disk_full(e) or "disk is full" in str(e).lower()]
    if full:
        return FdfaError(
            f"no space left on the disk of the study ({printable_url(url)}) or of the sweep dir "
            f"({one_line(full[-1], limit=80)}): free space and rerun the same command; "
            "unfinished trials are redone"
        )
    return None


def printable_url(url: str) -> str:
    if url.startswith("journal:"):
        return url
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


class StudyLock:
    """A lock every worker of one study can take, kept where the study is kept."""

    def __init__(self, url: str, study_name: str):
        self.path = self.engine = None
        if url.startswith("journal:"):  # not <journal>.lock: Optuna's own lock file for writes
            journal = journal_path(url)
            self.path = journal.with_name(journal.name + ".fdfa-lock")
            return
        parsed = sqlalchemy.engine.make_url(url)
        backend = parsed.get_backend_name()
        name = f"fdfa-optuna:{study_name}"
        if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
            self.path = Path(parsed.database + ".lock")
        elif backend == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            self._sql = ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)")
            self._args = {"key": key}
        elif backend in ("mysql", "mariadb"):
            self._sql = ("SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)")
            self._args = {"key": name[:64]}
        else:
            log.warning(
                "no lock for %s storages: with several workers the study may get up to "
                "(workers - 1) more trials than n_trials",
                backend,
            )
            return
        if self.path is None:
            self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    @contextlib.contextmanager
    def __call__(self):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        elif self.engine is not None:
            with self.engine.connect() as conn:
                conn.execute(sqlalchemy.text(self._sql[0]), self._args)
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text(self._sql[1]), self._args)
        else:
            yield


def open_study(
    url: str,
    name: str,
    direction: str,
    sampler=None,
    pruner=None,
    timeout_s: float = STORAGE_TIMEOUT_S,
):
    """(study, storage, lock): the study created or loaded; many workers may do this at once.
    A locked SQLite file is waited for ``timeout_s`` at most (hydra.sweeper.storage_timeout_s)."""
    last = None
    for attempt in range(6):
        try:
            lock = StudyLock(url, name)
            with lock():
                wait_while_locked(url, timeout_s)
                storage = make_storage(url, timeout_s)
                verbosity = optuna.logging.get_verbosity()
                optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "Using an existing"
                try:
                    study = optuna.create_study(
                        study_name=name,
                        storage=storage,
                        sampler=sampler,
                        pruner=pruner,
                        direction=direction,
                        load_if_exists=True,
                    )
                finally:
                    optuna.logging.set_verbosity(verbosity)
            break
        except ImportError as err:
            raise FdfaError(
                f"storage {printable_url(url)} needs a database driver: {one_line(err)} "
                "(PostgreSQL: pip install 'psycopg[binary]')"
            ) from err
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.DuplicatedStudyError) as err:
            failure = storage_failure(err, url, timeout_s)
            if failure is not None:  # locked for timeout_s already, or no space: no retry
                raise failure from err
            last = err  # two workers creating tables or the study at once: try again
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    else:
        raise FdfaError(f"cannot open study {name!r} in {printable_url(url)}: {one_line(last)}")
    if study.direction.name.lower() != direction:
        raise FdfaError(
            f"study {name!r} in {printable_url(url)} was created to "
            f"{study.direction.name.lower()}, but hydra.sweeper.direction={direction}; "
            "use another hydra.sweeper.study_name"
        )
    return study, storage, lock


STUDY_FILE = "study.yaml"  # in a sweep dir: the study (name, storage) whose trials it holds


def claim_sweep_dir(sweep_dir: Path, name: str, url: str) -> None:
    """Make ``sweep_dir`` this study's, or refuse (FdfaError) when it holds another study's
    trials: before the sweep touches anything there, so a running trial's dir stays as it is.
    A dir of an older fdfa (no study.yaml) is known by its optimization_results.yaml."""
    mine = {"study_name": name, "storage": printable_url(url)}
    path = sweep_dir / STUDY_FILE
    owner = _recorded_owner(sweep_dir)
    if owner is None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("x") as f:  # the first of two commands started at once wins
                f.write(OmegaConf.to_yaml(mine))
        except FileExistsError:
            pass
        owner = _recorded_owner(sweep_dir) or mine
    if owner != mine:
        raise FdfaError(
            f"{sweep_dir} holds the trials of study {owner['study_name']!r} "
            f"({owner['storage']}), not of {name!r}: give this sweep its own dir with "
            f"hydra.sweep.dir=<new dir>, or continue that study with "
            f"hydra.sweeper.study_name={owner['study_name']} and its storage"
        )


def _recorded_owner(sweep_dir: Path) -> dict | None:
    for name in (STUDY_FILE, "optimization_results.yaml"):
        try:
            found = OmegaConf.to_container(OmegaConf.load(sweep_dir / name))
        except Exception:  # missing, or half written by a command starting now
            continue
        if isinstance(found, dict) and "study_name" in found:
            return {"study_name": found["study_name"], "storage": found.get("storage")}
    return None
