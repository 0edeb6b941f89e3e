"""Faults at the edges of a study, injected as they happen: a bad or unreachable ``--storage``, a worker killed
mid-trial while another runs on, and the study's PostgreSQL server stopped while a trial runs, briefly and for longer
than a worker waits. Every drill synchronises with the study's state (or a process's exit), never with the clock,
except for the outage's own 20 s."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.test_tune import (
    STUDY,
    fedtune_tune,
    finished,
    load_study,
    load_study_when_created,
    postgres_server,
    sets,
    wait_for,
)

# Long enough trials (5 unpruned rounds) to act inside one.
DRILL = [*STUDY, "fl.rounds=5", "tune.pruner=none", "tune.trials=2"]


@pytest.fixture(scope="module")
def own_postgres():
    """A PostgreSQL server these drills may stop: never the shared one of the other tests (or CI's)."""
    with postgres_server() as server:
        yield server


def with_password(url: str) -> str:
    """The server trusts loopback, so any password works: one the output must never show."""
    return url.replace("postgres@", "postgres:s3cret-pw@")


def study_runs(store: str, name: str) -> tuple:
    """(the study's parent run, its child runs by trial number); a trial with two child runs fails the lookup."""
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("fedtune").experiment_id
    [parent] = client.search_runs([experiment], f"tags.`optuna.study` = '{name}'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial = {int(child.data.tags["optuna.trial"]): child for child in children}
    assert len(by_trial) == len(children), "one child run per trial"
    return parent, by_trial


def assert_study_whole(name: str, url: str, store: str, at_least: bool = False) -> list:
    """The study has its 2 finished trials (``at_least``: a worker that joins while the last trial runs may add
    one), numbers unique, none running or queued, every trial's MLflow child run in the matching state, and each
    lost trial rerun with its params. Returns the trials."""
    trials = load_study(name, url).trials
    numbers = [t.number for t in trials]
    done = len(finished(load_study(name, url)))
    assert (done >= 2 if at_least else done == 2) and len(numbers) == len(set(numbers))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    parent, children = study_runs(store, name)
    assert parent.info.status == "FINISHED" and sorted(children) == numbers
    states = {TrialState.COMPLETE: ("complete", "FINISHED"), TrialState.FAIL: ("failed", "FAILED")}
    for trial in trials:
        child = children[trial.number]
        assert (child.data.tags["optuna.state"], child.info.status) == states[trial.state], trial.number
    for lost in (t for t in trials if t.state == TrialState.FAIL):
        [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
        assert retry.params == lost.params and retry.state == TrialState.COMPLETE
        assert children[retry.number].data.tags["optuna.retry_of"] == str(lost.number)
    return trials


def start_worker(overrides: list[str], log: Path, *args: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(fedtune_tune(*sets(*overrides), *args), stdout=out, stderr=subprocess.STDOUT)


def reported(round_: int):
    """The condition 'some trial has reported round ``round_``' (so it is inside its run, and that write is over)."""
    return lambda trials: any(round_ in t.intermediate_values for t in trials)


# bad --storage --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage, problem", [
    ("foo://x", "unknown database scheme 'foo'"),
    ("optuna.db", "not a database URL"),
    ("postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:{port}/optuna", "cannot connect (connection failed"),
])
def test_bad_storage_fails_in_one_line_before_loading_anything(storage, problem, store, tmp_path, free_port):
    storage = storage.format(port=free_port)  # nothing listens there
    # the command line in a fresh interpreter, which then says which heavy libraries it had loaded
    code = ("import sys; from training import cli; code = cli.main(sys.argv[1:]); "
            "print('loaded:', [m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules]); sys.exit(code)")
    ran = subprocess.run([sys.executable, "-c", code, "tune", *sets(*STUDY), "--storage", storage],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2, ran.stderr[-3000:]
    [line] = ran.stderr.splitlines()
    assert line.startswith("fedtune: error: --storage (tune.storage) ") and problem in line
    assert "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE" in line and "sqlite:///PATH" in line
    assert "s3cret-pw" not in line and ("***" in line) == ("s3cret-pw" in storage)
    assert ran.stdout.strip() == "loaded: []", "the storage is checked before data, model and MLflow"
    assert list((tmp_path / "mlruns").iterdir()) == [], "no MLflow store, experiment or run"


# a killed worker ------------------------------------------------------------------------------------------------------
def test_killed_worker_trial_is_rerun_by_the_surviving_worker(store, tmp_path):
    """Two workers, one killed inside its trial: the other must not exit before that trial is failed by its
    heartbeat and rerun, so the study ends with its trials finished and none RUNNING or queued."""
    name = f"survivor-{uuid.uuid4().hex[:8]}"
    # started together, the workers' 5-round trials overlap (should one finish first, the next ones will)
    overrides = [*DRILL, "tune.heartbeat_seconds=1", f"tune.study_name={name}"]
    victim, survivor = (start_worker(overrides, tmp_path / f"{role}.log") for role in ("victim", "survivor"))
    try:
        both_inside = lambda trials: sum(t.state == TrialState.RUNNING and 1 in t.intermediate_values  # noqa: E731
                                         for t in trials) == 2
        wait_for(both_inside, load_study_when_created(name, victim), victim, survivor)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        code = survivor.wait(timeout=300)
    finally:
        victim.kill()
        survivor.kill()
    assert code == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    trials = assert_study_whole(name, "", store, at_least=True)
    lost = [t for t in trials if t.state == TrialState.FAIL]
    assert len(lost) == 1 and lost[0].user_attrs["worker"].endswith(f":{victim.pid}")


# PostgreSQL outages ---------------------------------------------------------------------------------------------------
def test_postgres_down_for_20s_is_waited_out(own_postgres, store, tmp_path):
    """The done-means drill: the server stopped while a trial runs, started again 20 s later; the worker waits
    (tune.heartbeat_seconds=25) and finishes the study as if nothing happened."""
    name = f"outage-{uuid.uuid4().hex[:8]}"
    url = with_password(own_postgres.url)
    worker = start_worker([*DRILL, "tune.heartbeat_seconds=25", f"tune.study_name={name}", f"tune.storage={url}"],
                          tmp_path / "worker.log")
    try:
        wait_for(reported(1), load_study_when_created(name, worker, url), worker)
        own_postgres.stop()
        time.sleep(20)  # the outage itself
        own_postgres.start()
        code = worker.wait(timeout=300)
    finally:
        own_postgres.start()
        worker.kill()
    said = (tmp_path / "worker.log").read_text()
    assert code == 0, said[-3000:]
    trials = assert_study_whole(name, url, store)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert "does not answer" in said and "answers again after" in said and "Traceback" not in said
    assert "s3cret-pw" not in said


def test_postgres_down_longer_than_the_wait_stops_cleanly_and_a_rerun_loses_nothing(own_postgres, store, tmp_path):
    name = f"long-outage-{uuid.uuid4().hex[:8]}"
    url = with_password(own_postgres.url)
    overrides = [*DRILL, "tune.heartbeat_seconds=2", f"tune.study_name={name}", f"tune.storage={url}"]
    worker = start_worker(overrides, tmp_path / "worker.log")
    try:
        wait_for(reported(1), load_study_when_created(name, worker, url), worker)
        own_postgres.stop()
        code = worker.wait(timeout=120)  # it gives up 2 s (tune.heartbeat_seconds) after its first failed call
    finally:
        own_postgres.start()
        worker.kill()
    said = (tmp_path / "worker.log").read_text()
    assert code == 1, said[-3000:]
    errors = [line for line in said.splitlines() if "fedtune: error:" in line]
    assert len(errors) == 1 and "Traceback" not in said and "s3cret-pw" not in said
    assert f"the Optuna storage {url.replace('s3cret-pw', '***')} did not answer for 2 s" in errors[0]
    assert "run the same command again" in errors[0]
    parent, children = study_runs(store, name)
    reason = children[0].data.tags["failure_reason"]
    assert children[0].info.status == "FAILED" and "did not answer for 2 s" in reason
    assert "exceeding max length" not in reason and parent.info.status == "FAILED"

    rerun = start_worker(overrides, tmp_path / "rerun.log")  # the same command, the database back
    code = rerun.wait(timeout=300)
    assert code == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    trials = assert_study_whole(name, url, store)
    assert trials[0].state == TrialState.FAIL and len(trials) == 3
