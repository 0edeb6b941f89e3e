"""Clients of a round spread over worker processes with torch.distributed (started by torchrun).

Each worker trains its share of the cohort one client after another on one model instance, keeping a running
weighted sum; one ``all_reduce`` of the sums and weights gives every worker the cohort's mean. Only the
main worker (rank 0) evaluates, logs to MLflow and writes checkpoints; per-client values reach it by a gather.
Because each client's update depends only on (seed, round, client), the result does not depend on where a client
ran, up to the order of floating-point summation.
"""

from __future__ import annotations

import datetime
import heapq
import os
import sys
import time

import torch
import torch.distributed as dist

from training import lora
from training.aggregate import State
from training.executor import CohortResult, run_clients
from training.federation import Federation


def assign(sizes: dict[int, int], workers: int) -> list[list[int]]:
    """Balance clients over workers by sample count: largest client first to the least-loaded worker."""
    loads = [(0, w) for w in range(workers)]
    shares: list[list[int]] = [[] for _ in range(workers)]
    for client in sorted(sizes, key=lambda c: (-sizes[c], c)):
        load, worker = heapq.heappop(loads)
        shares[worker].append(client)
        heapq.heappush(loads, (load + sizes[client], worker))
    return [sorted(s) for s in shares]


def launched() -> bool:
    """True inside a torchrun worker."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_device() -> str:
    """Each worker's device: its own GPU by LOCAL_RANK (wrapping when several workers share GPUs), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def backend() -> str:
    """NCCL when every worker has a GPU of its own; Gloo on the CPU and when workers share a GPU (NCCL refuses)."""
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return "nccl" if torch.cuda.is_available() and world <= torch.cuda.device_count() else "gloo"


class WorkerFailure(RuntimeError):
    """Another worker died (exception or kill) while this one waited on it."""


class Distributed:
    """The executor (``training.executor.Executor``) for torchrun workers: NCCL on GPUs, Gloo on the CPU."""

    def __init__(self, timeout_minutes: float = 30.0):
        device = local_device()
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend(), timeout=datetime.timedelta(minutes=timeout_minutes))
        self.rank, self.workers = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = device
        print(f"fedtune: worker {self.rank}/{self.workers} on {device} ({dist.get_backend()}), pid {os.getpid()}",
              file=sys.stderr, flush=True)

    def run_cohort(self, federation: Federation, global_state: State, cohort: list[int], round_: int,
                   progress=None) -> CohortResult:
        share = assign({c: len(federation.parts[c]) for c in cohort}, self.workers)[self.rank]
        mine = run_clients(federation, global_state, share, round_, progress)
        tic = time.perf_counter()
        everyone = [None] * self.workers
        try:
            total, num_samples, total_weight = self._sum(mine, global_state)
            products = self._sum_products(mine, global_state) if federation.exact else None
            dist.all_gather_object(everyone, (mine.clients, mine.sketches, mine.norms, mine.compute_seconds,
                                              mine.aggregation_seconds))
        except RuntimeError as err:  # torch.distributed's errors when a peer is gone
            raise WorkerFailure(f"round {round_}: another worker stopped ({str(err).splitlines()[0][:200]}); the "
                                f"last checkpoint is intact, continue with `fedtune train --resume RUN_ID`") from err
        waited = time.perf_counter() - tic
        computes = [e[3] for e in everyone]
        busiest = max(computes) or 1e-9
        return CohortResult(
            total=total,
            num_samples=num_samples,
            total_weight=total_weight,
            products=products,
            clients=sorted((c for e in everyone for c in e[0]), key=lambda c: c.client),
            sketches={k: v for e in everyone for k, v in e[1].items()},
            norms={k: v for e in everyone for k, v in e[2].items()},
            compute_seconds=busiest,
            aggregation_seconds=max(e[4] for e in everyone),
            extra={
                "workers": self.workers,
                "communication_seconds": waited,  # all_reduce + gather, including waiting for the slowest worker
                "idle_share": 1.0 - sum(computes) / (busiest * self.workers),
            },
        )

    def _sum(self, mine: CohortResult, global_state: State) -> tuple[State, int, float]:
        """The cohort's weighted sum of every averaged tensor, its sample count and its weight."""
        floats = {k: v for k, v in global_state.items() if v.is_floating_point()}
        total = self._reduce(mine.total or {k: torch.zeros_like(v, dtype=torch.float32) for k, v in floats.items()})
        count = torch.tensor([float(mine.num_samples), mine.total_weight], dtype=torch.float64, device=self.device)
        dist.all_reduce(count)
        num_samples, total_weight = count.tolist()
        return total, int(num_samples), total_weight

    def _sum_products(self, mine: CohortResult, global_state: State) -> State:
        """Exact LoRA aggregation: the cohort's sum of weight * B·A per adapted module."""
        return self._reduce(mine.products if mine.products is not None else lora.zero_products(global_state))

    def _reduce(self, tensors: State) -> State:
        """Each tensor summed over the workers, in one all_reduce of a flat buffer (sorted keys: every worker lays
        the buffer out alike)."""
        keys = sorted(tensors)
        flat = torch.cat([tensors[k].flatten().to(self.device) for k in keys])
        dist.all_reduce(flat)
        parts = flat.split([tensors[k].numel() for k in keys])
        return {k: part.view_as(tensors[k]) for k, part in zip(keys, parts)}

    def agree(self, stop: bool) -> bool:
        """Every worker takes the main worker's decision to stop."""
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
