"""The round loop: determinism, cohort sampling, divergence metrics, early stop."""

import gc

import pytest
import torch

from training import divergence, rounds
from training.callbacks import Callback
from training.executor import InProcess
from training.federation import build


def test_same_config_and_seed_give_the_same_weights(tiny):
    _, first = rounds.run(build(tiny()))
    _, second = rounds.run(build(tiny()))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_different_seed_gives_different_weights(tiny):
    _, first = rounds.run(build(tiny("fl.rounds=1")))
    _, other = rounds.run(build(tiny("fl.rounds=1", "fl.seed=1")))
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_cohort_sampling_is_a_function_of_seed_and_round():
    a = rounds.sample_cohort(32, 0.25, seed=0, round_=3)
    assert a == rounds.sample_cohort(32, 0.25, seed=0, round_=3)
    assert len(a) == 8 and len(set(a)) == 8 and all(0 <= c < 32 for c in a)
    assert rounds.sample_cohort(32, 0.25, seed=0, round_=4) != a
    assert rounds.sample_cohort(5, 1.0, seed=0, round_=1) == [0, 1, 2, 3, 4]


def test_history_has_every_round_metric(tiny):
    history, _ = rounds.run(build(tiny("fl.rounds=2", "fl.client_fraction=0.67")))
    assert [r["round"] for r in history.rounds] == [1, 2]
    for r in history.rounds:
        assert r["cohort_size"] == 2
        for key in ("val_accuracy", "val_macro_f1", "val_loss", "train_loss", "round_seconds", "compute_seconds",
                    "aggregation_seconds", "upload_bytes_per_client", "download_bytes_per_client",
                    "update_cosine_mean", "update_norm_mean"):
            assert key in r, key
        assert 0 <= r["val_accuracy"] <= 1
        assert r["upload_bytes_per_client"] > 900_000 * 4  # tiny-bert has ~1M float32 parameters


class StopAfter(Callback):
    def __init__(self, n):
        self.n, self.seen = n, []

    def after_round(self, round_, metrics, clients):
        self.seen.append((round_, len(clients)))
        return round_ >= self.n


def test_a_callback_can_stop_the_run_and_receives_per_client_values(tiny):
    stop = StopAfter(1)
    history, _ = rounds.run(build(tiny("fl.rounds=3")), callbacks=(stop,))
    assert stop.seen == [(1, 3)] and history.stopped_early and len(history.rounds) == 1


def test_sketched_cosine_matches_the_exact_cosine(tiny):
    """The update sketch estimates each client's cosine to the mean update; compare with exact arithmetic."""
    federation = build(tiny("fl.num_clients=3", "fl.rounds=1"))
    start = federation.global_state()
    exact, sketches, sizes = {}, {}, {}
    for c in range(3):
        result = InProcess.run_cohort(federation, start, [c], 1)
        local = federation.model.state_dict()
        exact[c] = torch.cat([(local[k] - v).flatten().double() for k, v in start.items()])
        sketches[c], sizes[c] = result.sketches[c], result.num_samples
    mean = sum(exact[c] * sizes[c] for c in exact) / sum(sizes.values())
    estimated = divergence.cosines(sketches, sizes)
    for c in exact:
        true = float(torch.nn.functional.cosine_similarity(exact[c], mean, dim=0))
        assert estimated[c] == pytest.approx(true, abs=0.05)
        rerun = InProcess.run_cohort(federation, start, [c], 1)
        assert float(exact[c].norm()) == pytest.approx(rerun.norms[c], rel=1e-4)


def test_clients_of_unequal_size_are_averaged_by_sample_count(tiny):
    """End to end: one round over clients of 6, 206 and 28 rows equals the float64 sample-weighted mean of the
    client models trained alone, and is far from their plain mean."""
    federation = build(tiny("partition.scheme=quantity", "partition.alpha=0.3", "fl.rounds=1"))
    sizes = [len(part) for part in federation.parts]
    assert max(sizes) > 5 * min(sizes), sizes
    start = federation.global_state()
    trained = []
    for c in range(len(sizes)):
        InProcess.run_cohort(federation, start, [c], 1)
        trained.append({k: v.double() for k, v in federation.model.state_dict().items() if v.is_floating_point()})
    federation.model.load_state_dict(start)
    _, final = rounds.run(federation)
    weighted = {k: sum(t[k] * n for t, n in zip(trained, sizes)) / sum(sizes) for k in trained[0]}
    plain = {k: sum(t[k] for t in trained) / len(trained) for k in trained[0]}
    error = max(float((final[k].double() - weighted[k]).abs().max()) for k in weighted)
    gap = max(float((plain[k] - weighted[k]).abs().max()) for k in weighted)
    assert error <= 1e-6 and gap > 1e-3, (error, gap)


class LiveTensorBytes:
    """Stands in for the progress bar: at every local step, the bytes of all CPU tensors alive in Python."""

    def __init__(self):
        self.peak = 0

    def update(self, steps):
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        self.peak = max(self.peak, sum(storages.values()))


def test_a_cohort_holds_one_client_model_at_a_time_whatever_its_size(tiny):
    """The running sum keeps memory flat in the cohort size: 8 clients peak no higher than 2 (of the same size)."""
    federation = build(tiny("fl.num_clients=8", "fl.rounds=1", "client.batch_size=32"))  # one step per client
    start = federation.global_state()
    model_bytes = sum(v.numel() * v.element_size() for v in start.values())
    peaks = {}
    for cohort in ([0, 1], list(range(8))):
        gc.collect()
        live = LiveTensorBytes()
        InProcess.run_cohort(federation, start, cohort, 1, live)
        peaks[len(cohort)] = live.peak
    # keeping each client's model until the end would add 6 models (~4 MB each) to the 8-client peak
    assert peaks[8] - peaks[2] < model_bytes / 2, (peaks, model_bytes)
