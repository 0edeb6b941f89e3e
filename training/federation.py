"""Everything a federated run needs, built once from the config: task, tokenized splits, client partition, model."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from training import divergence, lora, partition, preflight
from training.client import client_seed, load_global
from training.config import Config
from training.data import Task
from training.devices import Device, pick_device
from training.features import Encoded, collator, encode_task
from training.models import align_padding, load_model, load_tokenizer


@dataclass
class Federation:
    config: Config
    task: Task
    tokenizer: object
    model: torch.nn.Module  # the one instance every client and every evaluation uses
    encoded: dict[str, Encoded]
    parts: list[np.ndarray]  # client id -> row indices into the training split
    where: Device

    @property
    def lora(self) -> bool:
        return self.config.peft.method == "lora"

    @property
    def exact(self) -> bool:
        """LoRA with exact aggregation: the clients' B·A products are summed and folded into the base weights."""
        return self.lora and self.config.peft.aggregation == "exact"

    @functools.cached_property
    def collate(self):
        return collator(self.tokenizer)

    @functools.cached_property
    def signs(self) -> divergence.Signs:
        """The random signs of the update sketches (training.divergence), sized for the exchanged weights."""
        return divergence.signs(self.shared())

    def seed_for(self, round_: int, client: int) -> int:
        return client_seed(self.config.fl.seed, round_, client)

    @property
    def split_fingerprint(self) -> str:
        return partition.fingerprint(self.parts)

    def shared(self) -> dict[str, torch.Tensor]:
        """The model's tensors a round exchanges (no copy): under LoRA the adapters and the head, else every weight."""
        return lora.trainable(self.model) if self.lora else self.model.state_dict()

    def global_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.shared().items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_global(self.model, state)


def build(config: Config, split: list[np.ndarray] | None = None, device: str | None = None) -> Federation:
    """Load and check everything before any training starts, so bad input fails in seconds.

    ``device`` overrides ``runtime.device`` (a torchrun worker's own GPU).
    """
    task, split = preflight.check(config, split)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    where = pick_device(device or config.runtime.device, config.runtime.precision)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, task.label_names, config.fl.seed)
    align_padding(model, tokenizer)
    if config.peft.method == "lora":
        model = lora.wrap(model, config.peft, config.fl.seed)
    model = model.to(where.device)
    if config.runtime.compile:
        # in place: the module keeps its own state_dict keys and parameters, which every client loads into
        model.compile()
    encoded = encode_task(task, tokenizer, config.model.max_length)
    return Federation(config, task, tokenizer, model, encoded, split, where)
