"""LoRA in the round loop (issue 17): exact aggregation against the clients' mean effective weights, one client
against a bare peft training loop, only the trainable tensors exchanged, every model family, server strategies, bad
input, and the merged model that is logged."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import training
from tests.conftest import TINY, all_runs
from training import checkpoint, client, config, executor, lora, rounds
from training.config import ConfigError
from training.federation import build
from training.models import load_model

# LoRA wants a larger client lr than full fine-tuning: at 5e-3 the adapters of the tiny models move by ~1e-2
LORA = ["peft.method=lora", "fl.rounds=1", "client.lr=5e-3"]
# the modules the tiny presets adapt when peft.target_modules is left empty
DEFAULT_TARGETS = {"tiny-bert": {"query", "value"}, "tiny-albert": {"query", "value"},
                   "tiny-distilbert": {"q_lin", "v_lin"}, "tiny-gpt2": {"c_attn"}, "tiny-llama": {"q_proj", "v_proj"}}
DECODERS = ("tiny-gpt2", "tiny-llama")


def _lora(tiny, *overrides: str) -> config.Config:
    return tiny(*LORA, *overrides)


def _effective(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted module's effective weight W + alpha/r·B·A (peft's own delta), in float64."""
    from peft.tuners.lora import LoraLayer

    return {name: (m.get_base_layer().weight + m.get_delta_weight("default")).detach().double()
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def _max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _gap_to_the_clients_mean(tiny, aggregation: str, name: str = "tiny-bert") -> float:
    """One round of 3 clients of unequal size; returns max |global effective − sample-weighted mean of the clients'
    effective weights| over the adapted modules. The clients are re-trained alone from the round's start with their
    own seeds; that this reproduces the round's clients is checked on the averaged adapters and head."""
    federation = build(_lora(tiny, f"model.name={name}", "partition.scheme=quantity", "partition.alpha=0.3",
                             f"peft.aggregation={aggregation}"))
    cfg, sizes = federation.config, [len(part) for part in federation.parts]
    assert max(sizes) > 2 * min(sizes), sizes  # sample weighting differs from a plain mean
    start, start_effective = federation.global_state(), _effective(federation.model)
    effective, trained = [], []
    for c in range(cfg.fl.num_clients):
        client.train_client(federation.model, start, federation.encoded["train"], federation.parts[c],
                            federation.collate, cfg.client, federation.seed_for(1, c), federation.where, c)
        effective.append(_effective(federation.model))
        trained.append(federation.global_state())
    federation.load(start)
    _, final = rounds.run(federation)

    def weighted_mean(states):
        return {k: sum(s[k].double() * n for s, n in zip(states, sizes)) / sum(sizes) for k in states[0]}

    # determinism: the round's clients trained exactly as the re-trained ones (same A, B and head, averaged)
    assert _max_gap(final, weighted_mean(trained)) <= 1e-6
    moved = min(_max_gap(e, start_effective) for e in effective)
    assert moved > 1e-3, moved  # every client's adapters moved, so 1e-6 below is a real check
    return _max_gap(_effective(federation.model), weighted_mean(effective))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])  # GPT-2's Conv1D weight is stored transposed
def test_exact_aggregation_makes_the_global_effective_weights_the_clients_weighted_mean(tiny, name):
    gap = _gap_to_the_clients_mean(tiny, "exact", name)
    print(f"exact, {name}: max |global effective - weighted mean of clients' effective| = {gap:.2e}")
    assert gap <= 1e-6, gap


def test_fedit_averages_a_and_b_apart_and_misses_the_clients_mean(tiny):
    gap = _gap_to_the_clients_mean(tiny, "fedit")
    print(f"fedit, tiny-bert: max |global effective - weighted mean of clients' effective| = {gap:.2e}")
    assert gap > 1e-5, f"fedit misses the clients' mean effective weights by only {gap:.2e}"


def test_one_client_for_one_round_is_centralized_lora_fine_tuning_for_one_epoch(tiny):
    """K=1, one round, against a bare loop written with peft and torch: the same base model, LoraConfig and adapter
    seed, the client's data order, AdamW with BERT's no-decay groups, a constant lr and gradient clipping."""
    from peft import LoraConfig, TaskType, get_peft_model

    federation = build(_lora(tiny, "fl.num_clients=1"))
    cfg, data = federation.config, federation.encoded["train"]
    start = federation.global_state()
    client.train_client(federation.model, start, data, federation.parts[0], federation.collate, cfg.client,
                        federation.seed_for(1, 0), federation.where, 0)
    trained = federation.global_state()
    federation.load(start)
    _, global_state = rounds.run(federation)

    base = load_model(cfg.model, federation.task.label_names, cfg.fl.seed)
    base.config.pad_token_id = federation.tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.fl.seed)  # LoRA's A is drawn at random
        model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["query", "value"], modules_to_save=["classifier"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=5e-3,
                                  fused=True)
    rows = federation.parts[0]
    assert sorted(rows.tolist()) == list(range(len(data)))  # one client holds the whole training split
    seed = federation.seed_for(1, 0)
    loader = DataLoader(Subset(data, rows.tolist()), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), collate_fn=federation.collate)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        for batch in loader:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
    centralized = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    assert set(centralized) == set(global_state)
    # the client's update is the bare loop's, bit for bit; the round's mean (x·n)/n may round in the last bit
    assert all(torch.equal(centralized[k], trained[k]) for k in centralized)
    gap = _max_gap(centralized, global_state)
    print(f"K=1 round vs centralized LoRA epoch: max |diff| = {gap:.2e}")
    assert gap <= 1e-6, gap
    assert _max_gap(centralized, federation.global_state()) <= 1e-6  # and the model holds the result


def test_only_the_adapters_and_the_head_are_trained_sent_and_aggregated(tiny):
    federation = build(_lora(tiny))
    model, cfg = federation.model, federation.config
    trainable = _trainable_names(model)
    assert {n for n in trainable if ".lora_A." in n or ".lora_B." in n} and {n for n in trainable if "classifier" in n}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable), trainable  # no base weight
    start = federation.global_state()
    assert set(start) == trainable

    # the streaming aggregate of a cohort
    result = executor.run_clients(federation, start, [0, 1, 2], 1)
    assert set(result.total) == trainable and result.products is None  # products: exact only

    # the optimizer is built over, and holds state for, the trainable parameters alone
    optimizer = client.make_optimizer(model, cfg.client)
    client.train_client(model, start, federation.encoded["train"], federation.parts[0], federation.collate,
                        cfg.client, federation.seed_for(1, 0), federation.where, 0, optimizer=optimizer)
    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == wanted
    assert {id(p) for p in optimizer.state} == wanted

    # a fedit round: what is sent is the trainable bytes, and the base stays as it was
    federation.load(start)
    frozen = _frozen(model)
    history, final = rounds.run(federation)
    sent = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert set(final) == trainable
    assert history.rounds[0]["upload_bytes_per_client"] == history.rounds[0]["download_bytes_per_client"] == sent
    assert sent < whole / 100, (sent, whole)
    assert all(torch.equal(frozen[k], v) for k, v in _frozen(model).items())


def test_exact_aggregation_changes_only_the_adapted_base_weights_and_sends_them_down(tiny):
    federation = build(_lora(tiny, "peft.aggregation=exact"))
    model = federation.model
    frozen = _frozen(model)
    history, final = rounds.run(federation)
    folded = set(lora.base_weights(model))
    assert folded and folded < set(frozen)
    after = _frozen(model)
    assert all(torch.equal(frozen[k], after[k]) for k in set(frozen) - folded)  # embeddings, key, dense, norms
    assert all(not torch.equal(frozen[k], after[k]) for k in folded)  # query and value took the residual
    sent = sum(v.numel() * v.element_size() for v in final.values())
    base = sum(frozen[k].numel() * frozen[k].element_size() for k in folded)
    assert history.rounds[0]["upload_bytes_per_client"] == sent
    assert history.rounds[0]["download_bytes_per_client"] == sent + base


@pytest.mark.parametrize("name", list(DEFAULT_TARGETS))
def test_every_model_family_trains_a_lora_round_on_its_default_modules(tiny, name):
    federation = build(_lora(tiny, f"model.name={name}"))
    model = federation.model
    adapted = {key.split(".lora_A.")[0].rsplit(".", 1)[-1] for key in federation.global_state() if ".lora_A." in key}
    assert adapted == DEFAULT_TARGETS[name]
    start = federation.global_state()
    history, final = rounds.run(federation)
    assert math.isfinite(history.rounds[0]["train_loss"]) and math.isfinite(history.rounds[0]["val_loss"])
    assert all(not torch.equal(start[k], final[k]) for k in final if ".lora_B." in k)  # B starts at 0 and trains
    if name in DECODERS:  # a decoder's classifier finds the last real token by the pad id
        assert model.config.pad_token_id == federation.tokenizer.pad_token_id is not None
    # a short text padded in a batch with a long one is classified as it is alone (from its last real token)
    texts = federation.encoded["validation"]
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]["input_ids"]))
    short, long = by_length[0], by_length[-1]
    model.eval()
    with torch.no_grad():
        together = federation.collate([texts[short], texts[long]])
        assert not together["attention_mask"][0].all()  # the short one is padded
        padded = model(**together).logits[0]
        alone = model(**federation.collate([texts[short]])).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5), (padded, alone)


@pytest.mark.parametrize("settings", [["fl.strategy=fedadam", "fl.server_lr=1e-2"],
                                      ["fl.strategy=fedprox", "client.prox_mu=1.0"]], ids=["fedadam", "fedprox"])
def test_server_strategies_act_on_the_trainable_weights_alone(tiny, tmp_path, settings):
    federation = build(_lora(tiny, *settings))
    trainable, start = _trainable_names(federation.model), federation.global_state()
    history, final = rounds.run(federation, checkpoint_dir=tmp_path)
    assert math.isfinite(history.rounds[0]["train_loss"]) and set(final) == trainable
    server_state = checkpoint.load(tmp_path / checkpoint.folder_name(1)).server_optimizer
    if "fl.strategy=fedadam" in settings:
        assert set(server_state) == {f"{slot}.{k}" for slot in ("m", "v") for k in trainable}
        # Reddi et al.'s first step moves each weight by less than server_lr
        step = _max_gap(final, start)
        assert 0 < step < 1e-2, step
    else:  # FedAvg on the server; the proximal term holds the adapters and head nearer the round's start
        assert server_state == {}
        plain = build(_lora(tiny))
        _, free = rounds.run(plain)
        distance = {name: math.sqrt(sum(float((s[k] - start[k]).double().pow(2).sum()) for k in start))
                    for name, s in (("prox", final), ("fedavg", free))}
        assert distance["prox"] < distance["fedavg"], distance


@pytest.mark.parametrize("overrides, field, text", [
    (["peft.method=lora", "peft.r=0"], "peft.r", "must be >= 1"),
    (["peft.method=lora", "peft.aggregation=median"], "peft.aggregation", "must be one of ('fedit', 'exact')"),
    (["peft.r=4"], "peft.r", "only peft.method=lora uses it"),
    (["tune.space={peft.r: {type: int, low: 2, high: 16}}"], "tune.space.peft.r", "set peft.method=lora"),
], ids=["r=0", "aggregation", "r-without-lora", "space-without-lora"])
def test_a_bad_peft_setting_is_refused_naming_the_field(overrides, field, text):
    with pytest.raises(ConfigError) as refused:
        config.load(None, [*TINY, *overrides])
    assert str(refused.value).startswith(f"{field}: ") and text in str(refused.value), str(refused.value)


@pytest.mark.parametrize("modules, text", [
    ("query,nonsense", "bert has no module named 'nonsense'; its linear layers are classifier, dense, key, query, "
                       "value"),
    ("LayerNorm", "peft cannot put LoRA on {'LayerNorm'} of bert"),
], ids=["unknown", "layernorm"])
def test_target_modules_lora_cannot_adapt_are_refused_before_training(tiny, modules, text):
    with pytest.raises(ConfigError) as refused:
        build(_lora(tiny, f"peft.target_modules={modules}"))
    message = str(refused.value)
    assert message.startswith("peft.target_modules: ") and text in message and "\n" not in message, message


def test_fedtune_train_refuses_an_unknown_target_module_in_one_line_and_creates_no_run(store):
    args = [a for o in [*TINY, *LORA, "peft.target_modules=query,qkv"] for a in ("--set", o)]
    package = {"PYTHONPATH": str(Path(training.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "training", "train", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **package})
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("fedtune: error: ")]
    assert len(errors) == 1 and "peft.target_modules: bert has no module named 'qkv'" in errors[0], done.stderr
    assert not all_runs(store)


@pytest.mark.parametrize("name", ["tiny-distilbert", "tiny-gpt2"])  # two head modules; GPT-2's transposed Conv1D
def test_the_merged_model_is_a_plain_transformers_model_with_the_same_logits(tiny, name):
    from peft import PeftModel
    from transformers import PreTrainedModel

    federation = build(_lora(tiny, f"model.name={name}"))
    rounds.run(federation)
    model = federation.model.eval()
    batch = federation.collate([federation.encoded["validation"][i] for i in range(16)])
    with torch.no_grad():
        trained = model(**batch).logits
        with model.disable_adapter():
            untrained = model(**batch).logits
        merged = lora.merged(model).eval()
        logits = merged(**batch).logits
    assert not torch.allclose(trained, untrained, atol=1e-4)  # the adapters and head change the logits
    assert torch.allclose(logits, trained, atol=1e-5), float((logits - trained).abs().max())
    plain = load_model(federation.config.model, federation.task.label_names, 0)
    assert type(merged) is type(plain) and isinstance(merged, PreTrainedModel) and not isinstance(merged, PeftModel)
    assert set(merged.state_dict()) == set(plain.state_dict())  # no lora_ or modules_to_save names left
