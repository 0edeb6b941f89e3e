"""The federated round loop (McMahan et al. 2017), top to bottom.

Each round: sample the cohort, train each client from the global model, aggregate their weights (by sample count or
uniformly, ``fl.weighting``), apply the server strategy's update (``fl.strategy``: FedAvg by default), evaluate, emit
metrics, checkpoint (with the strategy's state), decide whether to stop.
Tracking (MLflow) and tuning (Optuna) hang on the loop as callbacks; the loop imports neither.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from training import aggregate, checkpoint, divergence, lora, strategy
from training.callbacks import Callback
from training.config import server_params
from training.evaluate import evaluate
from training.executor import CohortResult, Executor, InProcess
from training.federation import Federation


@dataclass
class History:
    rounds: list[dict] = field(default_factory=list)  # one {"round": r, metric: value, ...} per round
    stopped_early: bool = False

    def best(self, metric: str = "val_accuracy") -> float:
        values = [r[metric] for r in self.rounds if metric in r]
        return max(values) if values else float("nan")

    def last(self, metric: str = "val_accuracy") -> float:
        values = [r[metric] for r in self.rounds if metric in r]
        return values[-1] if values else float("nan")


def sample_cohort(num_clients: int, fraction: float, seed: int, round_: int) -> list[int]:
    """The clients of a round: a share ``fraction`` of all, drawn from (seed, round) alone."""
    size = max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, round_])
    return sorted(int(c) for c in rng.choice(num_clients, size=size, replace=False))


def _state_bytes(state: dict[str, torch.Tensor], floats_only: bool) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if v.is_floating_point() or not floats_only)


def _round_metrics(result: CohortResult, global_state, cosine: dict[int, float]) -> tuple[dict, list[dict]]:
    clients = [
        {
            "client": c.client, "train_loss": c.train_loss, "samples": c.num_samples, "steps": c.steps,
            "update_norm": result.norms[c.client], "update_cosine": cosine[c.client],
        }
        for c in result.clients
    ]
    metrics = {
        "train_loss": sum(c["train_loss"] * c["samples"] for c in clients) / result.num_samples,
        "cohort_size": len(clients),
        "compute_seconds": result.compute_seconds,
        "aggregation_seconds": result.aggregation_seconds,
        "upload_bytes_per_client": _state_bytes(global_state, floats_only=True),
        "download_bytes_per_client": _state_bytes(global_state, floats_only=False),
        "update_norm_mean": float(np.mean([c["update_norm"] for c in clients])),
        "update_cosine_mean": float(np.mean([c["update_cosine"] for c in clients])),
        "update_cosine_min": float(np.min([c["update_cosine"] for c in clients])),
        **result.extra,
    }
    return metrics, clients


def run(federation: Federation, callbacks: Sequence[Callback] = (), checkpoint_dir: Path | None = None,
        start: checkpoint.Checkpoint | None = None,
        executor: Executor | None = None) -> tuple[History, dict[str, torch.Tensor]]:
    """Run rounds ``start.round + 1 .. fl.rounds``; returns the per-round history and the final global weights."""
    cfg, executor = federation.config, executor or InProcess()
    server = strategy.make(cfg.fl.strategy, **server_params(cfg.fl))
    if start is None:
        global_state = federation.global_state()
    else:  # a checkpoint loads on the CPU; the model, the server state and the FedProx anchor live on its device
        global_state = {k: v.to(federation.where.device) for k, v in start.global_state.items()}
        server.load(start.server_optimizer)
        lora.load_base(federation.model, start.base)  # what exact LoRA aggregation folded into the base (else none)
    history = History(list(start.history) if start else [])
    if start is not None and start.rng_state is not None:
        torch.set_rng_state(start.rng_state)
    for round_ in range((start.round if start else 0) + 1, cfg.fl.rounds + 1):
        started = time.perf_counter()

        # 1. sample the cohort
        cohort = sample_cohort(cfg.fl.num_clients, cfg.fl.client_fraction, cfg.fl.seed, round_)

        # 2. train each client from the global model (through the executor)
        batches = sum(math.ceil(len(federation.parts[c]) / cfg.client.batch_size) for c in cohort)
        steps = batches * cfg.client.local_epochs
        with tqdm(total=steps, desc=f"round {round_}/{cfg.fl.rounds}", unit="step", leave=False,
                  disable=not executor.is_main) as progress:
            result = executor.run_cohort(federation, global_state, cohort, round_, progress)

        # 3. aggregate: the weighted mean of the client models
        tic = time.perf_counter()
        mean_state = aggregate.average(result.total, result.total_weight, global_state)
        if federation.exact:  # LoRA: make the global effective weights the clients' mean, not mean(B)·mean(A)
            lora.fold(federation.model, result.products, result.total_weight, mean_state)
        cosine = divergence.cosines(result.sketches, {c.client: c.num_samples for c in result.clients})
        metrics, clients = _round_metrics(result, global_state, cosine)
        if federation.exact:  # a client also needs the folded base weights each round
            metrics["download_bytes_per_client"] += _state_bytes(lora.base_weights(federation.model), True)

        # 4. server update on every worker, so all hold the same strategy state (FedAvg, server_lr = 1: the mean
        # becomes the global model)
        global_state, server_metrics = server.step(global_state, mean_state)
        metrics.update(server_metrics)
        metrics["aggregation_seconds"] += time.perf_counter() - tic
        if not executor.is_main:  # only the main worker evaluates, logs and checkpoints
            if executor.agree(False):
                break
            continue

        # 5. evaluate the global model on the validation split
        if round_ % cfg.fl.eval_every == 0 or round_ == cfg.fl.rounds:
            tic = time.perf_counter()
            federation.load(global_state)
            val = evaluate(federation.model, federation.encoded["validation"], federation.collate,
                           cfg.runtime.eval_batch_size, federation.where)
            metrics.update({f"val_{k}": v for k, v in val.items()}, eval_seconds=time.perf_counter() - tic)
        metrics["round_seconds"] = time.perf_counter() - started
        history.rounds.append({"round": round_, **metrics})

        # 6. emit metrics; any callback may ask to stop
        stop = any([cb.after_round(round_, metrics, clients) for cb in callbacks])

        # 7. checkpoint every N rounds, the last round and a stopping round
        last = round_ == cfg.fl.rounds or stop
        if checkpoint_dir is not None and (round_ % cfg.fl.checkpoint_every == 0 or last):
            path = checkpoint.save(checkpoint.Checkpoint(
                round_, global_state, cfg.to_dict(), history.rounds, torch.get_rng_state(), server.state(),
                lora.base_weights(federation.model) if federation.exact else {}), checkpoint_dir)
            for cb in callbacks:
                cb.after_checkpoint(round_, path)

        # 8. stop early when asked
        if executor.agree(stop):
            history.stopped_early = round_ < cfg.fl.rounds
            break
    federation.load(global_state)
    return history, global_state
