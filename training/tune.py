"""``fedtune tune``: an Optuna study of the client learning rate and local epochs (or any config field) for one
(task, model, client count); each trial is one ``train`` run, nested under the study's MLflow parent run.

The study lives in a journal file in the workspace (no server; safe for many processes on one machine) or in any
Optuna RDB (PostgreSQL for workers on many machines). Running the same command again joins or resumes it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training import optuna_storage, tune_tracking
from training.callbacks import Callback
from training.config import Config

SETUP_ATTR = "setup"  # study user attr: what every trial of the study shares (see ``setup``)
MAX_RETRY = 2  # a trial whose worker died is rerun at most this often, so a trial that kills its worker cannot loop
POLL_SECONDS = 1.0  # how often a worker waiting for other workers' trials looks at the study
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TuneResult:
    study_name: str
    storage: str  # the storage as shown to people: the journal path, or the URL without its password
    parent_run_id: str
    requested: int
    ran: int  # trials this worker ran
    seconds: float  # this worker's wall time
    tally: tune_tracking.Tally


def write_best(path: Path, params: dict, note: str) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {note}\n{yaml.safe_dump(params, sort_keys=True)}")


# the study ------------------------------------------------------------------------------------------------------------
def tune(config: Config, split=None, out=None) -> TuneResult:
    """Launch, join or resume the study and run trials until it has ``tune.trials`` finished ones."""
    import optuna

    out, started = out or sys.stdout, time.perf_counter()

    # 1. the storage first: a bad --storage fails in seconds, before data, model or MLflow are touched
    storage, shown = optuna_storage.open_storage(config, on_stale=retry_stale)
    from training import tracking
    from training.data import load_task

    # 2. open (or join) the study, check it measures the same setup, and find its MLflow parent run
    task = load_task(config.data)
    shared = setup(config, task.fingerprint, split)
    client, parent = tracking.connect(), None
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name(config, task.name, shared), direction="maximize",
            load_if_exists=True,
            # constant_liar: concurrent workers see each other's running trials and spread out instead of piling up
            sampler=optuna.samplers.TPESampler(seed=config.tune.seed or None, constant_liar=True),
            pruner=make_pruner(config),
        )
        check_setup(study, shared)
        parent = tune_tracking.parent_run(client, config, study, shown)

        # 3. run the trials the study still lacks
        earlier = len(study.trials)
        missing = config.tune.trials - tune_tracking.tally(study).finished
        if missing > 0:
            client.update_run(parent, status="RUNNING")
            run_trials(study, config, objective(config, split, client, parent, out), client, parent, out)
        else:
            print(f"study {study.study_name} already has {config.tune.trials - missing} finished trials; "
                  f"nothing to run (raise --trials to extend it)", file=out)

        # 4. the study's standing, best params and plots on the parent run
        result = tune_tracking.tally(study)
        tune_tracking.log_tally(client, parent, study, config.tune.trials, len(study.trials))
        tune_tracking.log_plots(client, parent, study, result.complete)
    except Exception as err:
        down = optuna_storage.unavailable(storage)
        if down is None:
            raise
        if parent is not None:  # a rerun sets it RUNNING again
            tracking.finish(client, parent, ok=False, reason=str(down))
        if err is down:
            raise
        raise down from err  # Optuna, unwinding a trial it could not record, may raise an unrelated error
    if result.finished >= config.tune.trials:
        tracking.finish(client, parent, ok=True)
    ran = sum(t.user_attrs.get("worker") == WORKER for t in study.trials[earlier:])
    return TuneResult(study.study_name, shown, parent, config.tune.trials, ran, time.perf_counter() - started, result)


def run_trials(study, config: Config, run_one, client, parent: str, out) -> None:
    """Run trials until the study has ``tune.trials`` finished ones, waiting for other workers' running trials:
    a trial whose worker died is failed by its heartbeat and rerun here, so ``--trials N`` means N finished."""
    import optuna
    from optuna.trial import TrialState

    from training.client import NonFiniteLoss

    # Running and queued trials count too, so workers stop together at the total instead of each adding one;
    # a dead worker's trial must not count as running, so stale trials are failed (and requeued) first.
    stop = optuna.study.MaxTrialsCallback(
        config.tune.trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING))

    def progress(study, trial):
        tune_tracking.log_tally(client, parent, study, config.tune.trials, trial.number)

    while (missing := config.tune.trials - tune_tracking.tally(study).finished) > 0:
        before = config.tune.trials - missing
        # `stop` last: between its count and this worker's next trial, another worker that counts sees neither,
        # and both start one (N + 1 trials). Logging the tally to MLflow there made that window tens of ms wide.
        study.optimize(run_one, n_trials=missing, catch=(NonFiniteLoss,), callbacks=[fail_stale, progress, stop])
        wait_for_running(study, config.tune.heartbeat_seconds, out)
        stalled = tune_tracking.tally(study).finished == before
        if stalled and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return  # every trial of this pass failed by itself (say, a diverging lr): stop rather than loop


def wait_for_running(study, interval: int, out) -> None:
    """Wait while other workers' trials run: each one ends, or, its worker gone, goes ``2 * interval`` seconds
    without a heartbeat and is failed and requeued here (``retry_stale``). A worker that left earlier would leave
    such a trial RUNNING, uncounted and unretried, with the study short of ``--trials``."""
    from optuna.trial import TrialState

    told: set[int] = set()
    while running := {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}:
        if running - told:
            print(f"waiting for trial {', '.join(map(str, sorted(running - told)))} of another worker: it finishes "
                  f"there, or, if that worker is gone, it is failed after {2 * interval} s without a heartbeat and "
                  f"rerun here with the same params", file=out, flush=True)
            told |= running
        fail_stale(study, None)
        time.sleep(min(interval, POLL_SECONDS))


# Settings of how a run is kept, not of what it learns: a study's trials stay comparable whatever they are.
BOOKKEEPING = ("fl.checkpoint_every", "fl.keep_checkpoints")


def setup(config: Config, data_fingerprint: str, split=None) -> dict:
    """What decides a trial's accuracy besides its sampled values: the data (by content), the clients' split, the
    model and every client and FL setting outside the search space, the space and the objective. Trials of one study
    are comparable only if they share it. Runtime (device, precision, threads) and tracking are left out, so workers
    on different machines can join one study."""
    import json

    from training import partition

    flat = config.flat()
    sections = ("model", "client", "fl") if split is not None else ("model", "partition", "client", "fl")
    shared = {k: v for k, v in flat.items()
              if k.split(".")[0] in sections and k not in config.tune.space and k not in BOOKKEEPING}
    shared["data.fingerprint"] = data_fingerprint
    if split is not None:
        shared["split.fingerprint"] = partition.fingerprint(split)
    shared["tune.space"], shared["tune.objective"] = config.tune.space, config.tune.objective
    return json.loads(json.dumps(shared, sort_keys=True))  # as the study stores it


def setup_hash(shared: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:8]


def study_name(config: Config, task_name: str, shared: dict) -> str:
    """``tune.study_name``, else TASK-MODEL-K<k>-<setup hash>: rerunning a command joins its study, and a changed
    setup (data, split, rounds, space...) starts a new one instead of mixing incomparable trials."""
    if config.tune.study_name:
        return config.tune.study_name
    from training.models import slug

    return f"{task_name}-{slug(config.model.name)}-K{config.fl.num_clients}-{setup_hash(shared)}"


def check_setup(study, shared: dict) -> None:
    """Record the setup in a new study; refuse to add trials of another setup to an existing one."""
    from training.config import ConfigError

    recorded = study.user_attrs.get(SETUP_ATTR)
    if recorded is None:
        study.set_user_attr(SETUP_ATTR, shared)
        return
    differ = sorted(k for k in recorded.keys() | shared.keys() if recorded.get(k) != shared.get(k))
    if differ:
        shown = "; ".join(f"{k}: {recorded.get(k, '(unset)')!r} there, {shared.get(k, '(unset)')!r} here"
                          for k in differ[:5])
        raise ConfigError(
            f"tune.study_name: study {study.study_name!r} holds trials of another setup ({shown}), and trials of "
            f"different setups are not comparable. Run with the study's setup, pick a new --study-name, or leave "
            f"tune.study_name empty: the default name carries a hash of the setup, so a new setup gets its own study")


def make_pruner(config: Config):
    import optuna

    if config.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.fl.rounds)
    if config.tune.pruner == "none":
        return optuna.pruners.NopPruner()
    # Two finished trials give the first fair median. No warmup: studies run few rounds (3 by default), and a trial
    # that is behind after round 1 is where pruning saves the most.
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


# one trial ------------------------------------------------------------------------------------------------------------
class Pruning(Callback):
    """The round loop's callback: reports each evaluated round's validation accuracy to Optuna and stops the run
    when the pruner says so."""

    def __init__(self, trial, rounds: int):
        self.trial, self.rounds, self.pruned = trial, rounds, False

    def after_round(self, round_: int, metrics: dict, clients: list[dict]) -> bool:
        if "val_accuracy" not in metrics:
            return False
        self.trial.report(metrics["val_accuracy"], round_)
        # Pruning at the last round saves nothing and would hide a finished trial's value.
        self.pruned = round_ < self.rounds and self.trial.should_prune()
        return self.pruned


def suggest(trial, key: str, spec: dict):
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    number = float if spec["type"] == "float" else int
    suggest_number = trial.suggest_float if spec["type"] == "float" else trial.suggest_int
    return suggest_number(key, number(spec["low"]), number(spec["high"]), log=bool(spec.get("log", False)))


def objective(config: Config, split, client, parent: str, out):
    """One trial: sample the space, run ``train`` as a child run with the pruning callback, return its accuracy.

    The objective is the best round's validation accuracy (``tune.objective=best``), the figure the paper reports;
    the pruner also compares each trial's best value so far, so both measure the same thing.
    """
    import optuna

    from training.train import train

    def run_trial(trial) -> float:
        trial.set_user_attr("worker", WORKER)
        params = {key: suggest(trial, key, spec) for key, spec in config.tune.space.items()}
        trial_config = config.override(**params, **{
            "tracking.run_name": f"{trial.study.study_name}-trial-{trial.number:03d}",
            "tracking.log_model": False,
            "tracking.register": False,
            # a retried trial starts over, never from a checkpoint: keep only the last round's
            "fl.checkpoint_every": config.fl.rounds,
        })
        tags = {"optuna.trial": str(trial.number), "optuna.state": "running", "optuna.worker": WORKER}
        retry_of = _frozen(trial).system_attrs.get("failed_trial")  # set by RetryHeartbeatStaleTrialCallback
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        pruning = Pruning(trial, config.fl.rounds)
        try:
            result = train(trial_config, split, callbacks=(pruning,), parent_run_id=parent, tags=tags, out=out)
        except Exception as err:  # train has marked its run FAILED; say so in the study's terms too
            tune_tracking.mark_failed(client, parent, trial.number, f"{type(err).__name__}: {err}")
            raise
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if pruning.pruned:
            rounds_run = len(result.history.rounds)
            saved = config.fl.rounds - rounds_run
            trial.set_user_attr("rounds_saved", saved)
            tune_tracking.mark_pruned(client, result.run_id, rounds_run, saved)
            raise optuna.TrialPruned(f"pruned after round {rounds_run}; {saved} rounds saved")
        tune_tracking.mark_complete(client, result.run_id)
        return result.history.best() if config.tune.objective == "best" else result.history.last()

    return run_trial


def _frozen(trial):
    """The stored record of a running trial (the live ``Trial`` does not expose system attrs)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def fail_stale(study, trial) -> None:
    """Optuna's own check for trials whose worker stopped beating (it runs it before each trial, not after)."""
    from optuna.storages import fail_stale_trials

    with optuna_storage.quiet():
        fail_stale_trials(study)


def retry_stale(study, trial) -> None:
    """Called (by Optuna, in a live worker) for a trial whose worker stopped beating: rerun it, same params."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with optuna_storage.quiet():
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
    tune_tracking.mark_lost(study, trial.number)


# summary --------------------------------------------------------------------------------------------------------------
def print_summary(result: TuneResult, config: Config, out=None) -> None:
    from training import tracking

    out, t = out or sys.stdout, result.tally
    print(f"\nstudy {result.study_name}: {t.finished} of {result.requested} trials finished ({t.complete} complete, "
          f"{t.pruned} pruned), {t.failed} failed; this worker ran {result.ran} in {result.seconds:.1f}s", file=out)
    if t.best_value is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.best_params.items())
        print(f"best trial {t.best_trial}: validation accuracy {t.best_value:.4f} ({config.tune.objective} round), "
              f"{params}", file=out)
    print(f"pruning saved {t.rounds_saved} of {t.finished * config.fl.rounds} rounds", file=out)
    print(f"MLflow parent run {result.parent_run_id} in experiment '{config.tracking.experiment}' at "
          f"{tracking.tracking_uri()}", file=out)
    print(f"watch: optuna-dashboard {result.storage}", file=out)
