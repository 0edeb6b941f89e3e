"""LoRA through the tracked paths: torch.distributed workers, the Model Registry and Optuna. (A LoRA run killed and
resumed, exact aggregation's folded base included, is drilled in tests/test_resume.py.)"""

import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import TINY
from tests.test_distributed import TOLERANCE, fedtune, run_id_of, sets
from training import cli, config, lora, rounds
from training.federation import build
from training.train import train

# exact aggregation: the global model is the clients' mean only with the folded base, so every path must carry it
LORA = ["peft.method=lora", "peft.aggregation=exact", "client.lr=5e-3"]
ADAPTERS_AND_HEAD = (".lora_A.", ".lora_B.", ".modules_to_save.")


def state_bytes(state) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def checkpoint_file(client: MlflowClient, run_id: str, file: str, into: Path) -> dict:
    return load_file(client.download_artifacts(run_id, f"checkpoints/round-002/{file}", str(into)))


def test_two_gloo_workers_match_one_process_and_send_only_the_trainable_tensors(store, tmp_path):
    items = [*TINY, *LORA, "fl.num_clients=4", "tracking.log_model=false"]
    federation = build(config.load(None, items))
    _, one = rounds.run(federation)
    sent = lora.trainable(federation.model)
    assert all(any(part in key for part in ADAPTERS_AND_HEAD) for key in sent), sorted(sent)

    two = subprocess.run(fedtune("--workers", "2", *sets(*items)), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "worker 1/2" in two.stderr
    run_id, client = run_id_of(two.stdout), MlflowClient(store)

    # the global state the workers all-reduced and checkpointed: the adapters and the head, nothing frozen
    weights = checkpoint_file(client, run_id, "model.safetensors", tmp_path)
    assert weights.keys() == sent.keys() == one.keys()
    worst = max(float((weights[k] - one[k]).abs().max()) for k in one)
    # the folded base: the workers' all-reduced B·A products give the same fold as one process's sum
    base = {k.removeprefix("base."): v for k, v in checkpoint_file(client, run_id, "server.safetensors",
                                                                    tmp_path).items() if k.startswith("base.")}
    here = lora.base_weights(federation.model)
    assert base.keys() == here.keys() and base
    worst_base = max(float((base[k] - here[k]).abs().max()) for k in here)
    assert max(worst, worst_base) <= TOLERANCE, (worst, worst_base)

    uploads = [m.value for m in client.get_metric_history(run_id, "global/round/upload_bytes_per_client")]
    assert uploads == [state_bytes(sent)] * 2
    full = state_bytes(federation.model.state_dict())
    print(f"\nLoRA exact, 2 workers vs 1 process: max |diff| adapters/head {worst:.1e}, folded base {worst_base:.1e}; "
          f"upload {int(uploads[0]):,} B per client of {full:,} B in the model")


def test_a_lora_trained_model_registers_as_a_plain_model_and_evaluates_as_logged(tiny, store, monkeypatch, capsys):
    trained = train(tiny(*LORA, "client.lr=1e-2"), out=io.StringIO())
    uri = f"models:/{trained.registered_name}@candidate"

    # MLflow's transformers flavour: a plain classifier, no PEFT adapter to apply on load
    flavour = mlflow.models.get_model_info(uri).flavors["transformers"]
    assert flavour["pipeline_model_type"] == "BertForSequenceClassification"
    assert not [key for key in flavour if "peft" in key], flavour
    # loading and predicting work where peft cannot be imported
    monkeypatch.setitem(sys.modules, "peft", None)
    predicted = mlflow.pyfunc.load_model(uri).predict(["what a lovely morning", "worst service ever", "it is 5 pm"])
    assert set(predicted["label"]) <= {"negative", "neutral", "positive"} and len(predicted) == 3

    capsys.readouterr()
    assert cli.main(["evaluate", uri, "--out", "eval.json"]) == 0
    evaluated = json.loads(Path("eval.json").read_text())
    logged = MlflowClient(store).get_run(trained.run_id).data.metrics
    print(f"\nLoRA run {trained.run_id}: test accuracy logged by the run {logged['global/test_accuracy']:.4f}, "
          f"reported by `fedtune evaluate {uri}` {evaluated['accuracy']:.4f}")
    assert evaluated["accuracy"] == pytest.approx(logged["global/test_accuracy"])
    assert evaluated["macro_f1"] == pytest.approx(logged["global/test_macro_f1"])
    assert evaluated["loss"] == pytest.approx(logged["global/test_loss"], rel=1e-5)


def test_tune_searches_the_lora_rank(store):
    items = [*TINY, *LORA, "fl.rounds=1", "tune.pruner=none", "tune.seed=8",
             "tune.space={peft.r: {type: categorical, choices: [4, 8]}}"]
    assert cli.main(["tune", *sets(*items), "--trials", "2", "--study-name", "lora-rank"]) == 0

    client = MlflowClient(store)
    trials = client.search_runs([client.get_experiment_by_name("fedtune").experiment_id], "tags.`optuna.trial` != ''")
    assert len(trials) == 2
    ranks = {int(run.data.params["peft.r"]) for run in trials}
    assert ranks == {4, 8}, f"tune.seed=8 no longer draws both ranks in two trials ({ranks}); pick another seed"
    # each trial trained the rank it shows: what a client sends grows with r
    for run in trials:
        r = int(run.data.params["peft.r"])
        model = build(config.load(None, [*TINY, *LORA, f"peft.r={r}"])).model
        assert run.data.metrics["global/round/upload_bytes_per_client"] == state_bytes(lora.trainable(model))
