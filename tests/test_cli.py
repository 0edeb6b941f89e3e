"""The command line is the one room for argv: the other modules expose plain functions and never import it back."""

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

import training
from training import cli

IMPORTS_CLI = re.compile(r"^\s*(from training\.cli import|from training import .*\bcli\b|import training\.cli)", re.M)


def test_no_module_imports_the_command_line_back():
    package = Path(training.__file__).parent
    importers = sorted(p.name for p in package.glob("*.py")
                       if p.name not in ("cli.py", "__main__.py") and IMPORTS_CLI.search(p.read_text()))
    assert importers == []


def parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


TRAIN = ["train", "--params", "p.yaml", "--set-file", "tuned.yaml", "--set-file", "more.yaml",
         "--set", "model.name=tiny-bert", "--set", "tracking.run_name=a=b", "--set=data.source=x=y",
         "--split", "split.json", "--from-round", "0", "--metrics-out", "run.json", "--headline-out", "head.json",
         "--rounds-out", "rounds.csv", "--debug"]


def test_the_workers_command_parses_back_to_the_same_arguments():
    args = parse(TRAIN)
    assert parse(["train", *cli.worker_argv(args)]) == args


def test_the_workers_command_leaves_the_launcher_options_out():
    launched = parse([*TRAIN, "--work", "2", "--nodes=2", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job"])
    rebuilt = cli.worker_argv(launched)
    assert parse(["train", *rebuilt]) == parse(TRAIN)  # so no worker starts workers of its own
    assert not [a for a in rebuilt if a.startswith(("--work", "--nodes", "--rdzv"))], rebuilt


TINY_ANY_K = [o for o in TINY if not o.startswith("fl.num_clients=")]  # the tiny study, K left to the split


@pytest.fixture
def prepared_split(tmp_path, monkeypatch):
    """A task prepared and split over 2 clients by shards, as the DVC stages do: (task folder, split file)."""
    monkeypatch.chdir(tmp_path)  # no params.yaml: the built-in defaults, fl.num_clients=4 and partition.scheme=iid
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"tasks": {"tweets": {"max_samples": 300}}}}))
    task, split = tmp_path / "tweets", tmp_path / "shards-K2.json"
    assert cli.main(["prepare", "--params", str(params), "--task", "tweets", "--out", str(task)]) == 0
    assert cli.main(["partition", "--prepared", str(task), "--clients", "2", "--scheme", "shards", "--out", str(split),
                     "--stats", str(tmp_path / "stats.json")]) == 0
    return task, split


def test_k_and_the_scheme_come_from_the_split_file(prepared_split):
    task, split = prepared_split
    tiny = sets(*TINY_ANY_K, f"data.source={task}")
    for agreeing in ([], sets("fl.num_clients=2", "partition.scheme=shards")):  # the defaults say 4 and iid
        cfg, parts = cli.load_inputs(parse(["train", *tiny, *agreeing, "--split", str(split)]))
        assert (cfg.fl.num_clients, cfg.partition.scheme, len(parts)) == (2, "shards", 2)


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("override, message", [
    ("fl.num_clients=4", "fl.num_clients: --set fl.num_clients=4 but --split {split} was made with fl.num_clients=2"),
    ("partition.scheme=iid", "partition.scheme: --set partition.scheme=iid but --split {split} was made with "
                             "partition.scheme=shards"),
])
def test_a_set_that_contradicts_the_split_file_is_refused(prepared_split, capsys, command, override, message):
    task, split = prepared_split
    assert cli.main([command, *sets(*TINY_ANY_K, f"data.source={task}", override), "--split", str(split)]) == 2
    err = capsys.readouterr().err
    assert message.format(split=split) in err and "drop the --set" in err and err.count("\n") == 1, err


def test_train_writes_its_run_record_and_the_headline_dvc_metric(store, tmp_path):
    """The train stage is one command: the run record for the report, its headline for `dvc metrics show`."""
    record, head = tmp_path / "runs" / "K3.json", tmp_path / "train" / "K3.json"
    assert cli.main(["train", *sets(*TINY, "fl.rounds=1", "tracking.log_model=false"),
                     "--metrics-out", str(record), "--headline-out", str(head)]) == 0
    summary = json.loads(record.read_text())
    assert list(json.loads(head.read_text()).items()) == [
        ("val_acc", summary["val_accuracy"]), ("test_acc", summary["test_accuracy"]),
        ("test_f1", summary["test_macro_f1"])]


def test_the_version_is_the_installed_packages_and_an_uninstalled_tree_says_unknown(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out == f"fedtune {importlib.metadata.version('fedtune')}\n"
    (tmp_path / "training").mkdir()  # the package's own __init__, where no fedtune is installed
    (tmp_path / "training" / "__init__.py").write_text(Path(training.__file__).read_text())
    bare = subprocess.run([sys.executable, "-S", "-c", "import training; print(training.__version__)"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert bare.stdout == "0+unknown\n"
