"""Runs a round's clients in this process, one after another, on one model instance.

The weighted sum of client models is kept as a running total, so memory does not grow with the cohort.
``training.distributed`` runs the same function on each worker's share and reduces the totals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from training import aggregate, divergence
from training.client import ClientResult, train_client


@dataclass
class CohortResult:
    total: dict[str, torch.Tensor] | None  # sum over clients of num_samples * client weights
    num_samples: int
    clients: list[ClientResult] = field(default_factory=list)
    sketches: dict[int, torch.Tensor] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    compute_seconds: float = 0.0  # client training
    aggregation_seconds: float = 0.0  # summing and sketching
    extra: dict[str, float] = field(default_factory=dict)  # executor-specific round metrics


def run_clients(study, global_state, cohort: list[int], round_: int, progress=None) -> CohortResult:
    """Train each client of ``cohort`` from ``global_state`` and sum their weights as they finish."""
    result = CohortResult(total=None, num_samples=0)
    for client in cohort:
        start = time.perf_counter()
        outcome = train_client(
            study.model, global_state, study.encoded["train"], study.parts[client], study.collate,
            study.config.client, study.seed_for(round_, client), study.where, client, progress,
        )
        mid = time.perf_counter()
        local = study.model.state_dict()
        result.total = aggregate.accumulate(result.total, local, float(outcome.num_samples))
        result.sketches[client], result.norms[client] = divergence.update_sketch(local, global_state, study.signs)
        result.num_samples += outcome.num_samples
        result.clients.append(outcome)
        result.compute_seconds += mid - start
        result.aggregation_seconds += time.perf_counter() - mid
    return result
