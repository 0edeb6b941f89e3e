"""Length-bucketed batches (client.batching=bucketed): seeded, complete, less padding, deterministic runs."""

import numpy as np
import pytest
import torch

from training import rounds
from training.batching import BucketedBatches
from training.client import client_loader
from training.config import ConfigError
from training.federation import build


def epochs(sampler, count: int) -> list[list[list[int]]]:
    return [list(sampler) for _ in range(count)]


def test_the_same_seed_gives_the_same_batches_and_each_epoch_new_ones():
    lengths = np.random.default_rng(0).integers(5, 64, size=1003)  # > one pool of 50 batches, a short last batch
    first, again = epochs(BucketedBatches(lengths, 16, seed=7), 2), epochs(BucketedBatches(lengths, 16, seed=7), 2)
    assert first == again
    assert first[0] != first[1]
    assert epochs(BucketedBatches(lengths, 16, seed=8), 1)[0] != first[0]


def test_every_text_is_in_exactly_one_batch_per_epoch_and_the_step_count_is_random_batchings():
    lengths = np.random.default_rng(1).integers(5, 64, size=1003)
    sampler = BucketedBatches(lengths, 16, seed=0)
    for batches in epochs(sampler, 3):
        assert sorted(i for batch in batches for i in batch) == list(range(1003))
        assert len(batches) == len(sampler) == 63  # ceil(1003 / 16), as random batching gives
        assert sorted(len(batch) for batch in batches)[1:] == [16] * 62  # one short batch at most


def padding(federation) -> tuple[int, int]:
    """(pad tokens, all tokens) the clients' batches of round 1 hold, as the collator pads them."""
    pads = total = 0
    for client, indices in enumerate(federation.parts):
        loader = client_loader(federation.encoded["train"], indices, federation.collate, federation.config.client,
                               federation.seed_for(1, client), federation.where)
        for batch in loader:
            pads += int((batch["attention_mask"] == 0).sum())
            total += batch["attention_mask"].numel()
    return pads, total


def test_bucketed_batches_compute_far_fewer_pad_tokens_than_random_ones_on_the_tweets(tiny):
    random_pads, random_total = padding(build(tiny("model.max_length=64", "fl.num_clients=1")))
    bucketed_pads, bucketed_total = padding(build(tiny("model.max_length=64", "fl.num_clients=1",
                                                       "client.batching=bucketed")))
    assert random_total - random_pads == bucketed_total - bucketed_pads  # the same texts, the same real tokens
    assert bucketed_pads < random_pads / 4


def test_a_bucketed_run_gives_the_same_weights_twice_and_others_than_random_batching(tiny):
    _, first = rounds.run(build(tiny("fl.rounds=1", "client.batching=bucketed")))
    _, second = rounds.run(build(tiny("fl.rounds=1", "client.batching=bucketed")))
    _, shuffled = rounds.run(build(tiny("fl.rounds=1")))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], shuffled[key]) for key in first)


def test_an_unknown_batching_is_refused_naming_the_field_and_the_choices(tiny):
    with pytest.raises(ConfigError, match=r"^client\.batching: must be one of \('random', 'bucketed'\), got 'sorted'"):
        tiny("client.batching=sorted")
