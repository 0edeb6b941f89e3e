"""Who trains a round's clients: the ``Executor`` protocol the round loop talks to, and its in-process form.

``InProcess`` runs the clients in this process, one after another, on one model instance. The weighted sum of
client models is kept as a running total, so memory does not grow with the cohort. ``training.distributed`` runs
the same ``run_clients`` on each worker's share and reduces the totals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from training import aggregate, divergence, lora, strategy
from training.client import ClientResult, make_optimizer, train_client
from training.federation import Federation


@dataclass
class CohortResult:
    total: dict[str, torch.Tensor] | None  # sum over clients of weight * client weights (fl.weighting)
    num_samples: int
    total_weight: float = 0.0  # the sum of the clients' weights: the mean is total / total_weight
    clients: list[ClientResult] = field(default_factory=list)
    sketches: dict[int, torch.Tensor] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    compute_seconds: float = 0.0  # client training
    aggregation_seconds: float = 0.0  # summing and sketching
    extra: dict[str, float] = field(default_factory=dict)  # executor-specific round metrics
    products: dict[str, torch.Tensor] | None = None  # exact LoRA: sum over clients of weight * B·A per module


class Executor(Protocol):
    """What the round loop needs from whoever trains the clients: this process, or torch.distributed workers."""

    @property
    def is_main(self) -> bool:
        """Only the main worker evaluates, logs and checkpoints."""
        ...

    @property
    def device(self) -> str | None:
        """This worker's own device; None leaves it to ``runtime.device``."""
        ...

    def run_cohort(self, federation: Federation, global_state: aggregate.State, cohort: list[int], round_: int,
                   progress=None) -> CohortResult:
        """Train ``cohort`` from ``global_state``; the result holds the sum over all of the cohort's clients."""
        ...

    def agree(self, stop: bool) -> bool:
        """The main worker's decision to stop, taken by every worker."""
        ...

    def close(self) -> None:
        """Release what the executor holds (a process group); the run is over."""
        ...


def run_clients(federation: Federation, global_state: aggregate.State, cohort: list[int], round_: int,
                progress=None) -> CohortResult:
    """Train each client of ``cohort`` from ``global_state`` and sum their weights as they finish."""
    cfg = federation.config
    result = CohortResult(total=None, num_samples=0)
    optimizer = make_optimizer(federation.model, cfg.client)  # one per cohort, restarted for each client
    for client in cohort:
        start = time.perf_counter()
        outcome = train_client(
            federation.model, global_state, federation.encoded["train"], federation.parts[client], federation.collate,
            cfg.client, federation.seed_for(round_, client), federation.where, client, progress,
            round_=round_, rounds=cfg.fl.rounds, optimizer=optimizer,
        )
        mid = time.perf_counter()
        local = federation.shared()
        weight = strategy.client_weight(outcome.num_samples, cfg.fl.weighting)
        result.total = aggregate.accumulate(result.total, local, weight)
        if federation.exact:
            result.products = lora.accumulate_products(result.products, local, weight)
        result.total_weight += weight
        result.sketches[client], result.norms[client] = divergence.update_sketch(
            local, global_state, federation.signs)
        result.num_samples += outcome.num_samples
        result.clients.append(outcome)
        result.compute_seconds += mid - start
        result.aggregation_seconds += time.perf_counter() - mid
    return result


class InProcess:
    """The default executor: every client of a round trains in this process."""

    is_main = True
    device = None  # runtime.device decides
    run_cohort = staticmethod(run_clients)

    def agree(self, stop: bool) -> bool:
        return stop

    def close(self) -> None:
        pass  # nothing is held between rounds
