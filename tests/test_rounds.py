"""The round loop: determinism, cohort sampling, divergence metrics, early stop, server strategies, weighting and
the client schedule's scope."""

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from training import aggregate, client, divergence, rounds
from training.callbacks import Callback
from training.config import ClientConfig
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


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_clients_of_unequal_size_are_averaged_by_their_weighting(tiny, weighting):
    """End to end: one round over clients of 6, 206 and 28 rows equals the float64 mean of the client models trained
    alone, weighted by sample count (McMahan et al.) or plain (fl.weighting=uniform, the paper's), and is far from
    the other mean."""
    federation = build(tiny("partition.scheme=quantity", "partition.alpha=0.3", "fl.rounds=1",
                            f"fl.weighting={weighting}"))
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
    want, other = (weighted, plain) if weighting == "samples" else (plain, weighted)
    error = max(float((final[k].double() - want[k]).abs().max()) for k in want)
    gap = max(float((other[k] - want[k]).abs().max()) for k in want)
    assert error <= 1e-6 and gap > 1e-3, (error, gap)


class LiveTensorBytes:
    """Stands in for the progress bar: at every local step, the bytes of all CPU tensors alive in Python."""

    def __init__(self):
        self.peak = 0

    def update(self, steps):
        storages = {}
        for obj in gc.get_objects():
            # a FakeTensor (torch.compile's tracing, kept in its caches) has shapes but no memory
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not isinstance(obj, FakeTensor):
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


def _todays_fedavg(federation) -> dict[str, torch.Tensor]:
    """The round loop's arithmetic before server strategies existed: sample-weighted mean, then server_update."""
    fl = federation.config.fl
    state = federation.global_state()
    for round_ in range(1, fl.rounds + 1):
        cohort = rounds.sample_cohort(fl.num_clients, fl.client_fraction, fl.seed, round_)
        result = InProcess.run_cohort(federation, state, cohort, round_)
        state = aggregate.server_update(state, aggregate.average(result.total, result.num_samples, state), fl.server_lr)
    return state


@pytest.mark.parametrize("settings", [[], ["fl.strategy=fedprox", "client.prox_mu=0"], ["fl.strategy=fedavgm"],
                                      ["fl.strategy=fedavgm", "fl.server_lr=0.5"]],
                         ids=["fedavg", "fedprox-mu-0", "fedavgm-0", "fedavgm-0-lr-0.5"])
def test_fedavg_and_its_degenerate_variants_are_bit_identical_to_todays_loop(tiny, settings):
    expected = _todays_fedavg(build(tiny(*settings)))
    history, got = rounds.run(build(tiny(*settings)))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(r["server_update_norm"] > 0 and "server_second_moment_mean" not in r for r in history.rounds)


def test_fedprox_pulls_the_clients_towards_the_global_model(tiny):
    # plain SGD, unclipped: the term's gradient mu * (w - w_global) shrinks each step's distance by lr * mu (Adam
    # would rescale it and clipping would cap it)
    sgd = ["fl.rounds=1", "fl.strategy=fedprox", "client.optimizer=sgd", "client.lr=0.05", "client.max_grad_norm=0"]
    norms = {mu: rounds.run(build(tiny(*sgd, f"client.prox_mu={mu}")))[0].last("update_norm_mean") for mu in (0, 5)}
    assert norms[5] < 0.8 * norms[0], norms  # measured: 0.046 against 0.074


def test_an_adaptive_strategy_reports_its_second_moment_and_moves_the_model_by_its_own_rule(tiny):
    history, fedadam = rounds.run(build(tiny("fl.strategy=fedadam", "fl.server_lr=1e-3")))
    _, fedavg = rounds.run(build(tiny()))
    assert all(r["server_update_norm"] > 0 and r["server_second_moment_mean"] > 0 for r in history.rounds)
    assert any(not torch.equal(fedadam[k], fedavg[k]) for k in fedavg)


def _lrs(scope: str, round_: int, rounds_: int, steps: int) -> list[float]:
    """The learning rate of each local step a client takes in ``round_``."""
    cfg = ClientConfig(lr=1.0, schedule="linear", warmup_ratio=0.25, schedule_scope=scope)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = client.make_scheduler(optimizer, cfg, steps, round_, rounds_)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_a_run_scoped_schedule_continues_across_rounds_where_a_client_scoped_one_restarts():
    whole = _lrs("client", 1, 1, 12)  # one schedule over all 3 rounds x 4 steps: warm-up 3 steps, then decay
    run = [lr for r in (1, 2, 3) for lr in _lrs("run", r, 3, 4)]
    assert run == whole
    assert _lrs("run", 2, 3, 4)[0] < _lrs("run", 1, 3, 4)[-1]  # round 2 goes on decaying from round 1's last step
    assert [_lrs("client", r, 3, 4) for r in (1, 2, 3)] == [_lrs("client", 1, 1, 4)] * 3


def test_the_round_reaches_the_clients_schedule(tiny):
    federation = build(tiny("client.schedule=linear", "client.schedule_scope=run"))
    start = federation.global_state()

    def trained(round_: int) -> dict[str, torch.Tensor]:
        c = federation.config
        client.train_client(federation.model, start, federation.encoded["train"], federation.parts[0],
                            federation.collate, c.client, federation.seed_for(2, 0), federation.where, 0,
                            round_=round_, rounds=c.fl.rounds)
        return federation.model.state_dict()

    InProcess.run_cohort(federation, start, [0], 2)
    via_loop = {k: v.clone() for k, v in federation.model.state_dict().items()}
    assert all(torch.equal(via_loop[k], v) for k, v in trained(2).items())
    assert any(not torch.equal(via_loop[k], v) for k, v in trained(1).items())
