"""Server strategies against today's FedAvg, a float64 reference of Reddi et al.'s Algorithm 2, and a resume through
safetensors; the FedProx term's gradient and memory; client weighting."""

import inspect
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from training import aggregate, config, strategy

SHAPES = {"emb": (12, 4), "w": (4, 4), "bias": (4,)}
PARAMS = {  # every strategy with non-default values, so a parameter that is ignored shows
    "fedavg": {"server_lr": 0.7},
    "fedprox": {"server_lr": 0.7},
    "fedavgm": {"server_lr": 0.7, "server_momentum": 0.9},
    "fedadam": {"server_lr": 0.05, "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 1e-2},
    "fedyogi": {"server_lr": 0.05, "server_beta1": 0.8, "server_beta2": 0.95, "server_tau": 1e-2},
    "fedadagrad": {"server_lr": 0.05, "server_beta1": 0.8, "server_tau": 1e-2},
}


def _states(seed: int, rounds: int, spread: float = 0.1) -> tuple[dict, list[dict]]:
    """A global model with an integer buffer, and one cohort mean per round ``spread`` away from it."""
    gen = torch.Generator().manual_seed(seed)
    start = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    means = [{k: v + spread * torch.randn(v.shape, generator=gen) for k, v in start.items()} for _ in range(rounds)]
    ids = torch.arange(6)
    start["position_ids"] = ids
    for r, mean in enumerate(means):
        mean["position_ids"] = ids + 100 * (r + 1)  # what averaging integers would produce: must never be taken
    return start, means


def _run(server, global_state: dict, means: list[dict]) -> tuple[dict, list[dict]]:
    metrics = []
    for mean in means:
        global_state, round_metrics = server.step(global_state, mean)
        metrics.append(round_metrics)
    return global_state, metrics


@pytest.mark.parametrize("make", [lambda: strategy.FedAvg(), lambda: strategy.FedAvgM(1.0, 0.0),
                                  lambda: strategy.make("fedprox")], ids=["fedavg", "fedavgm-0", "fedprox"])
def test_plain_fedavg_is_bit_identical_to_todays_server_update(make):
    # means far from the global model: there global + (mean - global) rounds differently from the mean itself
    start, means = _states(0, 3, spread=1.0)
    expected = start
    for mean in means:
        expected = aggregate.server_update(expected, mean, 1.0)
    got, _ = _run(make(), start, means)
    assert all(torch.equal(got[k], expected[k]) for k in start)
    assert make().state() == {}


def test_fedavg_with_a_server_lr_is_bit_identical_to_todays_server_update():
    start, means = _states(1, 3)
    expected = start
    for mean in means:
        expected = aggregate.server_update(expected, mean, 0.5)
    got, _ = _run(strategy.FedAvgM(0.5, 0.0), start, means)
    assert all(torch.equal(got[k], expected[k]) for k in start)


def _reference(name: str, params: dict, start: dict, means: list[dict]) -> tuple[dict, list[dict]]:
    """Reddi et al. 2021, Algorithm 2 (and Hsu et al.'s momentum), in float64, one parameter at a time."""
    lr, b1, b2 = params["server_lr"], params.get("server_beta1", 0.0), params.get("server_beta2", 0.0)
    tau, beta = params.get("server_tau", 0.0), params.get("server_momentum", 0.0)
    x = {k: v.double() for k, v in start.items() if k in SHAPES}
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.full_like(t, tau ** 2) for k, t in x.items()}
    metrics = []
    for mean in means:
        old = dict(x)
        for k in x:
            d = mean[k].double() - x[k]
            if name == "fedavgm":
                m[k] = beta * m[k] + d
                x[k] = x[k] + lr * m[k]
                continue
            m[k] = b1 * m[k] + (1 - b1) * d
            if name == "fedadam":
                v[k] = b2 * v[k] + (1 - b2) * d ** 2
            elif name == "fedyogi":
                v[k] = v[k] - (1 - b2) * d ** 2 * torch.sign(v[k] - d ** 2)
            else:
                v[k] = v[k] + d ** 2
            x[k] = x[k] + lr * m[k] / (torch.sqrt(v[k]) + tau)
        norm = math.sqrt(sum(float(((x[k] - old[k]) ** 2).sum()) for k in x))
        metrics.append({"server_update_norm": norm,
                        "server_second_moment_mean": float(sum(t.sum() for t in v.values()))
                        / sum(t.numel() for t in v.values())})
    return x, metrics


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_matches_a_float64_reference_over_three_rounds(name):
    start, means = _states(2, 3)
    got, metrics = _run(strategy.make(name, **PARAMS[name]), start, means)
    expected, expected_metrics = _reference(name, PARAMS[name], start, means)
    for k in SHAPES:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(metrics, expected_metrics):
        assert ours["server_update_norm"] == pytest.approx(theirs["server_update_norm"], rel=1e-5)
        if name != "fedavgm":
            assert ours["server_second_moment_mean"] == pytest.approx(theirs["server_second_moment_mean"], rel=1e-5)
    assert ("server_second_moment_mean" in metrics[0]) == (name != "fedavgm")


@pytest.mark.parametrize("name", list(PARAMS))
def test_integer_buffers_are_copied_from_the_global_model(name):
    start, means = _states(3, 2)
    server = strategy.make(name, **PARAMS[name])
    got, _ = _run(server, start, means)
    assert torch.equal(got["position_ids"], start["position_ids"]) and got["position_ids"].dtype == torch.int64
    assert not any(key.endswith("position_ids") for key in server.state())


@pytest.mark.parametrize("name", list(PARAMS))
def test_state_survives_safetensors_and_a_resumed_run_is_bit_identical(name, tmp_path):
    start, means = _states(4, 4)
    straight = strategy.make(name, **PARAMS[name])
    expected, _ = _run(straight, start, means)

    first = strategy.make(name, **PARAMS[name])
    halfway, _ = _run(first, start, means[:2])
    save_file(first.state(), str(tmp_path / "server.safetensors"))
    resumed = strategy.make(name, **PARAMS[name])
    resumed.load(load_file(str(tmp_path / "server.safetensors")))
    got, _ = _run(resumed, halfway, means[2:])

    assert all(torch.equal(got[k], expected[k]) for k in start)
    final, kept = straight.state(), resumed.state()
    assert sorted(final) == sorted(kept) and all(torch.equal(final[k], kept[k]) for k in final)
    slots = {"fedavgm": {"m"}, "fedadam": {"m", "v"}, "fedyogi": {"m", "v"}, "fedadagrad": {"m", "v"}}
    assert {key.split(".")[0] for key in final} == slots.get(name, set())
    assert all(t.dtype == torch.float32 for t in final.values())


def test_state_of_another_strategy_or_model_is_refused():
    start, means = _states(5, 1)
    adam = strategy.make("fedadam", **PARAMS["fedadam"])
    adam.step(start, means[0])
    with pytest.raises(ValueError, match="'v.emb' is not kept by this strategy.*another fl.strategy"):
        strategy.make("fedavgm", server_momentum=0.9).load(adam.state())
    with pytest.raises(ValueError, match="not kept by this strategy .it keeps no state"):
        strategy.make("fedavg").load(adam.state())
    other = strategy.make("fedadam", **PARAMS["fedadam"])
    other.load(adam.state())
    smaller = {k: v[:2] for k, v in start.items()}
    with pytest.raises(ValueError, match="does not fit the model's weights"):
        other.step(smaller, smaller)


def test_each_strategy_takes_exactly_the_parameters_the_config_checks_for_it():
    # the config refuses a parameter a strategy ignores by this table; a class taking another one would be fed a
    # default the user cannot set, or crash on one the config lets through
    assert set(strategy.STRATEGIES) == set(config.STRATEGY_PARAMS)
    for name, cls in strategy.STRATEGIES.items():
        assert tuple(inspect.signature(cls).parameters) == config.STRATEGY_PARAMS[name], name
        strategy.make(name, **config.server_params(config.load(None, [f"fl.strategy={name}", "fl.server_lr=0.5"]).fl))
    with pytest.raises(ValueError, match=r"strategy: must be one of \('fedavg'"):
        strategy.make("fedsgd")


def _model_and_global(seed: int) -> tuple[torch.nn.Module, dict]:
    """A model whose weights have moved away from the global state it started from; one weight is frozen."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for w in model.parameters():
            w.add_(0.1 * torch.randn_like(w))
    model[1].bias.requires_grad_(False)
    return model, global_state


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_proximal_term_value_and_gradient(mu):
    model, global_state = _model_and_global(0)
    term = strategy.proximal_term(model, global_state, mu)
    trainable = {n: w for n, w in model.named_parameters() if w.requires_grad}
    expected = mu / 2 * sum(float(((w.detach().double() - global_state[n].double()) ** 2).sum())
                            for n, w in trainable.items())
    assert float(term.detach()) == pytest.approx(expected, rel=1e-6, abs=0.0)
    term.backward()
    for name, w in trainable.items():
        torch.testing.assert_close(w.grad, mu * (w.detach() - global_state[name]), rtol=1e-6, atol=0.0)
        assert mu > 0 or not w.grad.any()
    assert model[1].bias.grad is None  # frozen weights are not pulled


def test_proximal_term_keeps_no_copy_of_the_weights_for_backward():
    model, global_state = _model_and_global(1)
    held = {t.data_ptr() for t in [*model.parameters(), *global_state.values()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        term = strategy.proximal_term(model, global_state, 0.5)
    assert saved, "the hooks saw nothing: the test would pass vacuously"
    assert all(t.data_ptr() in held for t in saved), "backward keeps a tensor the client does not already hold"
    term.backward()


def test_uniform_weighting_is_the_plain_mean_and_differs_from_sample_weighting():
    gen = torch.Generator().manual_seed(6)
    sizes = [1, 7, 100]
    states = [{"w": torch.randn(5, generator=gen), "ids": torch.arange(3)} for _ in sizes]

    def mean(scheme: str) -> torch.Tensor:
        total, weights = None, 0.0
        for state, n in zip(states, sizes):
            total = aggregate.accumulate(total, state, strategy.client_weight(n, scheme))
            weights += strategy.client_weight(n, scheme)
        return aggregate.average(total, weights, states[0])["w"]

    plain = sum(s["w"].double() for s in states) / len(states)
    by_samples = sum(s["w"].double() * n for s, n in zip(states, sizes)) / sum(sizes)
    torch.testing.assert_close(mean("uniform").double(), plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean("samples").double(), by_samples, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(mean("uniform"), mean("samples"), atol=1e-3)
    with pytest.raises(ValueError, match="weighting: must be one of"):
        strategy.client_weight(3, "equal")
