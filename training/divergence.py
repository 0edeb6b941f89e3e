"""How far client updates pull apart: the norm of each client's update and its cosine to the cohort's mean update.

Keeping every client's full update to compare it with the mean would make memory grow with the cohort, so each
update is compressed into a fixed random-sign sketch (``BUCKETS`` floats): parameter ``j`` lands in bucket
``j mod BUCKETS`` with a random sign, which keeps inner products unbiased. The mean update's sketch is the
weighted mean of the client sketches (sketching is linear). Cosines estimated this way are within about
``1/sqrt(BUCKETS)`` of the exact ones.
"""

from __future__ import annotations

import torch

from training.aggregate import State

BUCKETS = 16384


def signs(global_state: State, seed: int = 0) -> torch.Tensor:
    """One random +-1 per averaged parameter, fixed for a study."""
    size = sum(v.numel() for v in global_state.values() if v.is_floating_point())
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (size,), generator=generator, dtype=torch.int8) * 2 - 1)


def update_sketch(local: State, global_state: State, sign: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(sketch, exact L2 norm) of the update ``local - global``."""
    # Sorted keys: a state dict read back from a checkpoint lists its tensors in another order than the model's,
    # and each parameter must keep its buckets and signs for cosines to match those of an uninterrupted run.
    delta = torch.cat([
        (local[k].detach().float() - global_state[k].float()).flatten()
        for k in sorted(global_state) if global_state[k].is_floating_point()
    ])
    norm = float(delta.norm())
    delta.mul_(sign.to(delta.device))
    pad = (-delta.numel()) % BUCKETS
    sketch = torch.nn.functional.pad(delta, (0, pad)).view(-1, BUCKETS).sum(0)
    return sketch.cpu(), norm


def cosines(sketches: dict[int, torch.Tensor], weights: dict[int, float]) -> dict[int, float]:
    """Cosine of each client's update to the weighted mean update, from their sketches."""
    total = sum(weights.values())
    mean = sum(sketches[c] * (weights[c] / total) for c in sketches)
    return {
        c: float(torch.nn.functional.cosine_similarity(s, mean, dim=0, eps=1e-12)) for c, s in sketches.items()
    }
