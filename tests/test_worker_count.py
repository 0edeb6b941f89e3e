"""`--workers auto`: the rule that picks a worker count from measurements, the real probe processes on the CPU, and
the command end to end (same result as one process)."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import TINY
from tests.test_distributed import TOLERANCE, fedtune, run_id_of, sets
from training import config, rounds, worker_count
from training.federation import build
from training.worker_count import GIB, Decision, Probe, candidates, choose

FAST = {1: Probe(100.0, GIB), 2: Probe(190.0, GIB), 4: Probe(300.0, GIB)}  # samples/s summed, peak per process


def test_memory_caps_the_count():
    # 4 x 1 GiB x 1.25 margin = 5 GiB does not fit in 3 GiB; 2 x 1.25 = 2.5 GiB does
    assert choose(FAST, free_bytes=3 * GIB, cohort_size=8) == 2
    assert choose(FAST, free_bytes=5 * GIB, cohort_size=8) == 4
    assert choose(FAST, free_bytes=GIB, cohort_size=8) == 1  # one process always runs: it is the run without --workers


def test_the_fewest_processes_within_five_percent_of_the_fastest_win():
    near = {1: Probe(100.0, GIB), 2: Probe(193.0, GIB), 4: Probe(200.0, GIB)}  # 193 >= 0.95 x 200
    assert choose(near, 64 * GIB, cohort_size=8) == 2
    far = {1: Probe(100.0, GIB), 2: Probe(185.0, GIB), 4: Probe(200.0, GIB)}  # 185 < 190
    assert choose(far, 64 * GIB, cohort_size=8) == 4
    flat = {1: Probe(100.0, GIB), 2: Probe(98.0, GIB)}  # a saturated device: more processes only cost memory
    assert choose(flat, 64 * GIB, cohort_size=8) == 1


def test_the_cohort_caps_the_count_so_no_worker_is_idle():
    assert choose(FAST, 64 * GIB, cohort_size=3) == 2
    # per GPU: 2 processes on each of 2 GPUs would be 4 workers for 3 clients; 1 per GPU is 2 workers
    assert choose({1: Probe(100.0, GIB), 2: Probe(200.0, GIB)}, 64 * GIB, cohort_size=3, devices=2) == 2
    assert choose({1: Probe(100.0, GIB)}, 64 * GIB, cohort_size=3, devices=4) == 3  # one per GPU, at most the cohort


def test_a_failed_candidate_is_skipped():
    # a count whose probe failed (e.g. one process ran out of memory after the others measured) is not a result
    failed = {1: Probe(100.0, GIB), 2: Probe(500.0, GIB, error="failed: CUDA out of memory"), 4: Probe(390.0, GIB)}
    assert choose(failed, 64 * GIB, cohort_size=8) == 4
    assert choose({1: Probe(error="failed: exit code 1")}, 64 * GIB, cohort_size=8) == 1


def test_candidates_and_the_workers_share_of_the_cores(monkeypatch):
    assert candidates("cpu", 2) == [1, 2] and candidates("cpu", 12) == [1, 2, 4, 8]
    assert candidates("cuda", 64) == [1, 2, 4]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert Decision(4, FAST, cores=16).environment() == {"OMP_NUM_THREADS": "4"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert Decision(4, FAST, cores=16).environment() == {"OMP_NUM_THREADS": "3"}


def test_a_probe_that_fails_falls_back_to_one_worker_with_the_reason(tiny, tmp_path, capsys):
    decision = worker_count.decide(tiny(f"data.source={tmp_path / 'gone.csv'}"))  # refused by the probe's own check
    assert decision.workers == 1 and "gone.csv" in decision.measured[1].error
    err = capsys.readouterr().err
    assert re.search(r"probe of one process failed \(failed: .*gone\.csv.*\); running 1 worker", err), err


def probe_processes(folder: Path) -> dict[int, int]:
    """Probe index -> pid of the live probe processes started under ``folder``."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode().rstrip("\0").split("\0")
        except OSError:  # it exited meanwhile
            continue
        if "training.worker_count" in argv and argv[-2].startswith(str(folder)):
            found[int(argv[-1])] = int(proc.name)
    return found


def test_a_probe_killed_midway_fails_its_count_and_its_sibling_is_stopped(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where decide() keeps the probes' files
    killed = {}

    def kill_the_second_probe_once_warm():  # it has trained its warm-up chunk and reached the barrier
        while not list(tmp_path.glob("fedtune-workers-*/count-2/ready-1")):
            time.sleep(0.01)
        killed.update(probe_processes(tmp_path))
        os.kill(killed[1], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_second_probe_once_warm, daemon=True)
    killer.start()
    decision = worker_count.decide(tiny("fl.num_clients=4"), seconds=1.0, timeout=120)
    killer.join(timeout=1)
    assert decision.measured[2].error == "failed: killed by signal 9", decision.measured
    one = decision.measured[1]  # measured by a real probe process, alone
    assert decision.workers == 1 and not one.error and one.samples_per_second > 0 and one.peak_bytes > 50 * 2**20
    assert 0 in killed and probe_processes(tmp_path) == {}  # the sibling did not stay waiting at the barrier


def test_workers_auto_trains_the_same_model_as_one_process(store, tmp_path):
    items = [*TINY, "fl.num_clients=4", "fl.rounds=2", "tracking.log_model=false"]
    auto = subprocess.run(fedtune("--workers", "auto", *sets(*items)), capture_output=True, text=True, timeout=600)
    assert auto.returncode == 0, auto.stderr[-3000:]
    history, one = rounds.run(build(config.load(None, items)))  # one process, here
    chosen = int(re.search(r"fedtune: --workers auto: (\d+) worker\(s\)", auto.stderr).group(1))
    assert re.search(r"^ +1 +1 +[\d.]+ +[\d.]+ GiB", auto.stderr, re.M), auto.stderr  # the table: count 1's row
    assert "<- chosen" in auto.stderr

    client = MlflowClient(store)
    run = client.get_run(run_id_of(auto.stdout))
    assert run.data.tags["workers.auto"] == str(chosen), run.data.tags
    # both counts measured by real processes: samples/s summed over them, peak memory of one
    figures = re.fullmatch(r"cpu: 1: ([\d.]+) samples/s, ([\d.]+) GiB; 2: ([\d.]+) samples/s, ([\d.]+) GiB",
                           run.data.tags["workers.auto.probe"])
    assert figures and all(float(f) > 0 for f in figures.groups()), run.data.tags
    if chosen > 1:  # what this machine's load allows; either way the model must be the same
        assert f"worker 1/{chosen}" in auto.stderr
        assert run.data.metrics["global/round/workers"] == chosen
    got = load_file(client.download_artifacts(run.info.run_id, "checkpoints/round-002/model.safetensors",
                                              str(tmp_path)))
    worst = max(float((got[k] - one[k]).abs().max()) for k in one)
    assert worst <= TOLERANCE, worst
    for metric in ["val_accuracy", "val_macro_f1"]:
        tracked = [m.value for m in client.get_metric_history(run.info.run_id, f"global/{metric}")]
        here = [r[metric] for r in history.rounds]
        assert len(tracked) == 2 and all(abs(x - y) <= 1e-5 for x, y in zip(tracked, here)), (metric, tracked, here)


REFUSE = """
import json, sys, time
from training.cli import main
report = []
for args in json.loads(sys.argv[1]):
    started = time.perf_counter()
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's refusal of a value its type function rejects
        code = exit.code
    report.append({"code": code, "seconds": time.perf_counter() - started, "torch": "torch" in sys.modules})
print(json.dumps(report))
"""


def test_a_bad_workers_value_is_refused_at_once_naming_the_option(store):
    cases = [["train", "--workers", "abc"], ["train", "--workers", "0"],
             ["train", "--workers", "auto", "--nodes", "2", "--rdzv-endpoint", "127.0.0.1:1"]]
    done = subprocess.run([sys.executable, "-c", REFUSE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=60)
    report = json.loads(done.stdout)
    assert [r["code"] for r in report] == [2, 2, 2] and not any(r["torch"] for r in report), report
    assert all(r["seconds"] < 2 for r in report), report
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [
        "fedtune train: error: argument --workers: 'abc' is not a number of processes: give a count such as 2, or "
        "auto to measure and choose",
        "fedtune train: error: argument --workers: '0' is not a number of processes: give a count such as 2, or "
        "auto to measure and choose",
        "fedtune: error: --workers auto measures this machine for the config given here: with --resume or "
        "--nodes > 1 give a count, e.g. --workers 2"], done.stderr
