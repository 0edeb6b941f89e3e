"""FedAvg aggregation against hand-computed cases and a float64 reference."""

import torch

from training import aggregate
from training.aggregate import State


def fedavg(results: list[tuple[State, int]], global_state: State) -> State:
    """The FedAvg mean of ``[(client_state, num_samples), ...]`` through the loop's own two steps (sum, then
    divide): the list form the hand-computed cases are written in."""
    total = None
    for state, num_samples in results:
        total = aggregate.accumulate(total, state, float(num_samples))
    return aggregate.average(total, float(sum(n for _, n in results)), global_state)


def test_hand_computed_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    mean = fedavg([(a, 1), (b, 3)], a)
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5, (0 + 12)/4 = 3
    assert torch.equal(mean["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(mean["b"], torch.tensor([3.0]))


def test_integer_buffers_are_copied_not_averaged():
    ids = torch.arange(5)
    a = {"w": torch.ones(2), "position_ids": ids}
    b = {"w": torch.zeros(2), "position_ids": ids + 100}
    mean = fedavg([(a, 1), (b, 1)], a)
    assert torch.equal(mean["position_ids"], ids)
    assert mean["position_ids"].dtype == torch.int64
    assert torch.equal(mean["w"], torch.full((2,), 0.5))


def test_matches_float64_reference_on_random_states_with_unequal_sizes():
    gen = torch.Generator().manual_seed(0)
    shapes = {"emb": (50, 16), "w": (16, 16), "bias": (16,), "ln": (16,)}
    sizes = [1, 7, 100, 3, 42, 999]
    states = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in sizes]
    mean = fedavg(list(zip(states, sizes)), states[0])
    total = sum(sizes)
    for key in shapes:
        reference = sum(s[key].double() * n for s, n in zip(states, sizes)) / total
        assert mean[key].dtype == torch.float32
        torch.testing.assert_close(mean[key].double(), reference, rtol=1e-6, atol=1e-6)


def test_streaming_sum_equals_list_form():
    gen = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(8, generator=gen)} for _ in range(4)]
    total = None
    for i, s in enumerate(states):
        total = aggregate.accumulate(total, s, float(i + 1))
    streamed = aggregate.average(total, 10.0, states[0])
    listed = fedavg([(s, i + 1) for i, s in enumerate(states)], states[0])
    assert torch.equal(streamed["w"], listed["w"])


def test_server_lr_one_takes_the_mean_and_half_moves_halfway():
    g = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor([7])}
    m = {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor([7])}
    assert aggregate.server_update(g, m, 1.0) is m
    half = aggregate.server_update(g, m, 0.5)
    assert torch.equal(half["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(half["n"], torch.tensor([7]))


def test_empty_cohort_is_refused():
    import pytest

    with pytest.raises(ValueError, match="no samples"):
        aggregate.average({"w": torch.zeros(1)}, 0.0, {"w": torch.zeros(1)})
