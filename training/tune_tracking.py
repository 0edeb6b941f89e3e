"""The MLflow side of a tuning study: its parent run, the tally of its trials, Optuna's plots, and the state each
trial's child run is marked with (complete, pruned, failed, lost with its worker).

MLflow loads inside the functions, so ``fedtune tune`` refuses a bad storage before MLflow is imported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from training import optuna_storage
from training.config import Config

PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: where trials and workers find the parent run
SETTLE_SECONDS = 1.0  # lets runs created by workers starting together commit before the earliest one is chosen


@dataclass
class Tally:
    """Where a study stands, counted over all its workers."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    rounds_saved: int = 0  # rounds the pruned trials did not run
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    best_trial: int | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def tally(study) -> Tally:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {state: sum(t.state == state for t in trials) for state in TrialState}
    result = Tally(count[TrialState.COMPLETE], count[TrialState.PRUNED], count[TrialState.FAIL],
                   sum(t.user_attrs.get("rounds_saved", 0) for t in trials if t.state == TrialState.PRUNED))
    if result.complete:
        best = study.best_trial
        result.best_value, result.best_params, result.best_trial = best.value, best.params, best.number
    return result


# the parent run -------------------------------------------------------------------------------------------------------
def parent_run(client, config: Config, study, storage: str) -> str:
    """The study's one parent run, found by its tags or else created.

    Workers that start together may each create one; after a moment to let those commit, all keep the earliest
    and the others delete their own (which has no children yet).
    """
    from mlflow.entities import Param

    from training import tracking

    experiment_id = tracking.experiment_id(client, config.tracking.experiment)
    # the id tells a study from an earlier one of the same name that was deleted (Optuna keeps it private)
    tags = {"optuna.study": study.study_name, "optuna.storage": storage, "optuna.study_id": str(study._study_id)}
    query = " AND ".join(f"tags.`{k}` = {tracking.quoted(v)}" for k, v in tags.items())

    def earliest():
        return min(client.search_runs([experiment_id], query), key=lambda r: (r.info.start_time, r.info.run_id),
                   default=None)

    found = earliest()
    if found is None:
        mine = client.create_run(experiment_id, run_name=study.study_name, tags=tags).info.run_id
        # the params every trial shares; the sampled keys and the per-command total would only mislead here
        shared = {k: v for k, v in config.flat().items() if k not in config.tune.space and k != "tune.trials"}
        client.log_batch(mine, params=[Param(k, str(v)[:6000]) for k, v in shared.items()])
        time.sleep(SETTLE_SECONDS)
        found = earliest()
        if found.info.run_id != mine:
            client.delete_run(mine)
    study.set_user_attr(PARENT_ATTR, found.info.run_id)
    return found.info.run_id


def log_tally(client, parent: str, study, requested: int, step: int) -> None:
    """The study's counts, best value and best params on the parent run (best params as tags: params are immutable)."""
    from mlflow.entities import RunTag

    from training import tracking

    now = tally(study)
    tracking.log_metrics(client, parent, {
        "trials_requested": requested, "trials_complete": now.complete, "trials_pruned": now.pruned,
        "trials_failed": now.failed, "rounds_saved": now.rounds_saved,
        **({"best_value": now.best_value} if now.best_value is not None else {}),
    }, step)
    if now.best_value is not None:
        best = {f"best.{k}": str(v) for k, v in now.best_params.items()} | {"best.trial": str(now.best_trial)}
        client.log_batch(parent, tags=[RunTag(k, v) for k, v in best.items()])
        client.log_dict(parent, now.best_params, "best_params.yaml")


def log_plots(client, parent: str, study, complete: int) -> None:
    """Optuna's optimization-history, intermediate-values and parameter-importance plots as PNG artifacts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    figures = {"optimization_history": plots.plot_optimization_history,
               "intermediate_values": plots.plot_intermediate_values}
    if complete >= 2:  # fANOVA needs two complete trials to compare
        figures["param_importances"] = plots.plot_param_importances
    else:
        client.set_tag(parent, "plots.note", "parameter importances need at least 2 complete trials")
    for name, plot in figures.items():
        with optuna_storage.quiet():
            figure = plot(study).figure
        figure.tight_layout()
        client.log_figure(parent, figure, f"plots/{name}.png")
        plt.close(figure)


# the trials' child runs -----------------------------------------------------------------------------------------------
def mark_complete(client, run_id: str) -> None:
    client.set_tag(run_id, "optuna.state", "complete")


def mark_pruned(client, run_id: str, rounds_run: int, saved: int) -> None:
    from training import tracking

    tracking.log_metrics(client, run_id, {"rounds_saved": saved}, rounds_run)
    client.set_tag(run_id, "optuna.state", "pruned")
    client.set_terminated(run_id, "KILLED")  # MLflow has no "pruned" status; the tag says which


def mark_failed(client, parent: str, number: int, reason: str) -> None:
    """Tag trial ``number``'s child run failed, and end it when its process could not (a killed worker)."""
    from training import tracking

    query = (f"tags.`mlflow.parentRunId` = {tracking.quoted(parent)} AND "
             f"tags.`optuna.trial` = {tracking.quoted(str(number))}")
    for run in client.search_runs([client.get_run(parent).info.experiment_id], query):
        client.set_tag(run.info.run_id, "optuna.state", "failed")
        if run.info.status == "RUNNING":
            tracking.finish(client, run.info.run_id, ok=False, reason=reason)


def mark_lost(study, number: int) -> None:
    """Mark trial ``number``'s child run failed because its worker stopped beating (Optuna reruns the trial)."""
    from training import tracking

    if PARENT_ATTR in study.user_attrs:
        mark_failed(tracking.connect(), study.user_attrs[PARENT_ATTR], number,
                    "worker lost: no heartbeat; the trial is retried with the same params")
