"""Split a training set over K clients: the paper's IID split and three non-IID ones (label-sorted shards,
Dirichlet label skew, Dirichlet quantity skew), as pure functions of (labels, K, scheme, alpha, seed), optionally
into equal shards with the remainder dropped (the paper's protocol).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from training.config import Config, ConfigError

MAX_DRAWS = 100  # Dirichlet redraws before a split that leaves a client without data is reported
EQUAL_SCHEMES = ("iid", "shards")  # the schemes whose clients differ in size by one row at most


def partition(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int,
              drop_remainder: bool = False) -> list[np.ndarray]:
    """Per client 0..K-1, the sorted int64 indices of its training rows; every row goes to exactly one client, or
    with ``drop_remainder`` every client gets floor(n/K) rows and the n mod K rows left over, drawn at random, none."""
    labels = np.asarray(labels)
    if scheme not in SCHEMES:
        raise ConfigError(f"partition.scheme: must be one of {tuple(SCHEMES)}, got {scheme!r}")
    if not 1 <= num_clients <= len(labels):
        raise ConfigError(f"fl.num_clients: must be between 1 and the {len(labels)} training rows, got {num_clients}")
    if alpha <= 0:
        raise ConfigError(f"partition.alpha: must be > 0, got {alpha}")
    if drop_remainder and scheme not in EQUAL_SCHEMES:
        raise ConfigError(f"partition.drop_remainder: cuts equal shards, so it applies to {EQUAL_SCHEMES} only; "
                          f"{scheme} sizes clients unequally by design, so set it false")
    rng = np.random.default_rng(seed)
    kept = np.arange(len(labels))
    # drop_remainder keeps a random n - n mod K rows, drawn only when there is a remainder: a split without one is
    # the same as without drop_remainder
    if drop_remainder and len(labels) % num_clients:
        kept = np.sort(rng.permutation(len(labels))[:len(labels) // num_clients * num_clients])
    parts = SCHEMES[scheme](labels[kept], num_clients, alpha, rng)
    return [np.sort(kept[part]).astype(np.int64) for part in parts]


def by_config(labels: np.ndarray, config: Config) -> list[np.ndarray]:
    """``partition`` with a run's K, scheme, alpha, seed and drop_remainder: its training split, and with
    fl.evaluation=clients the same cut of its test split."""
    p = config.partition
    return partition(labels, config.fl.num_clients, p.scheme, p.alpha, p.seed, p.drop_remainder)


def _iid(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(labels)), k)


def _shards(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    # the authors' non-IID split: contiguous runs of the label-sorted rows, so each client sees one or two labels
    return np.array_split(np.argsort(labels, kind="stable"), k)


def _dirichlet(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(MAX_DRAWS):
        pieces = [_cut(rows, rng.dirichlet(np.full(k, alpha))) for rows in by_class]
        parts = [np.concatenate(client) for client in zip(*pieces)]
        if min(len(part) for part in parts) > 0:
            return parts
    raise ConfigError(f"partition.alpha / fl.num_clients: with alpha={alpha}, {MAX_DRAWS} Dirichlet draws each left "
                      f"at least one of {k} clients without data; raise partition.alpha or lower fl.num_clients")


def _quantity(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    rows = rng.permutation(len(labels))
    # one row per client up front, so a tiny Dirichlet share still leaves no client empty
    shares = _cut(rows[k:], rng.dirichlet(np.full(k, alpha)))
    return [np.append(rows[i], share) for i, share in enumerate(shares)]


def _cut(rows: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """``rows`` cut in order into one run per proportion, sized by the proportions."""
    return np.split(rows, np.round(np.cumsum(proportions)[:-1] * len(rows)).astype(int))


SCHEMES = {"iid": _iid, "shards": _shards, "dirichlet": _dirichlet, "quantity": _quantity}


def client_stats(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> list[dict]:
    """Per client its size and label histogram, for logs and reports."""
    return [{"client": i, "size": len(part), "label_counts": np.bincount(labels[part], minlength=num_classes).tolist()}
            for i, part in enumerate(parts)]


def save_split(parts: list[np.ndarray], path: Path, meta: dict) -> None:
    """Write ``{"meta": meta, "clients": [[indices], ...]}``; the same input always gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "clients": [np.asarray(part).tolist() for part in parts]}
    path.write_text(json.dumps(document, sort_keys=True) + "\n")


def fingerprint(parts: list[np.ndarray]) -> str:
    """16 hex chars of sha256 over the clients' row indices: the same split gives the same string anywhere."""
    return hashlib.sha256(json.dumps([np.asarray(p).tolist() for p in parts]).encode()).hexdigest()[:16]


def load_split(path: Path, num_rows: int | None = None) -> list[np.ndarray]:
    """The clients' index arrays from a save_split file, checked by ``check_split``."""
    return read_split(path, num_rows)[0]


def read_split(path: Path, num_rows: int | None = None) -> tuple[list[np.ndarray], dict]:
    """(the clients' index arrays, checked by ``check_split``; the file's ``meta``, {} when it has none)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
        parts = [np.asarray(client, dtype=np.int64) for client in document["clients"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a readable split file ({error!r}); write it with save_split") from error
    check_split(parts, num_rows, str(path))
    meta = document.get("meta")
    return parts, meta if isinstance(meta, dict) else {}


def check_split(parts: list[np.ndarray], num_rows: int | None, where: str, drop_remainder: bool = False) -> None:
    """Every client holds rows, and (with ``num_rows``) every training row belongs to exactly one client.

    A split that leaves rows out is refused too: the training set, its size and the split's fingerprint would
    then describe different data. To train on fewer rows, lower data.max_samples and partition again. The one
    exception is ``drop_remainder`` (recorded in the split file's meta by ``fedtune partition --drop-remainder``):
    then every client must hold exactly floor(n/K) rows.
    """
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ConfigError(f"{where}: client {empty[0]} holds no rows, and a client without data cannot train; "
                          "partition again, or drop the empty client and lower fl.num_clients")
    rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
    limit = np.iinfo(np.int64).max if num_rows is None else num_rows
    outside = rows[(rows < 0) | (rows >= limit)]
    if outside.size:
        raise ConfigError(f"{where}: row {outside[0]} is not an index into the {num_rows or 'training'} rows; "
                          "the split was made for another training set, so partition again")
    values, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        raise ConfigError(f"{where}: row {values[counts > 1][0]} belongs to more than one client; partition again")
    if drop_remainder and num_rows is not None:
        sizes = sorted({len(part) for part in parts})
        if sizes != [num_rows // len(parts)]:
            raise ConfigError(f"{where}: with partition.drop_remainder every client holds the {num_rows // len(parts)} "
                              f"rows of an equal shard of the {num_rows} training rows, but these hold {sizes}; "
                              "the split was made for another training set, so partition again")
        return
    if num_rows is not None and len(rows) != num_rows:
        raise ConfigError(f"{where}: the clients hold {len(rows)} of the {num_rows} training rows, and a split must "
                          "cover them all; the split was made for another training set, so partition again (to "
                          "train on fewer rows, lower data.max_samples first)")
