"""Checkpoints: each file checked against its recorded sha256 on load; damage names the run, round and file and
offers the previous good round; the retention policy keeps the last N and the best; sketches survive a round trip."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from training import checkpoint, divergence
from training.callbacks import Callback
from training.config import ConfigError
from training.federation import build
from training.train import train


def saved(tmp_path, round_=3) -> Path:
    state = {"encoder.weight": torch.randn(64, 8), "bias": torch.randn(8), "steps": torch.tensor([3])}
    return checkpoint.save(checkpoint.Checkpoint(round_, state, {"fl": {}}, [{"round": round_}],
                                                 torch.get_rng_state()), tmp_path)


def flip_byte(path, offset_from_end=5) -> None:
    """Alter one byte of the tensor data, keeping the size: what a bad disk or a bit flip does."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_intact_checkpoint_loads_as_saved(tmp_path):
    path = saved(tmp_path)
    loaded = checkpoint.load(path)
    assert loaded.round == 3 and torch.equal(loaded.rng_state, torch.get_rng_state())
    assert set(checkpoint.read_state(path)["sha256"]) == {"model.safetensors", "server.safetensors"}


@pytest.mark.parametrize("damage", ["same-size", "truncated"])
@pytest.mark.parametrize("name", ["model.safetensors", "server.safetensors"])
def test_a_damaged_file_is_refused_naming_it(tmp_path, damage, name):
    path = saved(tmp_path)
    target = path / name
    if damage == "same-size":
        flip_byte(target)
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(checkpoint.CorruptCheckpoint) as caught:
        checkpoint.load(path)
    assert caught.value.file == name and "round-003" in str(caught.value)


@pytest.mark.parametrize("saved_rounds, history, keep, expected", [
    ([1, 2, 3, 4, 5], [{"round": r, "val_accuracy": a} for r, a in enumerate([.5, .9, .6, .7, .8], 1)], 2, {2, 4, 5}),
    ([1, 2, 3], [{"round": r, "val_accuracy": .5} for r in (1, 2, 3)], 1, {1, 3}),  # ties: the earliest best
    ([1, 2, 3], [{"round": r, "val_accuracy": r / 10} for r in (1, 2, 3)], 2, {2, 3}),  # the best is the last
    ([2, 4], [{"round": r} for r in (1, 2, 3, 4)], 1, {4}),  # no validation metric: the last only
    ([1, 2, 3], [], 0, {1, 2, 3}),  # 0 keeps all
])
def test_retention_keeps_the_last_n_and_the_best(saved_rounds, history, keep, expected):
    assert checkpoint.to_keep(saved_rounds, history, keep) == expected


def test_update_sketch_does_not_depend_on_the_state_dict_order(tiny, tmp_path):
    """A global state read back from a checkpoint lists its tensors in the file's order, not the model's."""
    federation = build(tiny())
    model_order = federation.global_state()
    loaded = checkpoint.load(checkpoint.save(checkpoint.Checkpoint(1, model_order, {}, []), tmp_path)).global_state
    assert list(loaded) != list(model_order)  # the situation of a resumed run
    local = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model_order.items()}
    expected, norm = divergence.update_sketch(local, model_order, federation.signs)
    got, got_norm = divergence.update_sketch(local, loaded, federation.signs)
    assert torch.equal(got, expected) and got_norm == norm


class _StopAt(Callback):
    """Fails the run after ``round_``'s checkpoint, as a crash would (the run ends FAILED)."""

    def __init__(self, round_):
        self.round = round_

    def after_checkpoint(self, round_, path):
        if round_ == self.round:
            raise RuntimeError("crash")


def test_resume_from_a_damaged_checkpoint_offers_the_previous_good_round(tiny, store, tmp_path):
    cfg = tiny("fl.rounds=3", "fl.keep_checkpoints=0", "tracking.log_model=false")
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, callbacks=(_StopAt(2),))
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("fedtune").experiment_id])[0]
    run_id = run.info.run_id
    assert run.info.status == "FAILED"
    local = client.download_artifacts(run_id, "checkpoints/round-002", str(tmp_path / "dl"))
    # damage the stored copy in place (same size), as a bad disk under the artifact store would
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints/round-002/model.safetensors"
    assert stored.read_bytes() == (Path(local) / "model.safetensors").read_bytes()
    flip_byte(stored, offset_from_end=stored.stat().st_size // 2)

    with pytest.raises(ConfigError) as refused:
        train(cfg, resume=run_id)
    message = str(refused.value)
    assert run_id in message and "round 2" in message and "model.safetensors" in message
    assert f"--resume {run_id} --from-round 1" in message

    result = train(cfg, resume=run_id, from_round=1)
    assert [m.step for m in client.get_metric_history(run_id, "global/val_accuracy")] == [1, 2, 3]
    assert result.history.rounds[-1]["round"] == 3 and client.get_run(run_id).info.status == "FINISHED"


def test_retention_deletes_old_checkpoints_from_the_store(tiny, store):
    result = train(tiny("fl.rounds=4", "fl.keep_checkpoints=1", "tracking.log_model=false"))
    history = {r["round"]: r["val_accuracy"] for r in result.history.rounds}
    best = max(history, key=lambda r: (history[r], -r))
    client = MlflowClient(store)
    kept = [f.path for f in client.list_artifacts(result.run_id, "checkpoints")]
    assert kept == sorted({f"checkpoints/round-{r:03d}" for r in {best, 4}})
