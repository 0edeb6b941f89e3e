"""Scoring a model on a split (scikit-learn): loss, accuracy, macro-F1, the per-class report, the confusion figure."""

from __future__ import annotations

import re

import numpy as np
import torch
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, classification_report, f1_score
from torch.utils.data import DataLoader, Subset

from training.devices import Device
from training.features import to_device


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, collate, batch_size: int, where: Device) -> tuple[np.ndarray, float]:
    """(predicted labels, mean cross-entropy loss) over ``dataset`` (an ``Encoded`` split), in its row order.

    The texts are batched shortest first, so each batch pads to about its own texts' length: in shuffled batches of
    tweets ~40% of the tokens are padding. A text's prediction does not depend on its batch mates (padding is
    masked), so the order changes the work, not the result.
    """
    model.eval()
    order = np.argsort(dataset.lengths, kind="stable")
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, collate_fn=collate,
                        pin_memory=where.device.type == "cuda")
    predicted, loss_sum = [], 0.0
    for batch in loader:
        batch = to_device(batch, where.device)
        with where.autocast():
            out = model(**batch)
        loss_sum += float(out.loss) * len(batch["labels"])
        predicted.append(out.logits.argmax(-1).cpu())
    predictions = np.empty(len(dataset), dtype=np.int64)
    predictions[order] = torch.cat(predicted).numpy()
    return predictions, loss_sum / len(dataset)


def scores(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def evaluate(model, dataset, collate, batch_size: int, where: Device) -> dict[str, float]:
    predictions, loss = predict(model, dataset, collate, batch_size, where)
    return {"loss": loss, **scores(dataset.labels, predictions)}


def client_accuracies(labels: np.ndarray, predictions: np.ndarray, parts: list[np.ndarray]) -> list[float]:
    """Each client's accuracy on its own slice of a split (the paper's per-client test protocol), from one pass of
    predictions over the whole split: a row's prediction does not depend on the rows batched with it."""
    return [scores(labels[part], predictions[part])["accuracy"] for part in parts]


def report(labels, predictions, label_names: list[str], as_text: bool = False):
    """Per-class precision, recall, F1 and support, with accuracy and macro averages (scikit-learn's report)."""
    return classification_report(labels, predictions, labels=list(range(len(label_names))), target_names=label_names,
                                 zero_division=0, digits=4, output_dict=not as_text)


def per_class_metrics(report_dict: dict, label_names: list[str]) -> dict[str, float]:
    """``{"f1_positive": ..., "precision_positive": ..., "recall_positive": ...}``, keys safe for MLflow."""
    out = {}
    for name in label_names:
        key = re.sub(r"[^\w\-. /]", "_", name)
        for metric in ("precision", "recall", "f1"):
            out[f"{metric}_{key}"] = report_dict[name]["f1-score" if metric == "f1" else metric]
    return out


def confusion_figure(labels, predictions, label_names: list[str], title: str):
    """A confusion matrix with the label names on both axes (rows: true label, columns: predicted)."""
    from matplotlib.figure import Figure  # matplotlib loads only when a figure is drawn

    size = 3 + 0.6 * len(label_names)
    figure = Figure(figsize=(size, size), layout="constrained")
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(labels, predictions, labels=list(range(len(label_names))),
                                            display_labels=label_names, ax=axes, colorbar=False,
                                            xticks_rotation=45 if len(label_names) > 4 else "horizontal")
    axes.set_title(title, fontsize="medium")
    return figure
