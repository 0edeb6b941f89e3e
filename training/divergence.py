"""How far client updates pull apart: the norm of each client's update and its cosine to the cohort's mean update.

Keeping every client's full update to compare it with the mean would make memory grow with the cohort, so each
update is compressed into a fixed random-sign sketch (``BUCKETS`` floats): parameter ``j`` lands in bucket
``j mod BUCKETS`` with a random sign, which keeps inner products unbiased. The mean update's sketch is the
weighted mean of the client sketches (sketching is linear). Cosines estimated this way are within about
``1/sqrt(BUCKETS)`` of the exact ones.

The sketch is paid once per client, so it is computed in one streaming pass: the update is never materialised, but
written slice by slice into a cache-sized buffer, and each slice is squared, signed and folded into the buckets
while it is still in cache (full copies of a 22M-parameter update cost 4x more). The squares are summed in float64
across slices, so the reported norm is exact to float32 rounding (a float32 sum over 22M terms was off by 1e-3).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from training.aggregate import State

BUCKETS = 16384
SLICE = 64 * BUCKETS  # 4 MiB of float32: fits the L2 caches of two cores, and few enough slices for a GPU


def signs(global_state: State, seed: int = 0) -> torch.Tensor:
    """One random +-1 per averaged parameter, fixed for a study; zero-padded to whole rows of buckets, as float32
    on the parameters' device, so that signing a slice is one plain multiply with no cast or copy."""
    floating = [v for v in global_state.values() if v.is_floating_point()]
    size = sum(v.numel() for v in floating)
    generator = torch.Generator().manual_seed(seed)
    sign = torch.zeros(-(-size // BUCKETS) * BUCKETS)
    sign[:size] = torch.randint(0, 2, (size,), generator=generator, dtype=torch.int8) * 2 - 1
    return sign.to(floating[0].device)


def _update_slices(local: State, global_state: State, buffer: torch.Tensor) -> Iterator[torch.Tensor]:
    """The flattened update ``local - global`` as consecutive slices of ``buffer`` (each valid until the next one
    is asked for), every slice whole rows of buckets, the last one zero-padded."""
    filled = 0
    # Sorted keys: a state dict read back from a checkpoint lists its tensors in another order than the model's,
    # and each parameter must keep its buckets and signs for cosines to match those of an uninterrupted run.
    for key in sorted(global_state):
        if not global_state[key].is_floating_point():
            continue
        new, old = local[key].detach().float().flatten(), global_state[key].float().flatten()
        start = 0
        while start < new.numel():
            take = min(new.numel() - start, buffer.numel() - filled)
            torch.sub(new[start:start + take], old[start:start + take], out=buffer[filled:filled + take])
            filled, start = filled + take, start + take
            if filled == buffer.numel():
                yield buffer
                filled = 0
    if filled:
        whole_rows = -(-filled // BUCKETS) * BUCKETS
        buffer[filled:whole_rows].zero_()
        yield buffer[:whole_rows]


def update_sketch(local: State, global_state: State, sign: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(sketch, exact L2 norm) of the update ``local - global``; ``sign`` from ``signs``."""
    buffer = torch.empty(SLICE, device=sign.device)
    sketch = torch.zeros(BUCKETS, device=sign.device)
    square = torch.zeros((), dtype=torch.float64, device=sign.device)  # float64 across slices: 22M terms
    offset = 0
    for part in _update_slices(local, global_state, buffer):
        square += torch.dot(part, part)
        part.mul_(sign[offset:offset + part.numel()])
        sketch += part.view(-1, BUCKETS).sum(0)
        offset += part.numel()
    return sketch.cpu(), float(square.sqrt())


def cosines(sketches: dict[int, torch.Tensor], weights: dict[int, float]) -> dict[int, float]:
    """Cosine of each client's update to the weighted mean update, from their sketches."""
    total = sum(weights.values())
    mean = sum(sketches[c] * (weights[c] / total) for c in sketches)
    return {
        c: float(torch.nn.functional.cosine_similarity(s, mean, dim=0, eps=1e-12)) for c, s in sketches.items()
    }
