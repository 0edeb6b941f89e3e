"""A train stage's DVC metric: the headline of its run record (`fedtune train --headline-out FILE`).

The record (`fedtune train --metrics-out`) holds the MLflow run id, the registered model and every final number; the
report reads it. `dvc metrics show` puts every metrics file of the pipeline in one table with a column per key, so
the metric keeps three numbers under short names and the table fits a terminal.
"""

from __future__ import annotations

HEADLINE = {"val_acc": "val_accuracy", "test_acc": "test_accuracy", "test_f1": "test_macro_f1"}  # metric: record key


def headline(record: dict) -> dict:
    return {short: record[key] for short, key in HEADLINE.items()}
