"""The client update: K=1, one round, one local epoch is plain centralized fine-tuning; each (round, client) has
its own seed."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from training import rounds
from training.client import NonFiniteLoss, client_seed, make_optimizer, train_client
from training.executor import InProcess
from training.federation import build
from training.models import load_model


def centralized_epoch(cfg, federation) -> dict[str, torch.Tensor]:
    """One epoch of ordinary fine-tuning over the whole training set, written out plainly."""
    model = load_model(cfg.model, federation.task.label_names, cfg.fl.seed)
    seed = client_seed(cfg.fl.seed, 1, 0)
    loader = DataLoader(federation.encoded["train"], batch_size=cfg.client.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), collate_fn=federation.collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.client.lr, weight_decay=0.0, fused=True)
    torch.manual_seed(seed)
    model.train()
    for batch in loader:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def test_one_client_one_round_equals_centralized_fine_tuning(tiny):
    cfg = tiny("fl.num_clients=1", "fl.rounds=1", "client.local_epochs=1", "client.weight_decay=0",
               "client.max_grad_norm=0")
    federation = build(cfg)
    before = federation.global_state()
    _, federated = rounds.run(federation)
    reference = centralized_epoch(cfg, federation)
    changed = 0
    for key, value in reference.items():
        torch.testing.assert_close(federated[key], value, rtol=0, atol=1e-6)
        changed += not torch.equal(before[key], value)
    assert changed > 10  # training really moved the weights


def test_client_update_does_not_depend_on_clients_before_it(tiny):
    cfg = tiny("fl.num_clients=3", "fl.rounds=1")
    federation = build(cfg)
    start = federation.global_state()
    alone = InProcess.run_cohort(federation, start, [2], 1)
    after_others = InProcess.run_cohort(federation, start, [0, 1, 2], 1)
    assert alone.clients[0] == after_others.clients[2]
    torch.testing.assert_close(alone.sketches[2], after_others.sketches[2], rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_restarted_optimizer_gives_the_weights_of_a_fresh_one(tiny, optimizer):
    """A cohort's clients share one optimizer, restarted for each (issue 18): after another client has left
    moments, step counts and a decayed learning rate in it, the next client's weights are those of a fresh one."""
    cfg = tiny("fl.num_clients=3", f"client.optimizer={optimizer}", "client.momentum=0.9", "client.warmup_ratio=0.5")
    federation = build(cfg)
    start = federation.global_state()

    def train(client, shared=None):
        train_client(federation.model, start, federation.encoded["train"], federation.parts[client],
                     federation.collate, cfg.client, federation.seed_for(1, client), federation.where, client,
                     optimizer=shared)
        return {k: v.clone() for k, v in federation.model.state_dict().items()}

    fresh = train(1)
    shared = make_optimizer(federation.model, cfg.client)
    train(0, shared)
    torch.testing.assert_close(train(1, shared), fresh, rtol=0, atol=0)


def test_the_client_seed_depends_on_the_seed_the_round_and_the_client(tiny):
    seeds = {client_seed(seed, round_, client) for seed in (0, 1) for round_ in range(1, 6) for client in range(10)}
    assert len(seeds) == 100
    federation = build(tiny("fl.num_clients=2", "fl.rounds=1"))
    start = federation.global_state()
    # the same client from the same weights in another round: another data order and dropout
    first, later = (InProcess.run_cohort(federation, start, [0], r) for r in (1, 2))
    assert not torch.equal(first.sketches[0], later.sketches[0])
    # two clients holding the same rows in the same round still train differently
    federation.parts = [federation.parts[0], federation.parts[0].copy()]
    twins = InProcess.run_cohort(federation, start, [0, 1], 1)
    torch.testing.assert_close(twins.sketches[0], first.sketches[0], rtol=0, atol=0)
    assert not torch.equal(twins.sketches[0], twins.sketches[1])


def test_a_nan_loss_names_the_client_and_its_first_bad_step_after_the_client_has_run(tiny):
    """Losses stay on the device during local training (reading each one would wait for the GPU at every step) and
    are checked once, when the client ends: the error still names the first bad step, and no result is returned."""
    federation = build(tiny("fl.num_clients=3", "fl.rounds=1"))
    steps = math.ceil(len(federation.parts[1]) / federation.config.client.batch_size)
    forwards = []

    def nan_from_the_third_step(module, inputs, logits):
        forwards.append(1)
        return logits * math.nan if len(forwards) >= 3 else logits

    handle = federation.model.classifier.register_forward_hook(nan_from_the_third_step)
    try:
        with pytest.raises(NonFiniteLoss, match=r"^round 1, client 1: loss is nan at local step 3$"):
            InProcess.run_cohort(federation, federation.global_state(), [1], 1)
    finally:
        handle.remove()
    assert steps > 3 and len(forwards) == steps
