"""Evaluation of the global model on a split: loss, accuracy, macro-F1 (scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader

from training.client import Device
from training.features import to_device


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, collate, batch_size: int, where: Device) -> tuple[np.ndarray, float]:
    """(predicted labels, mean cross-entropy loss) over ``dataset``."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, pin_memory=where.device.type == "cuda")
    predictions, loss_sum = [], 0.0
    for batch in loader:
        batch = to_device(batch, where.device)
        with where.autocast():
            out = model(**batch)
        loss_sum += float(out.loss) * len(batch["labels"])
        predictions.append(out.logits.argmax(-1).cpu())
    return torch.cat(predictions).numpy(), loss_sum / len(dataset)


def scores(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def evaluate(model, dataset, collate, batch_size: int, where: Device) -> dict[str, float]:
    predictions, loss = predict(model, dataset, collate, batch_size, where)
    return {"loss": loss, **scores(dataset.labels, predictions)}
