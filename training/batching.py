"""Length-bucketed batches (``client.batching=bucketed``): texts of similar token length share a batch, so the
per-batch padding (``features.collator``) adds fewer pad tokens, which cost as much compute as real ones.

The scheme is transformers' ``group_by_length`` (``LengthGroupedSampler``): shuffle, cut into pools of ~50 batches,
sort each pool by length, cut the batches. Unlike it, the batches' order is then shuffled as well: sorted pools would
feed a client's steps from long texts to short ones, every epoch, tying text length to the learning-rate schedule.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

POOL_BATCHES = 50  # batches per sorted pool: batches stay mixed across pools, similar in length within one


def bucketed(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches of positions into ``lengths``: each position exactly once, ``ceil(n / batch_size)``
    batches (as random batching gives, so a client's step count and schedule do not change), only the last
    pool's last batch short."""
    order = rng.permutation(len(lengths))
    pool = POOL_BATCHES * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        # a stable sort keeps the shuffled order among equal lengths, so ties are broken at random too
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class BucketedBatches(Sampler[list[int]]):
    """A DataLoader ``batch_sampler`` of bucketed batches; each epoch (each ``iter``) draws new ones from the
    generator seeded with ``seed``, so the batches depend on the seed alone."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int):
        self.lengths, self.batch_size = np.asarray(lengths), batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[list[int]]:
        return iter([batch.tolist() for batch in bucketed(self.lengths, self.batch_size, self.rng)])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)
