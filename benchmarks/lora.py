"""Full fine-tuning against LoRA in fedtune's own round loop (issue 17): trainable parameters, bytes a client sends
and receives per round, peak memory, seconds per round, validation accuracy after the same rounds.

    python benchmarks/lora.py                       # MiniLM-L6, then the BERT-large shape: ~15 min on 2 busy cores
    python benchmarks/lora.py --parts minilm --out benchmarks/results/lora.json
    python benchmarks/lora.py --parts llama-1b --device cuda --precision bf16   # the GPU check: gpu_lora.sh
    python benchmarks/lora.py --tiny                # toy sizes: checks the script, ~2 min

Parts (each compares its arms on the same data, partition, seed and rounds; K=8, iid, one local epoch):
  minilm      the shipped MiniLM-L6 (22.7M), 1,600 training tweets, 2 rounds, batch 16, max length 64.
  bert-large  BERT-large's shape (24 layers x 1024, 16 heads, FFN 4096: 335M) with random weights, built from a
              config and saved with the MiniLM tokenizer to a temporary folder (model.name points at it, so it runs
              through fedtune's own loading): 16 training tweets (2 per client), 1 round, batch 2, max length 32.
              Memory and bytes only: the weights are random, so accuracy means nothing.
  llama-1b    the Llama architecture at TinyLlama-1.1B's shape (hidden 2048, 22 layers, FFN 5632, 32 heads, 4 KV
              heads) with the MiniLM tokenizer's 30,522-token vocabulary (1.03B), random weights: 4,096 training
              tweets, 2 rounds, batch 16, max length 64. For a GPU: peak CUDA memory and samples per second.
Arms:
  full        every weight trained and exchanged; client.lr 5e-5 (fedtune's default, BERT fine-tuning's usual range)
  lora        peft r=8, alpha=16, query,value (q_proj,v_proj for Llama), FedIT averaging; client.lr 1e-3
  lora-exact  the same with peft.aggregation=exact (FedEx-LoRA's fold into the base): what exactness costs
LoRA gets its own learning rate because its update starts from B = 0 and moves only r-dimensional factors: LoRA
papers use rates 10-20x those of full fine-tuning (Hu et al. 2021: 4e-4 to 5e-4 for RoBERTa-base); 1e-3 here.
Measured on the minilm part (--arms lora --lora-lr X): at full fine-tuning's 5e-5 LoRA scored the majority-class
rate after 2 rounds (0.405 vs 0.410), 1e-3 gave 0.520 and 3e-3 0.570 (full fine-tuning: 0.585); benchmarks/RESULTS.md.

Each arm runs in its own child process (this script with --child): training.federation.build, then
training.rounds.run with no callbacks (no tracking). The child reports the peak host RSS of building (VmHWM), then
resets the peak (/proc/self/clear_refs) and the CUDA peak and reports both peaks over the rounds alone. Bytes per
client per round are the round metrics upload_bytes_per_client and download_bytes_per_client; seconds per round are
round_seconds less the validation pass, median over rounds; samples/s = training samples of a round / those seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed import MINILM, machine, peaks, random_weights_model, reset_peaks, status_mib, sync  # noqa: E402

LORA = {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16}
ARMS = {
    "full": {"client.lr": 5e-5},
    "lora": {**LORA, "client.lr": 1e-3},
    "lora-exact": {**LORA, "peft.aggregation": "exact", "client.lr": 1e-3},
}
# the attention query and value projections under each architecture's names (Hu et al. 2021)
QUERY_VALUE = {"bert": "query,value", "llama": "q_proj,v_proj"}

# model_type -> the shape of each random-weight model, full and --tiny (which only checks the script's logic)
SHAPES = {
    "bert-large": dict(model_type="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
    "llama-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}
TINY_SHAPES = {
    "bert-large": dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128),
    "llama-1b": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}


@dataclasses.dataclass(frozen=True)
class Part:
    samples: int  # training texts, all clients together
    rounds: int
    batch_size: int
    max_length: int
    arms: tuple[str, ...]
    accuracy: bool  # pretrained weights: validation accuracy is worth reading


PARTS = {
    "minilm": Part(1600, 2, 16, 64, ("full", "lora", "lora-exact"), accuracy=True),
    "bert-large": Part(16, 1, 2, 32, ("full", "lora", "lora-exact"), accuracy=False),
    "llama-1b": Part(4096, 2, 16, 64, ("lora", "full"), accuracy=False),
}
TINY_SAMPLES = {"minilm": 64, "bert-large": 16, "llama-1b": 64}


# ---- the models ---------------------------------------------------------------------------------------------------
def saved_model(shape: dict, tokenizer: str) -> str:
    """A folder holding a headless model of ``shape`` with random weights and ``tokenizer``'s files."""
    from transformers import AutoConfig

    shape = dict(shape)
    config = AutoConfig.for_model(shape.pop("model_type"), vocab_size=30522, **shape)  # the MiniLM tokenizer's
    return random_weights_model(config, tokenizer, f"fedtune-lora-{config.model_type}-")


def model_for(part: str, args) -> str:
    """model.name for a part: the shipped MiniLM-L6 (tiny-bert under --tiny), else a saved random-weight model."""
    if part == "minilm":
        return "tiny-bert" if args.tiny else args.tokenizer
    return saved_model((TINY_SHAPES if args.tiny else SHAPES)[part], args.tokenizer)


# ---- one arm, in a child process ----------------------------------------------------------------------------------
def overrides(part: Part, arm: str, model: str, model_type: str, args) -> list[str]:
    values = {
        "model.name": model, "model.max_length": part.max_length, "data.max_samples": round(part.samples / 0.8),
        "fl.num_clients": args.clients, "fl.rounds": part.rounds, "client.local_epochs": 1,
        "client.batch_size": part.batch_size, "partition.scheme": "iid", "runtime.device": args.device,
        "runtime.precision": args.precision, "runtime.threads": args.threads, **ARMS[arm],
    }
    if "peft.method" in values and args.lora_lr:
        values["client.lr"] = args.lora_lr
    if args.data:
        values["data.source"] = args.data
    if "peft.method" in values:
        values["peft.target_modules"] = QUERY_VALUE[model_type]
    return [f"{key}={value}" for key, value in values.items()]


def child(settings: list[str]) -> dict:
    """Build the federation from ``settings``, run its rounds, and measure both."""
    import numpy as np

    from training import config, rounds
    from training.federation import build

    tic = time.perf_counter()
    federation = build(config.load(None, settings))
    build_seconds = time.perf_counter() - tic
    device, model = federation.where.device, federation.model
    build_peak, resident = status_mib("VmHWM"), status_mib("VmRSS")
    reset_peaks(device)
    history, _ = rounds.run(federation)
    sync(device)
    rss_peak, cuda_peak = peaks(device)
    labels = federation.encoded["validation"].labels
    walls = [r["round_seconds"] - r.get("eval_seconds", 0.0) for r in history.rounds]
    samples = sum(len(p) for p in federation.parts) * federation.config.client.local_epochs
    first = history.rounds[0]
    return {
        "model_type": model.config.model_type, "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "client_lr": federation.config.client.lr, "samples_per_round": samples, "device": str(device),
        "build_seconds": build_seconds,
        "upload_bytes_per_client": first["upload_bytes_per_client"],
        "download_bytes_per_client": first["download_bytes_per_client"],
        "round_seconds": walls, "seconds_per_round": statistics.median(walls),
        "samples_per_second": samples / statistics.median(walls),
        "samples_per_second_last_round": samples / walls[-1],
        "eval_seconds": [r.get("eval_seconds", 0.0) for r in history.rounds],
        "val_accuracy": history.last("val_accuracy"), "train_loss": history.last("train_loss"),
        "val_texts": len(labels), "val_majority_rate": float(np.bincount(labels).max() / len(labels)),
        "peak_rss_build_mib": build_peak, "rss_after_build_mib": resident, "peak_rss_rounds_mib": rss_peak,
        "peak_cuda_rounds_mib": cuda_peak,
    }


def run_arm(settings: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(settings)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"arm failed ({' '.join(settings)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------------------------
def size(n: float) -> str:
    return next(f"{n / scale:,.2f} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                if n >= scale or unit == "B")


def table(part: Part, results: dict[str, dict]) -> list[str]:
    full = results.get("full")
    cuda = any(r["device"].startswith("cuda") for r in results.values())
    lines = [f"{'arm':10s} {'client.lr':>9s} {'trainable':>21s} {'upload':>10s} {'download':>10s} {'s/round':>8s} "
             f"{'samples/s':>9s} {'RSS build':>10s} {'RSS rounds':>10s}" + (f" {'CUDA rounds':>11s}" if cuda else "")
             + (f" {'val acc':>7s}" if part.accuracy else "")]
    for arm, r in results.items():
        trainable = f"{r['trainable']:,d}"
        if full and arm != "full":
            trainable += f" ({r['trainable'] / full['trainable']:.2%})"
        line = (f"{arm:10s} {r['client_lr']:9.0e} {trainable:>21s} "
                f"{size(r['upload_bytes_per_client']):>10s} {size(r['download_bytes_per_client']):>10s} "
                f"{r['seconds_per_round']:8.2f} {r['samples_per_second']:9.1f} {r['peak_rss_build_mib']:6,.0f} MiB "
                f"{r['peak_rss_rounds_mib']:6,.0f} MiB")
        if cuda:
            line += f" {r['peak_cuda_rounds_mib']:7,.0f} MiB"
        if part.accuracy:
            line += f" {r['val_accuracy']:7.3f}"
        lines.append(line)
    if part.accuracy:
        r = next(iter(results.values()))
        lines.append(f"  val acc: on {r['val_texts']} validation texts; always the majority class scores "
                     f"{r['val_majority_rate']:.3f}")
    if part.rounds > 1:  # the first round also warms up (kernels, allocator); the last one is the steady state
        lines.append("  samples/s in the last round: " + ", ".join(
            f"{arm} {r['samples_per_second_last_round']:.1f}" for arm, r in results.items()))
    for arm, r in results.items():
        if full and arm != "full":
            ratio = {key: r[key] / full[key] for key in ("upload_bytes_per_client", "download_bytes_per_client",
                                                         "seconds_per_round", "peak_rss_rounds_mib")}
            lines.append(f"  {arm} / full: upload {ratio['upload_bytes_per_client']:.4f}, download "
                         f"{ratio['download_bytes_per_client']:.4f}, s/round {ratio['seconds_per_round']:.2f}, "
                         f"peak RSS during the rounds {ratio['peak_rss_rounds_mib']:.2f}")
    return lines


def run_part(name: str, args) -> dict[str, dict]:
    part = PARTS[name]
    if args.tiny:
        part = dataclasses.replace(part, samples=TINY_SAMPLES[name], batch_size=min(part.batch_size, 8))
    if args.arms:
        part = dataclasses.replace(part, arms=tuple(args.arms.split(",")))
    if args.samples:
        part = dataclasses.replace(part, samples=args.samples)
    if args.rounds:
        part = dataclasses.replace(part, rounds=args.rounds)
    print(f"== {name}: building the model ...", file=sys.stderr, flush=True)
    model = model_for(name, args)
    model_type = "bert" if name != "llama-1b" else "llama"
    results = {}
    try:
        for arm in part.arms:
            print(f"== {name}: {arm} ...", file=sys.stderr, flush=True)
            results[arm] = run_arm(overrides(part, arm, model, model_type, args))
            r = results[arm]
            print(f"   {arm}: rounds {', '.join(f'{s:.2f}' for s in r['round_seconds'])} s, peak RSS "
                  f"{r['peak_rss_rounds_mib']:,.0f} MiB", file=sys.stderr, flush=True)
    finally:
        if name != "minilm":
            shutil.rmtree(model, ignore_errors=True)
    first = next(iter(results.values()))
    print(f"\n{name}: {first['parameters'] if 'full' not in results else results['full']['parameters']:,d} "
          f"parameters ({first['model_type']}), {first['samples_per_round']} training texts, K={args.clients} iid, "
          f"{part.rounds} round(s), batch {part.batch_size}, max length {part.max_length}, "
          f"{args.precision}, {first['device']}; s/round = median round less validation; RSS = peak host RSS "
          f"while building / during the rounds; lora: r 8, alpha 16, {QUERY_VALUE[model_type]}, head trained")
    print("\n".join(table(part, results)), flush=True)
    return {"part": dataclasses.asdict(part), "arms": {arm: {"config": ARMS[arm], **r} for arm, r in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="minilm,bert-large", help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--arms", default="", help=f"comma-separated, of {', '.join(ARMS)} (default: each part's)")
    parser.add_argument("--samples", type=int, default=0, help="training texts (default: each part's)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default: each part's)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=0.0, help="client.lr of the LoRA arms (default 1e-3)")
    parser.add_argument("--tokenizer", default=MINILM,
                        help="the MiniLM-L6 model (minilm part) and the tokenizer of the random-weight models")
    parser.add_argument("--data", default="", help="data.source (default: fedtune's default tweet corpus)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per arm (1: on 2 busy cores two threads ran 4-6x slower, RESULTS.md)")
    parser.add_argument("--tiny", action="store_true",
                        help="toy shapes (tiny-bert for MiniLM) and a few texts: checks the script's logic quickly")
    parser.add_argument("--out", default="", help="also write every measured value as JSON here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    unknown = [p for p in args.parts.split(",") if p not in PARTS] + [a for a in args.arms.split(",") if a and
                                                                       a not in ARMS]
    if unknown:
        parser.error(f"unknown part or arm {unknown[0]!r}; parts: {', '.join(PARTS)}; arms: {', '.join(ARMS)}")
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())  # so that machine() names the arms' threads
    where = machine(torch.device("cuda" if args.device == "cuda" else "cpu"))
    print(f"machine: {where}", flush=True)
    report = {"machine": where, "tiny": args.tiny,
              "parts": {name: run_part(name, args) for name in args.parts.split(",")}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
