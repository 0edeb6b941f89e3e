"""The embedded MLflow store: one folder holding ``mlflow.db`` and ``artifacts/``, usable wherever it is copied.

MLflow records every artifact location as an absolute path (experiments, runs, logged models, model versions,
traces) and resolves a relative one against the working directory, so a copied store would go on reading, and
writing, the original's files. fedtune gives each experiment it creates the location ``<store>/artifacts``; when a
store's runs and experiments name another folder, the store was copied or moved from there, and ``relocate``
rewrites every location under the old folder to the same place under this one, in one transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from training.config import ConfigError

DB = "mlflow.db"
ARTIFACTS = "artifacts"
SQLITE = "sqlite:///"

# Every column in which MLflow 3 keeps an artifact location, with the rows that hold one.
LOCATIONS = (
    ("experiments", "artifact_location", "1"),
    ("runs", "artifact_uri", "1"),
    ("logged_models", "artifact_location", "1"),
    ("model_versions", "source", "1"),
    ("model_versions", "storage_location", "1"),
    ("trace_tags", "value", "key = 'mlflow.artifactLocation'"),
    ("workspaces", "default_artifact_root", "1"),
)


def directory(uri: str) -> Path | None:
    """The folder of an embedded store ``sqlite:///<folder>/mlflow.db``; None for a server or any other database."""
    if not uri.startswith(SQLITE) or uri.endswith(":memory:"):
        return None
    return Path(uri.removeprefix(SQLITE)).resolve().parent


def uri(folder: Path) -> str:
    return f"{SQLITE}{(Path(folder) / DB).resolve()}"


def artifact_root(folder: Path) -> Path:
    return Path(folder).resolve() / ARTIFACTS


def open_embedded(folder: Path) -> Relocation | None:
    """Create the store (its Default experiment too keeps its artifacts inside it), or relocate a copied one."""
    folder = Path(folder).resolve()
    if (folder / DB).exists():
        return relocate(folder)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri(folder), artifact_root(folder).as_uri())  # creates the tables and the Default experiment
    return None


def local_path(location: str | None) -> Path | None:
    """The absolute path a recorded location names (``file:///...`` or a bare path); None for a remote one."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path))
    return Path(location) if parsed.scheme == "" and location.startswith("/") else None


def recorded_folder(db: sqlite3.Connection, folder: Path) -> Path | None:
    """The folder this store was copied from, when that is not ``folder`` (else None).

    MLflow keeps a run's artifacts in ``<experiment location>/<run id>/artifacts``, and fedtune's experiments sit at
    ``<store>/artifacts``. The runs whose folders came along into ``folder/artifacts`` name the old store; a store
    without runs yet is named by its experiments. Either way it must be one folder to be sure.
    """
    came_along = {path.parents[2] for run_id, location in db.execute("SELECT run_uuid, artifact_uri FROM runs")
                  if (path := local_path(location)) is not None and path.parts[-3:] == (ARTIFACTS, run_id, ARTIFACTS)
                  and (artifact_root(folder) / run_id).is_dir()}
    named = {path.parent for (location,) in db.execute("SELECT artifact_location FROM experiments")
             if (path := local_path(location)) is not None and path.name == ARTIFACTS}
    if folder in came_along | named:
        return None
    candidates = came_along or named
    if len(candidates) > 1:
        raise ConfigError(f"the MLflow store in {folder} names artifact folders in several places "
                          f"({', '.join(sorted(map(str, candidates)))}); run `fedtune relocate {folder} --from OLD` "
                          f"with the folder the store was copied from")
    return candidates.pop() if candidates else None


@dataclass(frozen=True)
class Relocation:
    old: Path
    new: Path
    rows: int  # locations rewritten

    def __str__(self) -> str:
        return (f"the MLflow store in {self.new} was copied or moved from {self.old}: {self.rows} recorded artifact "
                f"locations now point into {self.new / ARTIFACTS}")


def relocate(folder: Path, old: Path | None = None) -> Relocation | None:
    """Point the locations a store recorded under ``old`` (default: the folder it was copied from) into ``folder``.

    Unless ``old`` is given, a store whose artifacts did not come along (only ``mlflow.db`` was copied) is left
    reading the original's while they exist: they are the only copy. Returns None when there is nothing to do.
    """
    folder = Path(folder).resolve()
    if not (folder / DB).is_file():
        raise ConfigError(f"no MLflow store in {folder}: it holds no {DB}; pass the folder that does (e.g. mlruns)")
    with contextlib.closing(sqlite3.connect(folder / DB, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")  # other writers wait; readers see the old locations or the new, never a mix
        try:
            found = Path(old).resolve() if old else recorded_folder(db, folder)
            left = old is None and found is not None and not artifact_root(folder).exists() \
                and (found / ARTIFACTS).exists()
            if found is None or found == folder or left:
                db.execute("ROLLBACK")
                return None
            rows = sum(_rewrite(db, table, column, where, found, folder) for table, column, where in _present(db))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return Relocation(found, folder, rows)


def _present(db: sqlite3.Connection):
    """LOCATIONS less the tables an older MLflow schema lacks."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return [entry for entry in LOCATIONS if entry[0] in tables]


def _rewrite(db: sqlite3.Connection, table: str, column: str, where: str, old: Path, new: Path) -> int:
    """Replace the prefix ``old`` by ``new`` in ``column``, in both forms MLflow records: file URI and bare path."""
    changed = 0
    # a dict, so that a form spelled the same twice is not rewritten twice (new may lie inside old)
    for before, after in {old.as_uri(): new.as_uri(), f"file://{old}": new.as_uri(), str(old): str(new)}.items():
        changed += db.execute(
            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
            f"WHERE ({where}) AND ({column} = ? OR substr({column}, 1, ?) = ?)",
            (after, len(before) + 1, before, len(before) + 1, before + "/")).rowcount
    return changed
