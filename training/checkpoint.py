"""Checkpoints: the global model (safetensors, never pickle) plus the server state needed to continue the run.

A checkpoint is a folder ``round-NNN/`` with ``model.safetensors`` (global weights; under LoRA the adapters and
head), ``server.safetensors`` (RNG state, server optimizer tensors and, for exact LoRA aggregation, the folded base
weights) and ``state.json`` (round, resolved config, metrics so far, version, and
the sha256 of the two tensor files). ``state.json`` is written last, so its hashes vouch for the files beside it:
a truncated or altered file is refused on load instead of resuming into NaN weights.
Torch and safetensors load only when a checkpoint is saved or loaded: naming, hashing and retention are read by
tracking, which must stay light.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from training import __version__

if TYPE_CHECKING:
    import torch

FILES = frozenset({"model.safetensors", "server.safetensors", "state.json"})
HASHED = ("model.safetensors", "server.safetensors")


class CorruptCheckpoint(ValueError):
    """A checkpoint file is missing, truncated or altered since it was written; names the folder and the file."""

    def __init__(self, path: Path, file: str, problem: str):
        super().__init__(f"checkpoint {Path(path).name}: {file} {problem}")
        self.path, self.file, self.problem = Path(path), file, problem


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    config: dict
    history: list[dict]
    rng_state: torch.Tensor | None = None
    server_optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # base weights exact LoRA aggregation changed


def folder_name(round_: int) -> str:
    return f"round-{round_:03d}"


def save(ckpt: Checkpoint, root: Path) -> Path:
    """Write ``root/round-NNN/``; files are written to a temporary name first so a kill leaves no half file."""
    from safetensors.torch import save_file

    path = Path(root) / folder_name(ckpt.round)
    path.mkdir(parents=True, exist_ok=True)
    server = {f"optimizer.{k}": v for k, v in ckpt.server_optimizer.items()}
    server.update({f"base.{k}": v.detach().cpu().contiguous() for k, v in ckpt.base.items()})
    if ckpt.rng_state is not None:
        server["rng.torch"] = ckpt.rng_state
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt.global_state.items()}
    files = {
        "model.safetensors": lambda p: save_file(weights, p, metadata={"round": str(ckpt.round)}),
        "server.safetensors": lambda p: save_file(server, p),
    }
    for name, write in files.items():
        tmp = path / f".{name}.tmp"
        write(str(tmp))
        tmp.replace(path / name)
    state = {"round": ckpt.round, "config": ckpt.config, "history": ckpt.history, "fedtune_version": __version__,
             "sha256": {name: sha256(path / name) for name in HASHED}}
    tmp = path / ".state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    tmp.replace(path / "state.json")
    return path


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state(path: Path) -> dict:
    """``state.json`` of a checkpoint folder (round, config, history, hashes)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(path, "state.json", f"is unreadable ({err})") from err


def verify(path: Path) -> dict:
    """The checkpoint's state after checking every file against the hash written with it.

    Checkpoints written before hashes existed carry none and are taken as they are.
    """
    path = Path(path)
    for name in sorted(FILES):
        if not (path / name).is_file():
            raise CorruptCheckpoint(path, name, "is missing")
    state = read_state(path)
    for name, expected in state.get("sha256", {}).items():
        if sha256(path / name) != expected:
            raise CorruptCheckpoint(path, name, f"does not match the sha256 recorded when it was written "
                                                f"({(path / name).stat().st_size} bytes: truncated or altered)")
    return state


def load(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    path = Path(path)
    state = verify(path)
    server = load_file(str(path / "server.safetensors"))
    return Checkpoint(
        round=state["round"],
        global_state=load_file(str(path / "model.safetensors")),
        config=state["config"],
        history=state["history"],
        rng_state=server.get("rng.torch"),
        server_optimizer={k.removeprefix("optimizer."): v for k, v in server.items() if k.startswith("optimizer.")},
        base={k.removeprefix("base."): v for k, v in server.items() if k.startswith("base.")},
    )


def round_of(folder: str) -> int:
    """``"checkpoints/round-007"`` -> 7."""
    return int(folder.rstrip("/").rsplit("round-", 1)[1])


def to_keep(saved: list[int], history: list[dict], keep_last: int, metric: str = "val_accuracy") -> set[int]:
    """The saved rounds a retention policy keeps: the last ``keep_last`` (what --resume needs) and the best by
    ``metric`` (what a researcher comes back for); ``keep_last=0`` keeps every round."""
    if keep_last == 0:
        return set(saved)
    scores = {r["round"]: r[metric] for r in history if metric in r and r["round"] in saved}
    best = {max(scores, key=lambda r: (scores[r], -r))} if scores else set()
    return set(sorted(saved)[-keep_last:]) | best
