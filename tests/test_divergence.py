"""The update sketch behind the divergence metric: its bucket layout against a float64 reference, and its norm."""

import pytest
import torch

from training import divergence


def synthetic_update():
    """A global state and a client's state of a few million parameters: one tensor spans several of the sketch's
    slices, others straddle slice boundaries, and an integer buffer is left out as it is from averaging."""
    generator = torch.Generator().manual_seed(0)
    global_state = {
        "embeddings": 0.05 * torch.randn(4000, 1000, generator=generator),
        "dense.weight": 0.05 * torch.randn(2000, 500, generator=generator),
        "dense.bias": torch.randn(501, generator=generator),
        "position_ids": torch.arange(64),
    }
    local = {k: v + 1e-4 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in global_state.items()}
    return local, global_state


def flat_update(local, global_state) -> torch.Tensor:
    return torch.cat([(local[k].double() - v.double()).flatten()
                      for k, v in sorted(global_state.items()) if v.is_floating_point()])


def test_the_sketch_puts_each_parameter_in_its_bucket_with_its_sign():
    """Parameter j sits in slice i = j // SLICE, row r, column c; it lands in bucket (c + shifts[i]) mod BUCKETS with
    the sign flips[i] * table[starts[i] + r, c]. Computed here in float64, parameter by parameter."""
    local, global_state = synthetic_update()
    sign = divergence.signs(global_state)
    delta = flat_update(local, global_state)
    assert set(sign.table.unique().tolist()) == {-1.0, 1.0} and len(sign.starts) == 5  # 5.0M parameters
    assert len(set(sign.starts)) > 1 and len(set(sign.shifts)) > 1  # slices really take other windows and shifts
    j = torch.arange(delta.numel())
    slice_, row, column = j // divergence.SLICE, j % divergence.SLICE // divergence.BUCKETS, j % divergence.BUCKETS
    starts, shifts, flips = (torch.tensor(v) for v in (sign.starts, sign.shifts, sign.flips))
    signed = delta * flips[slice_].double() * sign.table.double()[starts[slice_] + row, column]
    bucket = (column + shifts[slice_]) % divergence.BUCKETS
    expected = torch.zeros(divergence.BUCKETS, dtype=torch.float64).index_add_(0, bucket, signed)
    sketch, _ = divergence.update_sketch(local, global_state, sign)
    torch.testing.assert_close(sketch.double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_the_signs_do_not_grow_with_the_model():
    """One stored sign per parameter was a second copy of the model (4 GB for a 1B model, on its device)."""
    small = divergence.signs({"w": torch.empty(1000, device="meta")})
    large = divergence.signs({"w": torch.empty(10**9, device="meta"), "b": torch.empty(10, device="meta")})
    assert small.table.shape == large.table.shape == (divergence.TABLE_ROWS, divergence.BUCKETS)
    assert len(large.starts) == len(large.shifts) == len(large.flips) == -(-(10**9 + 10) // divergence.SLICE)
    assert large.table.device.type == "meta"  # made on the parameters' device


def test_the_update_norm_is_exact_for_millions_of_parameters():
    """Float32 accumulation over the whole update was off by ~1e-4 here (1e-3 for MiniLM's 22M parameters)."""
    local, global_state = synthetic_update()
    _, norm = divergence.update_sketch(local, global_state, divergence.signs(global_state))
    assert norm == pytest.approx(float(flat_update(local, global_state).norm()), rel=1e-6)
