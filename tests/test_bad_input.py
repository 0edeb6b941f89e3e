"""Bad input fails before any training starts (and before torch loads), in one line that names the field and the
fix, and creates no MLflow run; a NaN loss fails the run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import training
from tests.conftest import TINY, all_runs
from training import checkpoint
from training.cli import main
from training.config import ConfigError


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def fedtune_train(*args: str) -> list[str]:
    return ["train", *sets(*TINY), *args]


RANGE = list(range(240))  # the tiny study's training rows
# (arguments after the tiny study's, text the error must hold); {tmp} is the test's folder of bad inputs
CASES = [
    (sets("model.name=no-such-org/no-such-model"), "model.name='no-such-org/no-such-model' could not be loaded"),
    (sets("model.name={tmp}/no-config"), "model.name='{tmp}/no-config': the folder {tmp}/no-config has no config.json"),
    (sets("model.name={tmp}/head-2"), "model.name='{tmp}/head-2' has a classification head for 2 labels but the data "
                                      "has 3 classes; set model.ignore_mismatched_sizes=true"),
    (sets("model.max_length=4096"), "model.max_length: 4096 is above the 128 positions of model.name='tiny-bert'; "
                                    "set model.max_length <= 128"),
    (sets("data.source=no-such-org/no-such-dataset"), "data.source"),
    (sets("data.source=/nonexistent/data.csv"), "data.source"),
    (sets("data.text_column=body"), "data.text_column"),
    (sets("data.label_column=stars"), "data.label_column"),
    (sets("data.source={tmp}/one-class.csv", "data.label_column=label"),
     "data.label_column: column 'label' of '{tmp}/one-class.csv' holds a single class ('pos')"),
    (sets("fl.num_clients=500"), "fl.num_clients"),
    (sets("client.lr=0"), "client.lr: must be > 0"),
    (sets("client.lr=-0.1"), "client.lr: must be > 0"),
    (sets("fl.rounds=0"), "fl.rounds: must be >= 1"),
    (sets("fl.roundz=3"), "unknown config key 'fl.roundz'"),
    (sets("data.seed=-1"), "data.seed: must be >= 0, got -1"),
    (sets("partition.seed=-2"), "partition.seed: must be >= 0, got -2"),
    (sets("fl.seed=-3"), "fl.seed: must be >= 0, got -3"),
    (sets("fl.strategy=fedsgd"), "fl.strategy: must be one of ('fedavg', 'fedprox', 'fedavgm', 'fedadam'"),
    (sets("fl.strategy=fedadam"), "fl.server_lr: 1.0 is FedAvg's default; fedadam needs its own, e.g. "
                                  "--set fl.server_lr=1e-3"),
    (sets("fl.strategy=fedyogi", "fl.server_lr=1e-3", "fl.server_tau=0"), "fl.server_tau: must be > 0"),
    (sets("fl.server_momentum=0.9"), "fl.server_momentum: fedavg does not use it"),
    (sets("client.prox_mu=0.01"), "client.prox_mu: only fedprox uses it (fl.strategy=fedavg)"),
    (sets("fl.strategy=fedprox", "client.prox_mu=-1"), "client.prox_mu: must be >= 0, got -1.0"),
    (sets("fl.rounds=[2"), "--set fl.rounds: the value '[2': YAML syntax error at line 1, column 3"),
    (["--params", "{tmp}/broken.yaml"], "{tmp}/broken.yaml: YAML syntax error at line 3, column 1"),
    (["--set-file", "{tmp}/broken.yaml"], "--set-file {tmp}/broken.yaml: YAML syntax error at line 3, column 1"),
    (["--split", "{tmp}/empty-client.json"], "{tmp}/empty-client.json: client 2 holds no rows"),
    (["--split", "{tmp}/outside.json"], "{tmp}/outside.json: row 240 is not an index into the 240 rows"),
    (["--split", "{tmp}/twice.json"], "{tmp}/twice.json: row 1 belongs to more than one client"),
    (["--split", "{tmp}/partial.json"], "{tmp}/partial.json: the clients hold 5 of the 240 training rows"),
]
# the cases a Python caller (a tuning trial, a notebook) reaches with a valid config
INPUT_CASES = [case for case in CASES if case[0][0] == "--set" and case[0][1].startswith(("model.", "data."))
               and "seed" not in case[0][1]]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """The bad inputs the cases name, written once for this module."""
    from tests.conftest import save_tiny_model

    folder = tmp_path_factory.mktemp("bad")
    (folder / "no-config").mkdir()
    (folder / "no-config" / "vocab.txt").write_text("[PAD]\n")
    save_tiny_model(folder / "head-2", num_labels=2)
    (folder / "one-class.csv").write_text("text,label\n" + "".join(f"text {i},pos\n" for i in range(60)))
    (folder / "broken.yaml").write_text("fl:\n  rounds: [2\n")
    for name, clients in {"empty-client": [RANGE[:120], RANGE[120:], []], "outside": [RANGE[:120], RANGE[120:], [240]],
                          "twice": [[0, 1], [1, 2], RANGE[3:]], "partial": [[0, 1], [2, 3], [4]]}.items():
        (folder / f"{name}.json").write_text(json.dumps({"meta": {}, "clients": clients}))
    return folder


@pytest.fixture
def bad(bad_folder, monkeypatch):
    """``bad(text or list)`` puts the folder of bad inputs into ``{tmp}``; the hub counts as unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same answer with or without a network

    def fill(item):
        return [fill(i) for i in item] if isinstance(item, list) else item.replace("{tmp}", str(bad_folder))

    return fill


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(c[0][-2:]) for c in CASES])
def test_bad_input_is_refused_in_one_line_naming_the_field_and_creates_no_run(args, expected, bad, store, capsys):
    assert main(fedtune_train(*bad(args))) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtune: error: ") and err.count("\n") == 1, err
    assert bad(expected) in err, err
    assert not all_runs(store)  # in any experiment, fedtune's included


def test_train_refuses_bad_input_before_it_creates_a_run(bad, store, tiny):
    from training.train import train

    for args, expected in INPUT_CASES:  # one store for all: opening a new one takes seconds
        with pytest.raises(ConfigError) as refused:
            train(tiny(*bad(args[1::2])))
        assert bad(expected) in str(refused.value)
        assert not all_runs(store), args


CHECK_ALL = """
import contextlib, io, json, sys, time
from training.cli import main
report = []
for args in json.loads(sys.argv[1]):
    err, started = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = main(args)
    report.append({"code": code, "err": err.getvalue(), "seconds": round(time.perf_counter() - started, 2),
                   "loaded": [m for m in ("torch", "transformers") if m in sys.modules]})
print(json.dumps(report))
"""


# `fedtune tune` checks the same way before its study starts
TUNE_CASES = [case for case in CASES if any(text in case[1] for text in ("model.max_length", "single class",
                                                                          "partial", "fl.seed"))]


def test_bad_input_is_refused_before_torch_and_transformers_load(bad, store):
    """Every case in a fresh interpreter: refused with exit code 2, and neither library was ever imported."""
    cases = [(fedtune_train(*bad(args)), expected) for args, expected in CASES]
    cases += [(["tune", *sets(*TINY), *bad(args)], expected) for args, expected in TUNE_CASES]
    cases += [(fedtune_train("--workers", "2", *sets("fl.seed=-3")), "fl.seed")]  # refused before torchrun starts
    cases += [(["evaluate", "models:/any@candidate", *sets(value)], expected)  # before MLflow and torch load too
              for value, expected in (("fl.rounds=0", "fl.rounds"), ("client.nope=1", "client.nope"))]
    commands = [command for command, _ in cases]
    package = {"PYTHONPATH": str(Path(training.__file__).resolve().parents[1])}  # this checkout's, from any folder
    done = subprocess.run([sys.executable, "-c", CHECK_ALL, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **package})
    assert done.returncode == 0, done.stderr[-3000:]
    for (command, expected), outcome in zip(cases, json.loads(done.stdout)):
        assert outcome["code"] == 2 and bad(expected) in outcome["err"], (command, outcome)
        assert outcome["loaded"] == [], (command, outcome)  # in sys.modules after this case or an earlier one
    print("seconds per case:", {" ".join([c[0], *c[-2:]]): o["seconds"]
                                for (c, _), o in zip(cases, json.loads(done.stdout))})


def test_prepare_names_a_yaml_error_in_its_params_file(bad, tmp_path, capsys):
    assert main(["prepare", "--params", bad("{tmp}/broken.yaml"), "--task", "x", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == bad("fedtune: error: --params {tmp}/broken.yaml: YAML syntax error at line 3, "
                                          "column 1: expected ',' or ']', but got '<stream end>'; fix the YAML there "
                                          "(quote a value that holds YAML characters such as : [ { #)\n")


def test_a_client_left_without_data_is_refused(store, capsys):
    assert main(fedtune_train(*sets("partition.scheme=dirichlet", "partition.alpha=0.001", "fl.num_clients=60"))) == 2
    err = capsys.readouterr().err
    assert "partition.alpha" in err and "fl.num_clients" in err, err


def test_the_unreachable_hub_fails_fast_with_or_without_a_network(store, capsys, monkeypatch, free_port):
    import time

    # a closed local port stands for a machine without network, whatever this one has
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port}")
    start = time.perf_counter()
    assert main(fedtune_train(*sets("model.name=bert-base-cased"))) == 2
    assert time.perf_counter() - start < 20
    assert "model.name='bert-base-cased' could not be loaded (the Hugging Face Hub is not reachable" in \
        capsys.readouterr().err


class PoisonAfterRound1:
    """Fault injection: from round 2 on, every 3-way classifier output is NaN."""

    def __init__(self):
        self.handle = None

    def after_round(self, round_, metrics, clients):
        def nan_logits(module, args, output):
            if isinstance(module, torch.nn.Linear) and module.out_features == 3:
                return output * math.nan
            return output

        self.handle = torch.nn.modules.module.register_module_forward_hook(nan_logits)
        return False

    def after_checkpoint(self, round_, path):
        pass


def test_nan_loss_stops_the_run_marks_it_failed_and_keeps_checkpoints(tiny, store, tmp_path):
    from training.client import NonFiniteLoss
    from training.train import train

    poison = PoisonAfterRound1()
    try:
        with pytest.raises(NonFiniteLoss, match=r"round 2, client \d: loss is nan at local step 1$"):
            train(tiny("fl.rounds=3"), callbacks=(poison,))
    finally:
        if poison.handle is not None:
            poison.handle.remove()
    client = MlflowClient(store)
    (run,) = client.search_runs(experiment_ids=[client.get_experiment_by_name("fedtune").experiment_id])
    assert run.info.status == "FAILED"
    assert "NonFiniteLoss" in run.data.tags["failure_reason"] and "nan" in run.data.tags["failure_reason"]
    saved = client.download_artifacts(run.info.run_id, "checkpoints/round-001", str(tmp_path))
    assert checkpoint.load(saved).round == 1
    assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/round-001"]
