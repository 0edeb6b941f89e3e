"""Registered models: what a model reference (``models:/NAME@ALIAS``, a run id...) names, and ``fedtune evaluate``,
which scores that model on a split of its task.

Each evaluation is its own MLflow run (experiment ``fedtune-evaluation``) linked to the model version, and the
version's tags keep its latest scores, so ``promote`` compares versions without evaluating them again.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.config import Config, ConfigError

if TYPE_CHECKING:  # numpy and the data stack load only when a command runs
    import numpy as np

    from training.data import Task

EXPERIMENT = "fedtune-evaluation"
SPLITS = ("validation", "test")
METRICS = ("accuracy", "macro_f1")
REF_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, a run id (32 hex digits) or runs:/RUN_ID/MODEL_NAME"
_RUN = re.compile(r"(?:runs:/)?([0-9a-f]{32})(?:/[^/@]+)?/?")
_VERSION = re.compile(r"models:/(.+)/(\d+)")
_ALIAS = re.compile(r"models:/(.+)@([\w-]+)")


@dataclass(frozen=True)
class Target:
    """The model an evaluation scores: where to load it, the run that trained it and, when registered, its version."""

    uri: str
    run_id: str
    model_id: str | None = None  # MLflow's logged-model id; evaluation metrics are attached to it
    name: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.name else self.uri


def parse_ref(ref: str) -> tuple[str, ...]:
    """``("alias", name, alias)``, ``("version", name, version)`` or ``("run", run_id)``."""
    for kind, pattern in (("run", _RUN), ("version", _VERSION), ("alias", _ALIAS)):
        match = pattern.fullmatch(ref.strip())
        if match:
            return (kind, *match.groups())
    raise ConfigError(f"model {ref!r}: expected {REF_FORMS}")


# ---- finding the model ----------------------------------------------------------------------------------------------


def resolve(client, ref: str) -> Target:
    """The registered version (or run) ``ref`` names; an unknown name, alias, version or run is a ConfigError."""
    kind, *parts = parse_ref(ref)
    if kind == "run":
        return _run_target(client, parts[0])
    name, which = parts
    registered = registered_model(client, name)
    version = registered.aliases.get(which) if kind == "alias" else which
    if version is None:
        held = ", ".join(f"@{a} (version {v})" for a, v in sorted(registered.aliases.items())) or "none"
        raise ConfigError(f"model {name!r} has no alias {which!r}; its aliases: {held}. Pass one of those, or "
                          f"models:/{name}/VERSION with one of versions {versions(client, name)}")
    return version_target(client, name, str(version))


def version_target(client, name: str, version: str) -> Target:
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(name, version)
    except MlflowException as err:
        known = versions(client, name)
        raise ConfigError(f"model {name!r} has no version {version}; its versions are {known}") from err
    # MLflow 3 registers a logged model by the model's own URI, models:/m-<id>
    logged = found.source.startswith("models:/m-")
    model_id = found.model_id or (found.source.removeprefix("models:/") if logged else None)
    return Target(f"models:/{name}/{version}", found.run_id, model_id, name, version)


def registered_model(client, name: str):
    """MLflow's registered model ``name``; an unknown name is a ConfigError listing the registered ones."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        known = sorted(m.name for m in client.search_registered_models()) or ["none yet: `fedtune train` registers one"]
        raise ConfigError(f"no registered model named {name!r}; registered models: {', '.join(known)}") from err


def versions(client, name: str) -> list[int]:
    """The model's version numbers, for the messages that say what to pass."""
    from training.tracking import quoted

    return sorted(int(v.version) for v in client.search_model_versions(f"name = {quoted(name)}"))


def _run_target(client, run_id: str) -> Target:
    from training.tracking import get_run, quoted

    run = get_run(client, run_id, f"no MLflow run {run_id} in this tracking store; pass {REF_FORMS}")
    # whatever its name: a training run logs one final model (the newest, should a resume have logged another)
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = {quoted(run_id)}",
                                         order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    if not logged:
        raise ConfigError(f"run {run_id} has no logged model (was it trained with tracking.log_model=false, or did it "
                          f"fail?); pass a run that finished training, or models:/NAME@ALIAS")
    model_id = logged[0].model_id
    # a registered version of this model gets the evaluation's tags too
    for version in client.search_model_versions(f"run_id = {quoted(run_id)}"):
        if version.source == f"models:/{model_id}":
            return Target(f"models:/{model_id}", run_id, model_id, version.name, str(version.version))
    return Target(f"models:/{model_id}", run_id, model_id)


# ---- scoring --------------------------------------------------------------------------------------------------------


def data_config(trained: Config, data: str | None, overrides: list[str]) -> Config:
    """The run's config with ``--data`` and ``--set data.*`` applied; the model's own settings stay the run's."""
    from training.config import parse_overrides

    dotted = parse_overrides(overrides)
    other = [k for k in dotted if not k.startswith("data.")]
    if other:
        raise ConfigError(f"--set {other[0]}: evaluate takes only data.* settings; the model and its max length "
                          f"come from the run that trained it")
    if data:
        dotted["data.source"] = data
    return trained.override(**dotted)


def trained_config(client, run_id: str) -> Config:
    import mlflow
    from mlflow.exceptions import MlflowException

    from training import store
    from training.config import from_dict

    try:
        return from_dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json"))
    except MlflowException as err:
        recorded = store.local_path(client.get_run(run_id).info.artifact_uri)
        if recorded is not None and not recorded.exists():
            raise ConfigError(f"run {run_id}'s artifacts are not at {recorded}, where the tracking store records "
                              f"them; copy the store's whole folder (mlflow.db and artifacts/) and open the copy with "
                              f"fedtune, or run `fedtune relocate` on it") from err
        raise ConfigError(f"run {run_id} has no config.json, so its data is unknown; it was not trained by fedtune "
                          f"train") from err


@dataclass
class Evaluation:
    target: Target
    split: str
    task: Task
    predictions: np.ndarray
    loss: float
    data_source: str  # the data.source evaluated
    trained_fingerprint: str | None  # the dataset the model was trained on, from its run's tags

    @property
    def labels(self) -> np.ndarray:
        return getattr(self.task, self.split).labels

    @property
    def same_data(self) -> bool:
        return self.task.fingerprint == self.trained_fingerprint

    def scores(self) -> dict[str, float]:
        from training.evaluate import scores

        return {**scores(self.labels, self.predictions), "loss": self.loss}

    def report(self, as_text: bool = False):
        from training.evaluate import report

        return report(self.labels, self.predictions, self.task.label_names, as_text)


def score(client, target: Target, split: str, data: str | None = None, overrides: list[str] = (),
          batch_size: int | None = None) -> Evaluation:
    """Load the model and predict the split of its task (or of ``--data``) on the GPU when there is one."""
    import mlflow

    from training import dataref
    from training.data import load_task
    from training.devices import pick_device
    from training.evaluate import predict
    from training.features import collator, encode_task

    trained = trained_config(client, target.run_id)
    recorded = client.get_run(target.run_id).data.tags
    cfg = data_config(trained, data, list(overrides))
    if not data and cfg.data.source == trained.data.source:  # the run's own data, wherever it is from here
        cfg = cfg.override(**{"data.source": dataref.find(cfg.data.source, recorded, target.run_id)})
    task = load_task(cfg.data)
    where = pick_device("auto", "auto")
    parts = mlflow.transformers.load_model(target.uri, return_type="components")
    model, tokenizer = parts["model"].to(where.device), parts["tokenizer"]
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != task.label_names:
        raise ConfigError(f"{target} predicts labels {names} but task {task.name!r} ({cfg.data.source}) has "
                          f"{task.label_names}; pass --data with a task of the same labels")
    encoded = encode_task(task, tokenizer, trained.model.max_length)[split]
    predictions, loss = predict(model, encoded, collator(tokenizer), batch_size or trained.runtime.eval_batch_size,
                                where)
    return Evaluation(target, split, task, predictions, loss, cfg.data.source, recorded.get("dataset.fingerprint"))


# ---- recording ------------------------------------------------------------------------------------------------------


def log_evaluation(client, evaluation: Evaluation) -> str:
    """One FINISHED run in EXPERIMENT holding scores, report and figure; returns its id."""
    import time

    from mlflow.entities import Metric, Param

    from training import tracking
    from training.evaluate import confusion_figure, per_class_metrics

    target, task, split = evaluation.target, evaluation.task, evaluation.split
    tags = {"fedtune.evaluation": "true", "model.uri": str(target), "model.source_run_id": target.run_id,
            "task": task.name, "split": split, "dataset.fingerprint": task.fingerprint,
            "dataset.matches_training": str(evaluation.same_data).lower()}
    if target.name:
        tags.update({"model.name": target.name, "model.version": target.version})
    run_name = f"eval-{target.name}-v{target.version}-{split}" if target.name else f"eval-{target.run_id[:8]}-{split}"
    run_id = client.create_run(tracking.experiment_id(client, EXPERIMENT), run_name=run_name, tags=tags).info.run_id
    summary = evaluation.report()
    values = {**evaluation.scores(), **per_class_metrics(summary, task.label_names)}
    now = int(time.time() * 1000)
    # model_id and the dataset put these numbers on the logged model's own page in the MLflow UI as well
    metrics = [Metric(k, float(v), now, 0, model_id=target.model_id, dataset_name=f"{task.name}-{split}",
                      dataset_digest=task.fingerprint) for k, v in values.items()]
    params = [Param("split", split), Param("data.source", evaluation.data_source),
              Param("texts", str(len(evaluation.labels)))]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.log_dict(run_id, summary, "classification_report.json")
    title = f"{target}\n{task.name} {split}, {len(evaluation.labels)} texts"
    client.log_figure(run_id, confusion_figure(evaluation.labels, evaluation.predictions, task.label_names, title),
                      "confusion_matrix.png")
    tracking.finish(client, run_id, ok=True)
    return run_id


def tag_version(client, evaluation: Evaluation, run_id: str) -> None:
    """Keep the latest scores on the model version, with the data they were measured on."""
    prefix = f"eval.{evaluation.split}"
    values = evaluation.scores()
    # full precision: promote compares these strings' values
    tags = {f"{prefix}.{k}": repr(values[k]) for k in (*METRICS, "loss")}
    tags.update({f"{prefix}.run_id": run_id, f"{prefix}.dataset": evaluation.task.fingerprint})
    for key, value in tags.items():
        client.set_model_version_tag(evaluation.target.name, evaluation.target.version, key, value)


def evaluate(client, target: Target, split: str, data: str | None = None, overrides: list[str] = (),
             batch_size: int | None = None, out=None) -> dict:
    """Score, log and tag one model; print the table. Returns the summary ``--out`` writes."""
    from training import tracking

    out = out or sys.stdout
    evaluation = score(client, target, split, data, overrides, batch_size)
    task = evaluation.task
    print(f"fedtune: {target} (trained in run {target.run_id}) on {task.name} {split}: "
          f"{len(evaluation.labels)} texts", file=out)
    if not evaluation.same_data:
        print(f"note: this task's data (fingerprint {task.fingerprint}) is not the data the model was trained on "
              f"({evaluation.trained_fingerprint or 'unrecorded'}): its {split} texts may overlap the model's "
              f"training texts", file=out)
    run_id = log_evaluation(client, evaluation)
    values = evaluation.scores()
    print("\n" + evaluation.report(as_text=True), file=out)
    print(f"accuracy {values['accuracy']:.4f}   macro-F1 {values['macro_f1']:.4f}   loss {values['loss']:.4f}\n",
          file=out)
    print(f"evaluation run {run_id} in experiment '{EXPERIMENT}' at {tracking.tracking_uri()}", file=out)
    if target.name:
        tag_version(client, evaluation, run_id)
        print(f"scores tagged on {target} as eval.{split}.*", file=out)
    else:
        print(f"{target} is not registered, so no model version was tagged", file=out)
    if tracking.tracking_uri().startswith("sqlite:///"):
        print(f"browse: mlflow ui --backend-store-uri {tracking.tracking_uri()}", file=out)
    return {"model": str(target), "source_run_id": target.run_id, "evaluation_run_id": run_id, "split": split,
            "task": task.name, "dataset_fingerprint": task.fingerprint, "same_data_as_training": evaluation.same_data,
            **values, "report": evaluation.report()}
