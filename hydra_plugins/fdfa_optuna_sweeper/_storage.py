"""Where a study lives: an Optuna storage from a URL, the lock every worker of one study takes,
opening (or creating) the study when many workers start at once, and the sweep dir's claim: a
sweep dir belongs to one study (``<sweep dir>/study.yaml``)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import random
import time
from pathlib import Path

import optuna
import sqlalchemy
from omegaconf import OmegaConf

from fdfa.errors import FdfaError

from ._space import one_line

log = logging.getLogger(__name__)


def make_storage(url: str):
    """An Optuna storage from a SQLAlchemy URL or ``journal:PATH``."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:") :]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs = {}
    if sqlalchemy.engine.make_url(url).get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 120}  # wait for other workers' writes, don't fail
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def printable_url(url: str) -> str:
    if url.startswith("journal:"):
        return url
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


class StudyLock:
    """A lock every worker of one study can take, kept where the study is kept."""

    def __init__(self, url: str, study_name: str):
        self.path = self.engine = None
        if url.startswith("journal:"):
            self.path = Path(url[len("journal:") :]).expanduser().with_suffix(".lock")
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


def open_study(url: str, name: str, direction: str, sampler=None, pruner=None):
    """(study, storage, lock): the study created or loaded; many workers may do this at once."""
    last = None
    for attempt in range(6):
        try:
            lock = StudyLock(url, name)
            with lock():
                storage = make_storage(url)
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
