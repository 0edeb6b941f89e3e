"""LoRA adapters through Hugging Face ``peft``: wrapping a classifier, what a client trains and sends, and exact
aggregation. The only module that imports ``peft``.

Under LoRA a client trains the adapters (A: r x in, B: out x r) of the target modules and the classification head;
the base weights stay frozen and are never sent, so the round's state (``trainable``) holds those tensors alone.

Averaging A and B apart (``fedit``, the common practice) is not the mean of the clients' updates:
mean(B_k·A_k) != mean(B)·mean(A). ``exact`` (FedEx-LoRA, Singhal et al. 2025) also sums each client's B_k·A_k and
folds the residual mean(B·A) − mean(B)·mean(A), times alpha/r, into the frozen base weight of each adapted module,
so that the global effective weights W + alpha/r·B·A equal the clients' weighted mean. Its cost: one out x in
product per adapted module per client, a running sum as large as the adapted base weights, and those base weights
in every checkpoint (and, in a deployment, in every download).
"""

from __future__ import annotations

import torch

from training.aggregate import State
from training.config import ConfigError, PeftConfig, target_modules

# model_type -> the modules LoRA adapts by default (attention query and value, as in Hu et al. 2021)
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "albert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}
# a sequence classifier's head modules: new for the task, so trained (and sent) in full beside the adapters
HEADS = ("pre_classifier", "classifier", "score")
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"


def _linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers: what ``peft.target_modules`` may name."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and name})


def targets(model: torch.nn.Module, cfg: PeftConfig) -> list[str]:
    """The modules to adapt: ``peft.target_modules``, else the architecture's default; each checked to exist."""
    model_type = model.config.model_type
    wanted = target_modules(cfg) or DEFAULT_TARGETS.get(model_type)
    if wanted is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        wanted = PEFT_DEFAULTS.get(model_type)
    linear = _linear_names(model)
    if not wanted:
        raise ConfigError(f"peft.target_modules: no default for model type {model_type!r}; name some of its linear "
                          f"layers, e.g. --set peft.target_modules={','.join(linear[:2])} (it has: "
                          f"{', '.join(linear)})")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for module in wanted:
        if module not in names:
            raise ConfigError(f"peft.target_modules: {model_type} has no module named {module!r}; its linear layers "
                              f"are {', '.join(linear)}")
    return list(wanted)


def wrap(model: torch.nn.Module, cfg: PeftConfig, seed: int) -> torch.nn.Module:
    """``model`` with LoRA adapters on its target modules (A initialised from ``seed``), base weights frozen and the
    head trainable."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    heads = [name for name, _ in model.named_children() if name in HEADS]
    wanted = targets(model, cfg)
    # GPT-2's Conv1D stores its weight as (in, out); peft must be told, or it warns and flips it itself
    transposed = any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in wanted for name, m in model.named_modules())
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=wanted, modules_to_save=heads, fan_in_fan_out=transposed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # a module kind LoRA cannot adapt (LayerNorm, embeddings of some models ...)
            raise ConfigError(f"peft.target_modules: peft cannot put LoRA on {config.target_modules} of "
                              f"{model.config.model_type} ({str(err).splitlines()[0][:200]}); name linear layers: "
                              f"{', '.join(_linear_names(model))}") from err


def trainable(model: torch.nn.Module) -> State:
    """What a client trains and sends: the adapters and the head, as the model's own tensors (no copy)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _adapted(state: State) -> dict[str, tuple[str, str]]:
    """adapted module's name -> (its A key, its B key) in a trainable state."""
    return {key.removesuffix(_A): (key, key.removesuffix(_A) + _B) for key in state if key.endswith(_A)}


def accumulate_products(total: State | None, state: State, weight: float) -> State:
    """``total + weight * B·A`` for each adapted module of a client's ``state`` (None starts a new sum)."""
    total = {} if total is None else total
    for module, (a, b) in _adapted(state).items():
        product = state[b].detach().float() @ state[a].detach().float()
        if module in total:
            total[module].add_(product, alpha=weight)
        else:
            total[module] = product.mul_(weight)
    return total


def zero_products(global_state: State) -> State:
    """A sum of products over no client, shaped like the real one (a torch.distributed worker with no client)."""
    return {module: torch.zeros(global_state[b].shape[0], global_state[a].shape[1], device=global_state[a].device)
            for module, (a, b) in _adapted(global_state).items()}


def fold(model: torch.nn.Module, products: State, total_weight: float, mean_state: State) -> None:
    """Add alpha/r·(mean(B·A) − mean(B)·mean(A)) to each adapted module's frozen base weight (``exact``)."""
    from peft.utils.other import transpose

    modules = dict(model.named_modules())
    for module, (a, b) in _adapted(mean_state).items():
        layer = modules[module]
        residual = products[module] / total_weight - mean_state[b].float() @ mean_state[a].float()
        base = layer.get_base_layer().weight
        with torch.no_grad():
            base.add_(transpose(residual, layer.fan_in_fan_out).to(base.dtype), alpha=layer.scaling["default"])


def base_weights(model: torch.nn.Module) -> State:
    """The adapted modules' base weights, which ``exact`` changes: a checkpoint keeps them to resume exactly."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.base_layer.weight": module.get_base_layer().weight.detach()
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def load_base(model: torch.nn.Module, base: State) -> None:
    """Put a checkpoint's ``base_weights`` back (nothing to do for an empty one)."""
    if base:
        unexpected = model.load_state_dict(base, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"checkpoint base weights {unexpected[:3]} are not in the model: written for another one")


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with the adapters merged into its weights and the trained head in place: what is
    tested, logged and registered, so that loading it needs no peft."""
    return model.merge_and_unload()
