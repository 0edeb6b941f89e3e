"""Scoring a split: texts are batched by length (less padding), and predictions come back in the split's row order."""

import numpy as np
import pytest

from training.evaluate import predict
from training.federation import build


class CountingPads:
    """A collator that counts the pad tokens of the batches it builds."""

    def __init__(self, collate):
        self.collate, self.pads = collate, 0

    def __call__(self, rows):
        batch = self.collate(rows)
        self.pads += int((batch["attention_mask"] == 0).sum())
        return batch


@pytest.fixture(scope="module")
def federation():
    from tests.conftest import TINY
    from training import config

    return build(config.load(None, [*TINY, "model.max_length=64"]))


def test_predictions_follow_the_row_order_and_equal_one_text_at_a_time(federation):
    split = federation.encoded["validation"]
    batched, loss = predict(federation.model, split, federation.collate, 8, federation.where)
    alone, loss_alone = predict(federation.model, split, federation.collate, 1, federation.where)
    assert len(set(split.lengths.tolist())) > 5  # texts of many lengths, so the order really changes
    assert np.array_equal(batched, alone)
    assert loss == pytest.approx(loss_alone, rel=1e-5)


def test_batches_hold_texts_of_similar_length(federation):
    split, size = federation.encoded["validation"], 8
    counting = CountingPads(federation.collate)
    predict(federation.model, split, counting, size, federation.where)
    lengths = split.lengths
    in_row_order = sum(int((max(chunk) - chunk).sum()) for chunk in
                       (lengths[i:i + size] for i in range(0, len(lengths), size)))
    print(f"pad tokens: {counting.pads} by length against {in_row_order} in row order")
    assert counting.pads < 0.25 * in_row_order
