"""Tokenized splits: each (dataset, tokenizer, max length) is tokenized once per process, not per round or trial."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding

from training.data import SPLITS, Split, Task


class Encoded(Dataset):
    """Token ids and labels of one split; padding happens per batch (``collator``)."""

    def __init__(self, input_ids: list[list[int]], labels: np.ndarray):
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": int(self.labels[i])}

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Tokens per text (length-bucketed batches group by it), counted once per split: ``encode_task`` keeps
        each split's ``Encoded`` for the process's life."""
        return np.array([len(ids) for ids in self.input_ids])


def _encode(split: Split, tokenizer, max_length: int) -> Encoded:
    ids = tokenizer(split.texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, split.labels)


_CACHE: dict[tuple, dict[str, Encoded]] = {}


def encode_task(task: Task, tokenizer, max_length: int) -> dict[str, Encoded]:
    """``{"train": Encoded, "validation": ..., "test": ...}``, cached by (task fingerprint, tokenizer, max length)."""
    key = (task.fingerprint, tokenizer.name_or_path, len(tokenizer), max_length)
    if key not in _CACHE:
        _CACHE[key] = {name: _encode(getattr(task, name), tokenizer, max_length) for name in SPLITS}
    return _CACHE[key]


def collator(tokenizer) -> DataCollatorWithPadding:
    """Dynamic padding to the longest text of each batch; attention masks come from the tokenizer."""
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
