"""Where an Optuna study lives: a journal file in the workspace (no server), or any Optuna RDB URL.

Both fail a trial whose worker sent no heartbeat for ``2 * tune.heartbeat_seconds`` and hand it to ``on_stale``.
An RDB is checked when opened (a bad URL or an unreachable database is one line naming ``--storage``), and a worker
waits out a database outage of up to ``tune.heartbeat_seconds``, retrying each storage call.
``FEDTUNE_OPTUNA_STORAGE`` (set by compose.yaml) stands in for an empty ``tune.storage``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
import threading
import time
from pathlib import Path

from training.config import Config, ConfigError

TABLE_RACE_TRIES = 5  # attempts to open a fresh RDB that other workers are setting up at the same moment
CONNECT_TIMEOUT = 5  # seconds one connection attempt may take: an unreachable host fails in seconds, not minutes
MAX_BACKOFF = 2.0  # seconds between retries during an outage, so a worker resumes within 2 s of the database
ACCEPTED = ("postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE (workers on many machines), sqlite:///PATH "
            "(one machine), or empty for the journal file beside the MLflow store")


class StorageUnavailable(RuntimeError):
    """The study's database did not answer for as long as a worker waits; ``str()`` is the paragraph shown."""


@contextlib.contextmanager
def quiet():
    """Silences Optuna's notes that the heartbeat, its helpers and some plots are "experimental" (for years now)."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def journal_path() -> Path:
    """Beside the embedded MLflow store in use (wherever MLFLOW_TRACKING_URI puts it), else in ``mlruns/``."""
    from training import store
    from training.tracking import STORE, tracking_uri

    return (store.directory(tracking_uri()) or STORE.resolve()) / "optuna" / "journal.log"


def open_storage(config: Config, on_stale):
    """(storage, how to show it): an RDB URL from ``tune.storage``, else the workspace's journal file.

    Both fail a trial whose worker sent no heartbeat for ``2 * tune.heartbeat_seconds`` and queue it again.
    """
    url = config.tune.storage or os.environ.get("FEDTUNE_OPTUNA_STORAGE", "")
    if url:
        return rdb_storage(url, config.tune.heartbeat_seconds, on_stale), masked(url)
    path = journal_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return journal_with_heartbeat(path, config.tune.heartbeat_seconds, on_stale), str(path)


def masked(url: str) -> str:
    """The URL as shown to people: its password replaced by ***, even when the URL does not parse."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def rdb_storage(url: str, interval: int, on_stale):
    """Optuna's RDB storage, checked now (one line naming ``--storage`` when it cannot be used), that waits out an
    outage of up to ``interval`` seconds: longer, and the other workers' heartbeat check takes the trial for lost."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    engine_kwargs = {"pool_pre_ping": True, "connect_args": connect_args(url)}  # a pooled connection may be stale
    probe(url, engine_kwargs)
    for attempt in range(TABLE_RACE_TRIES):
        try:
            with quiet():
                return patient_rdb_storage()(url, patience=interval, engine_kwargs=engine_kwargs,
                                             heartbeat_interval=interval, grace_period=2 * interval,
                                             heartbeat_stale_trial_callback=on_stale)
        except (IntegrityError, OperationalError, ProgrammingError):
            # workers starting together on a fresh database race to create Optuna's tables (a duplicate, or a
            # deadlock PostgreSQL breaks by failing one of them); the losers retry
            if attempt == TABLE_RACE_TRIES - 1:
                raise
            time.sleep(1)


def probe(url: str, engine_kwargs: dict) -> None:
    """One connection, so that a database that cannot be reached is told apart from a race over its tables."""
    import sqlalchemy
    from sqlalchemy.exc import OperationalError

    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        with engine.connect():
            pass
    except OperationalError as err:
        raise storage_error(url, f"cannot connect ({first_line(err.orig or err)})") from err
    finally:
        engine.dispose()


def connect_args(url: str) -> dict:
    """A short connect timeout for network databases; also where a bad URL is refused, before anything connects."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
        dialect.import_dbapi()
    except NoSuchModuleError:  # before its base class, ArgumentError
        raise storage_error(url, f"unknown database scheme {url.split('://')[0]!r}") from None
    except ArgumentError:
        raise storage_error(url, "not a database URL") from None
    except ImportError as err:
        raise storage_error(url, f"its driver is not installed ({err.name or err})") from None
    return {} if parsed.get_backend_name() == "sqlite" else {"connect_timeout": CONNECT_TIMEOUT}


def storage_error(url: str, problem: str) -> ConfigError:
    return ConfigError(f"--storage (tune.storage) {masked(url)}: {problem}. Use {ACCEPTED}")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def connection_error(err: BaseException) -> BaseException | None:
    """The database error behind ``err`` when it is one a retry can cure: the connection failed or was lost.

    Optuna wraps it in a StorageInternalError whose message blames "invalid data ... e.g. exceeding max length".
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    while err is not None and not isinstance(err, StorageUnavailable):  # already waited for
        if isinstance(err, OperationalError) or (isinstance(err, DBAPIError) and err.connection_invalidated):
            return err
        err = err.__cause__
    return None


class Outage:
    """Retries calls while the database is unreachable, for up to ``patience`` seconds from the first failure.

    Shared by the worker's threads (trial and heartbeat); once the patience is spent, calls fail at once with the
    same ``StorageUnavailable``, so unwinding a trial costs no second wait.
    """

    def __init__(self, shown: str, patience: float):
        self.shown, self.patience = shown, patience
        self.since: float | None = None  # monotonic time of the first failure of this outage
        self.error: StorageUnavailable | None = None  # set when the patience ran out
        self._lock = threading.Lock()

    def call(self, function, *args, **kwargs):
        delay = 0.25
        while True:
            try:
                result = function(*args, **kwargs)
            except Exception as err:
                cause = connection_error(err)
                if cause is None:
                    raise
                remaining = self._failed(cause)
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, MAX_BACKOFF)
                continue
            self._answered()
            return result

    def _failed(self, cause: BaseException) -> float:
        """Seconds of patience left; raises ``StorageUnavailable`` when none are."""
        with self._lock:
            now = time.monotonic()
            if self.since is None:
                self.since = now
                print(f"fedtune: the Optuna storage {self.shown} does not answer ({first_line(cause.orig or cause)}); "
                      f"waiting up to {self.patience} s (tune.heartbeat_seconds) for it", file=sys.stderr, flush=True)
            remaining = self.since + self.patience - now
            if remaining <= 0:
                self.error = self.error or StorageUnavailable(
                    f"the Optuna storage {self.shown} did not answer for {self.patience} s (tune.heartbeat_seconds; "
                    f"{first_line(cause.orig or cause)}), so this worker stopped. Nothing finished is lost: run the "
                    f"same command again when the database is back; it resumes the study, and the interrupted trial "
                    f"is failed by its heartbeat and retried with the same params")
                raise self.error from cause
            return remaining

    def _answered(self) -> None:
        with self._lock:
            if self.since is not None and self.error is None:
                print(f"fedtune: the Optuna storage {self.shown} answers again after "
                      f"{time.monotonic() - self.since:.0f} s; continuing", file=sys.stderr, flush=True)
            self.since = None


def unavailable(storage) -> StorageUnavailable | None:
    """The outage that stopped this worker, if one did (Optuna may have raised something else while unwinding)."""
    outage = getattr(storage, "outage", None)
    return outage.error if outage is not None else None


def _patient(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return self.outage.call(method, self, *args, **kwargs)

    return call


@functools.cache
def patient_rdb_storage() -> type:
    """Built on first use, so that importing this module does not import Optuna (``fedtune --help`` stays fast)."""
    from optuna.storages import RDBStorage

    class PatientRDBStorage(RDBStorage):
        """RDBStorage whose every database call is retried through an outage (``Outage``)."""

        def __init__(self, url: str, patience: float, **kwargs):
            self.outage = Outage(masked(url), patience)
            super().__init__(url, **kwargs)

        def record_heartbeat(self, trial_id: int) -> None:
            # Past the patience the trial's own thread reports the outage; a missed beat is what staleness is for.
            with contextlib.suppress(StorageUnavailable):
                self.outage.call(RDBStorage.record_heartbeat, self, trial_id)

    # every method that reads or writes the database (the ones _CachedStorage and the heartbeat call included)
    for name, method in vars(RDBStorage).items():
        if inspect.isfunction(method) and not name.startswith("__") and name not in vars(PatientRDBStorage):
            setattr(PatientRDBStorage, name, _patient(method))
    return PatientRDBStorage


def journal_with_heartbeat(path: Path, interval: int, on_stale):
    """Optuna's journal storage plus the heartbeat that Optuna 5 gives only its RDB storage.

    The beat is a trial system attr, and a running trial whose last beat (or start) is older than twice the
    interval is stale; Optuna's own loop then fails and retries it exactly as on an RDB.
    """
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat  # the extension point Optuna's RDB storage implements
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    class HeartbeatJournal(JournalStorage, BaseHeartbeat):
        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, "fedtune:heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            # a retried trial inherits its original's old beat: its fresh start time counts as a beat
            last = {t._trial_id: max(t.system_attrs.get("fedtune:heartbeat", 0.0), t.datetime_start.timestamp())
                    for t in running}
            return [trial_id for trial_id, beat in last.items() if time.time() - beat > 2 * interval]

        def get_heartbeat_interval(self) -> int:
            return interval

        def get_heartbeat_stale_trial_callback(self):
            return on_stale

    return HeartbeatJournal(JournalFileBackend(str(path)))
