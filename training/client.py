"""The client update: load the global weights into the shared model, fine-tune locally, report what happened.

Every source of randomness in a client's update (data order, dropout) comes from ``client_seed(seed, round,
client)``, so the update does not depend on which clients ran before it, or on which worker ran it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from transformers import get_scheduler

from training import batching, strategy
from training.config import ClientConfig
from training.devices import Device
from training.features import to_device


class NonFiniteLoss(RuntimeError):
    """A client's loss became NaN or infinite; the run stops and keeps its checkpoints."""


@dataclass(frozen=True)
class ClientResult:
    client: int
    num_samples: int
    steps: int
    train_loss: float  # mean over the client's local steps


def client_seed(seed: int, round_: int, client: int) -> int:
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0])


def load_global(model: torch.nn.Module, global_state: dict[str, torch.Tensor]) -> None:
    """Copy the global weights into ``model``. Under LoRA they are the trainable tensors alone (the frozen base stays
    as it is); a trainable weight missing from them, or a name the model lacks, is an error."""
    own = model.state_dict()  # the model's tensors themselves (no copy)
    unknown = [name for name in global_state if name not in own]
    missing = sorted({name for name, param in model.named_parameters() if param.requires_grad} - global_state.keys())
    if unknown or missing:
        raise ValueError(f"the global state does not fit the model: unknown {unknown[:3]}, missing trainable "
                         f"{missing[:3]}")
    # one multi-tensor copy, paid by every client: load_state_dict's per-module walk cost MiniLM ~2 ms more per
    # client, and a copy per tensor is 105 kernel launches on a GPU where this is one
    names = list(global_state)
    with torch.no_grad():
        torch._foreach_copy_([own[name] for name in names], [global_state[name] for name in names])


def make_optimizer(model: torch.nn.Module, cfg: ClientConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over the trainable weights; biases and LayerNorm weights get no weight decay (as in BERT
    fine-tuning)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step over all parameters, on CUDA and on the CPU: for MiniLM on 2 CPU cores an AdamW step
    # took 16 ms fused against 81 ms foreach (which allocates a sqrt of the second moments each step) and 94 ms as
    # the per-parameter loop (issue 18). Fused weights are deterministic but not bit-equal to the loop's.
    batched = {"fused": True} if next(model.parameters()).device.type in ("cuda", "cpu") else {"foreach": True}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **batched)
    return torch.optim.AdamW(groups, lr=cfg.lr, **batched)


def restart(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` as ``make_optimizer`` would build it afresh: its state zeroed in place (a step count of 0,
    moments of 0: what a fresh one starts from; the learning rate is the next scheduler's to set, from the
    ``initial_lr`` the first one recorded). Allocating AdamW's two moment buffers anew for each client cost
    ~0.15 s per client for MiniLM on the CPU (page faults on 180 MB), most of a small client's overhead over a bare
    training loop."""
    # one multi-tensor fill for the step counts and moments (315 tensors for MiniLM: as many launches on a GPU)
    held = [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    if held:  # none before the optimizer's first step
        torch._foreach_zero_(held)
    return optimizer


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ClientConfig, local_steps: int, round_: int,
                   rounds: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The client's learning-rate schedule: over its own ``local_steps`` (schedule_scope client: warm-up and decay
    restart every round), or over all rounds' steps, started where round ``round_`` begins (run)."""
    span, offset = (local_steps, 0) if cfg.schedule_scope == "client" else (rounds * local_steps,
                                                                           (round_ - 1) * local_steps)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * span),
                              num_training_steps=span)
    if not offset:
        return scheduler
    # the same schedule read `offset` steps on; one call per step, where stepping through the earlier rounds would
    # cost rounds x steps calls per client
    shifted = [lambda step, f=f: f(step + offset) for f in scheduler.lr_lambdas]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shifted)


def client_loader(dataset, indices: np.ndarray, collate, cfg: ClientConfig, seed: int, where: Device) -> DataLoader:
    """The client's batches of ``dataset[indices]``, drawn from ``seed`` alone: shuffled (random), or shuffled and
    grouped by token length (bucketed, ``training.batching``)."""
    subset = Subset(dataset, indices.tolist())
    # the loader also draws its worker base seed from this generator, so no draw touches the global RNG either way
    generator = torch.Generator().manual_seed(seed)
    common = {"generator": generator, "collate_fn": collate, "pin_memory": where.device.type == "cuda"}
    if cfg.batching == "bucketed":
        sampler = batching.BucketedBatches(dataset.lengths[indices], cfg.batch_size, seed)
        return DataLoader(subset, batch_sampler=sampler, **common)
    return DataLoader(subset, batch_size=cfg.batch_size, shuffle=True, **common)


def train_client(
    model: torch.nn.Module,
    global_state: dict[str, torch.Tensor],
    dataset,
    indices: np.ndarray,
    collate,
    cfg: ClientConfig,
    seed: int,
    where: Device,
    client: int,
    progress=None,
    *,
    round_: int = 1,
    rounds: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
) -> ClientResult:
    """Fine-tune ``model`` from ``global_state`` on ``dataset[indices]``; the trained weights stay in ``model``.

    ``round_`` of ``rounds`` places the client's steps in the run's schedule when ``cfg.schedule_scope`` is run.
    ``optimizer`` (from ``make_optimizer(model, cfg)``, shared by a cohort's clients) is restarted instead of
    built anew; the weights come out the same.
    """
    load_global(model, global_state)
    model.train()
    loader = client_loader(dataset, indices, collate, cfg, seed, where)
    optimizer = restart(optimizer) if optimizer is not None else make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.local_epochs * len(loader), round_, rounds)
    scaler = torch.amp.GradScaler(where.device.type, enabled=where.dtype == torch.float16)
    losses = []
    devices = [where.device] if where.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=where.device.type):
        torch.manual_seed(seed)  # dropout
        for _ in range(cfg.local_epochs):
            for batch in loader:
                batch = to_device(batch, where.device)
                with where.autocast():
                    loss = model(**batch).loss
                # FedProx pulls towards the weights the round started from; skipped at mu = 0, so it is FedAvg's
                # computation exactly. train_loss stays the data loss, comparable across strategies.
                objective = loss + strategy.proximal_term(model, global_state, cfg.prox_mu) if cfg.prox_mu else loss
                scaler.scale(objective).backward()
                if cfg.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())  # no .item(): reading a GPU value waits for the queued work
                if progress is not None:
                    progress.update(1)
    return ClientResult(client, len(indices), len(losses), float(np.mean(finite_losses(losses, round_, client))))


def finite_losses(losses: list[torch.Tensor], round_: int, client: int) -> list[float]:
    """The client's per-step losses, read from the device once; a non-finite one fails the run before aggregation
    can use the weights it produced."""
    values = torch.stack(losses).tolist()
    for step, value in enumerate(values, 1):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"round {round_}, client {client}: loss is {value} at local step {step}")
    return values
