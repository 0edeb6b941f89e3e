"""Where an Optuna study lives: a journal file in the workspace (no server), or any Optuna RDB URL.

Both fail a trial whose worker sent no heartbeat for ``2 * tune.heartbeat_seconds`` and hand it to ``on_stale``.
``FEDTUNE_OPTUNA_STORAGE`` (set by compose.yaml) stands in for an empty ``tune.storage``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from training.config import Config

TABLE_RACE_TRIES = 5  # attempts to open a fresh RDB that other workers are setting up at the same moment


@contextlib.contextmanager
def quiet():
    """Silences Optuna's notes that the heartbeat, its helpers and some plots are "experimental" (for years now)."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def journal_path() -> Path:
    from training.tracking import STORE

    return (STORE / "optuna" / "journal.log").resolve()


def open_storage(config: Config, on_stale):
    """(storage, how to show it): an RDB URL from ``tune.storage``, else the workspace's journal file.

    Both fail a trial whose worker sent no heartbeat for ``2 * tune.heartbeat_seconds`` and queue it again.
    """
    from sqlalchemy.engine import make_url

    url = config.tune.storage or os.environ.get("FEDTUNE_OPTUNA_STORAGE", "")
    if url:
        shown = make_url(url).render_as_string(hide_password=True)
        return rdb_storage(url, config.tune.heartbeat_seconds, on_stale), shown
    path = journal_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return journal_with_heartbeat(path, config.tune.heartbeat_seconds, on_stale), str(path)


def rdb_storage(url: str, interval: int, on_stale):
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(TABLE_RACE_TRIES):
        try:
            with quiet():
                return RDBStorage(url, heartbeat_interval=interval, grace_period=2 * interval,
                                  heartbeat_stale_trial_callback=on_stale)
        except (IntegrityError, ProgrammingError):
            # workers starting together on a fresh database race to create Optuna's tables; the losers retry
            if attempt == TABLE_RACE_TRIES - 1:
                raise
            time.sleep(1)


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
