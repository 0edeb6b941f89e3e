"""The config checked against its inputs (the data, the client split, the model's config.json) before torch and
transformers load, so that bad input fails in seconds with the field named, before any run is created.
"""

from __future__ import annotations

import numpy as np

from training import partition
from training.config import Config, ConfigError
from training.data import Task, load_task
from training.models import check_head, check_positions, model_config


def check(config: Config, split: list[np.ndarray] | None = None,
          where: str = "the client split") -> tuple[Task, list[np.ndarray]]:
    """The task and its client split (partitioned by the config unless ``split`` is given), both checked.

    ``where`` names the split's origin in errors, e.g. ``--split FILE``.
    """
    model = model_config(config.model)  # before the data: a wrong model.name is the cheaper mistake to report
    check_positions(config.model, model)
    task = load_task(config.data)
    check_head(config.model, model, len(task.label_names))
    if split is None:
        split = partition.by_config(task.train.labels, config)
    elif len(split) != config.fl.num_clients:
        raise ConfigError(f"fl.num_clients={config.fl.num_clients} but {where} holds {len(split)} clients; "
                          f"set fl.num_clients={len(split)} or pass the matching split")
    partition.check_split(split, len(task.train), where, config.partition.drop_remainder)
    return task, split
