"""Client partitions: determinism, coverage, each scheme's shape, refusals, and split files."""

import itertools
import json

import numpy as np
import pytest

from training import config
from training.config import ConfigError
from training.partition import SCHEMES, check_split, client_stats, load_split, partition, save_split


def balanced_labels(classes=5, per_class=200, seed=1):
    labels = np.repeat(np.arange(classes), per_class)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def mean_tv_from_global(parts, labels):
    """Mean total-variation distance between each client's label distribution and the whole set's."""
    classes = labels.max() + 1
    overall = np.bincount(labels, minlength=classes) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - overall).sum() for p in parts])


def test_schemes_match_the_config():
    assert tuple(SCHEMES) == config.SCHEMES


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_row_in_exactly_one_nonempty_client(scheme):
    labels = balanced_labels()
    parts = partition(labels, 7, scheme, 0.5, seed=3)
    assert len(parts) == 7 and min(len(p) for p in parts) > 0
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_same_inputs_same_bytes(scheme, tmp_path):
    labels = balanced_labels()
    for name in ("a.json", "b.json"):
        save_split(partition(labels, 5, scheme, 0.3, seed=11), tmp_path / name, {"scheme": scheme, "seed": 11})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_other_seed_other_split():
    labels = balanced_labels()
    first, other = partition(labels, 4, "iid", 1.0, seed=0), partition(labels, 4, "iid", 1.0, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition(np.zeros(1003, dtype=int), 10, "iid", 1.0, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


def test_shards_are_label_sorted_runs():
    labels = balanced_labels(classes=4, per_class=30)
    parts = partition(labels, 8, "shards", 1.0, seed=0)
    assert [len(p) for p in parts] == [15] * 8
    # client i's labels all come at or before client i+1's: each client sees one label here
    for left, right in itertools.pairwise(parts):
        assert labels[left].max() <= labels[right].min()
    assert [len(set(labels[p])) for p in parts] == [1] * 8


@pytest.mark.parametrize("scheme", ["iid", "shards"])
def test_drop_remainder_gives_every_client_floor_n_over_k_rows_and_leaves_the_rest_out(scheme):
    """The paper's protocol: equal shards, the n mod K rows left over train on no client."""
    labels = balanced_labels(classes=4, per_class=250)  # 1000 rows over 7 clients: 142 each, 6 left over
    parts = partition(labels, 7, scheme, 1.0, seed=5, drop_remainder=True)
    assert [len(p) for p in parts] == [142] * 7
    rows = np.concatenate(parts)
    assert len(np.unique(rows)) == 994 and rows.min() >= 0 and rows.max() < 1000
    assert [np.array_equal(a, b) for a, b in zip(parts, partition(labels, 7, scheme, 1.0, 5, True))] == [True] * 7
    if scheme == "shards":  # still the label-sorted runs, now of equal length
        for left, right in itertools.pairwise(parts):
            assert labels[left].max() <= labels[right].min()


@pytest.mark.parametrize("scheme", ["iid", "shards"])
def test_drop_remainder_changes_no_split_that_has_no_remainder(scheme):
    labels = balanced_labels()  # 1000 rows over 8 clients
    dropped, plain = partition(labels, 8, scheme, 1.0, 3, drop_remainder=True), partition(labels, 8, scheme, 1.0, 3)
    assert all(np.array_equal(a, b) for a, b in zip(dropped, plain, strict=True))


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity"])
def test_drop_remainder_is_refused_for_schemes_of_unequal_sizes(scheme):
    with pytest.raises(ConfigError, match=rf"partition\.drop_remainder: .*{scheme} sizes clients unequally"):
        partition(balanced_labels(), 4, scheme, 0.5, 0, drop_remainder=True)


def test_a_split_leaving_rows_out_passes_only_as_equal_shards_with_drop_remainder():
    parts = partition(np.zeros(10, dtype=int), 3, "iid", 1.0, 0, drop_remainder=True)  # 3 x 3 rows, 1 left out
    check_split(parts, 10, "split.json", drop_remainder=True)
    with pytest.raises(ConfigError, match=r"split\.json: the clients hold 9 of the 10 training rows"):
        check_split(parts, 10, "split.json")
    unequal = [parts[0], parts[1][:2], parts[2]]
    with pytest.raises(ConfigError, match=r"split\.json: with partition\.drop_remainder every client holds the 3 "
                                          r"rows .* but these hold \[2, 3\]"):
        check_split(unequal, 10, "split.json", drop_remainder=True)


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    labels = balanced_labels(classes=10, per_class=100)
    skewed = mean_tv_from_global(partition(labels, 5, "dirichlet", 0.05, seed=0), labels)
    near_iid = mean_tv_from_global(partition(labels, 5, "dirichlet", 1000.0, seed=0), labels)
    assert skewed > 0.5 and near_iid < 0.05 and skewed > 10 * near_iid


def test_quantity_small_alpha_skews_sizes_not_labels():
    labels = balanced_labels()
    parts = partition(labels, 5, "quantity", 0.1, seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 5 * sizes[0]
    assert mean_tv_from_global([parts[int(np.argmax([len(p) for p in parts]))]], labels) < 0.05


def test_client_stats():
    labels = np.array([0, 1, 1, 2, 2, 2])
    stats = client_stats([np.array([0, 3]), np.array([1, 2, 4, 5])], labels, num_classes=4)
    assert stats == [{"client": 0, "size": 2, "label_counts": [1, 0, 1, 0]},
                     {"client": 1, "size": 4, "label_counts": [0, 2, 2, 0]}]


@pytest.mark.parametrize("clients", [0, 11])
def test_client_count_outside_1_to_rows_is_refused(clients):
    with pytest.raises(ConfigError, match=r"fl\.num_clients.*10 training rows"):
        partition(np.zeros(10, dtype=int), clients, "iid", 1.0, seed=0)


def test_dirichlet_that_leaves_a_client_empty_is_refused():
    labels = balanced_labels(classes=3, per_class=20)
    with pytest.raises(ConfigError, match=r"partition\.alpha.*fl\.num_clients.*raise partition\.alpha"):
        partition(labels, 30, "dirichlet", 0.01, seed=0)


def test_quantity_gives_every_client_a_row_even_with_tiny_alpha():
    parts = partition(np.zeros(12, dtype=int), 12, "quantity", 0.01, seed=0)
    assert [len(p) for p in parts] == [1] * 12


def test_unknown_scheme_is_refused():
    with pytest.raises(ConfigError, match=r"partition\.scheme.*'pathological'"):
        partition(np.zeros(10, dtype=int), 2, "pathological", 1.0, seed=0)


def test_split_file_round_trip(tmp_path):
    parts = partition(balanced_labels(), 4, "dirichlet", 0.5, seed=0)
    save_split(parts, tmp_path / "splits" / "k4.json", {"scheme": "dirichlet", "alpha": 0.5})
    loaded = load_split(tmp_path / "splits" / "k4.json", num_rows=1000)
    assert all(np.array_equal(a, b) and b.dtype == np.int64 for a, b in zip(parts, loaded))
    assert json.loads((tmp_path / "splits" / "k4.json").read_text())["meta"] == {"alpha": 0.5, "scheme": "dirichlet"}


@pytest.mark.parametrize(
    "clients, num_rows, message",
    [
        ([[0, 1], [2, 5]], 5, "row 5 is not an index into the 5 rows"),
        ([[0, -1], [2]], None, "row -1 is not an index"),
        ([[0, 1], [1, 2]], 3, "row 1 belongs to more than one client"),
        ([[0, 1], [2]], 4, "the clients hold 3 of the 4 training rows"),
        ([[0, 1, 2], []], 3, "client 1 holds no rows"),
        ([[0, 1, 2], []], None, "client 1 holds no rows"),
    ],
)
def test_bad_split_file_is_refused_naming_the_file(tmp_path, clients, num_rows, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"meta": {}, "clients": clients}))
    with pytest.raises(ConfigError, match=rf"bad\.json: {message}"):
        load_split(path, num_rows)


@pytest.mark.parametrize("text", [None, "not json", '{"meta": {}}', '{"clients": [["a"]]}'])
def test_unreadable_split_file_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "broken.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=r"broken\.json: not a readable split file"):
        load_split(path)
