"""Checkpoints: the global model (safetensors, never pickle) plus the server state needed to continue the run.

A checkpoint is a folder ``round-NNN/`` with ``model.safetensors`` (global weights), ``server.safetensors``
(RNG state and server optimizer tensors) and ``state.json`` (round, resolved config, metrics so far, version).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training import __version__


FILES = frozenset({"model.safetensors", "server.safetensors", "state.json"})


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    config: dict
    history: list[dict]
    rng_state: torch.Tensor | None = None
    server_optimizer: dict[str, torch.Tensor] = field(default_factory=dict)


def folder_name(round_: int) -> str:
    return f"round-{round_:03d}"


def save(ckpt: Checkpoint, root: Path) -> Path:
    """Write ``root/round-NNN/``; files are written to a temporary name first so a kill leaves no half file."""
    path = Path(root) / folder_name(ckpt.round)
    path.mkdir(parents=True, exist_ok=True)
    server = {f"optimizer.{k}": v for k, v in ckpt.server_optimizer.items()}
    if ckpt.rng_state is not None:
        server["rng.torch"] = ckpt.rng_state
    state = {"round": ckpt.round, "config": ckpt.config, "history": ckpt.history, "fedtune_version": __version__}
    files = {
        "model.safetensors": lambda p: save_file(
            {k: v.detach().cpu().contiguous() for k, v in ckpt.global_state.items()}, p, metadata={"round": str(ckpt.round)}
        ),
        "server.safetensors": lambda p: save_file(server, p),
        "state.json": lambda p: Path(p).write_text(json.dumps(state, indent=1, default=str)),
    }
    for name, write in files.items():
        tmp = path / f".{name}.tmp"
        write(str(tmp))
        tmp.replace(path / name)
    return path


def load(path: Path) -> Checkpoint:
    path = Path(path)
    missing = sorted(n for n in FILES if not (path / n).is_file())
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {missing}")
    state = json.loads((path / "state.json").read_text())
    server = load_file(str(path / "server.safetensors"))
    return Checkpoint(
        round=state["round"],
        global_state=load_file(str(path / "model.safetensors")),
        config=state["config"],
        history=state["history"],
        rng_state=server.get("rng.torch"),
        server_optimizer={k.removeprefix("optimizer."): v for k, v in server.items() if k.startswith("optimizer.")},
    )


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    found = sorted(p for p in Path(root).glob("round-*") if (p / "state.json").is_file())
    return found[-1] if found else None
