"""A run's local work directory: what this machine holds for a run until the tracking server has it.

``<root>/<run_id>/`` keeps the round's checkpoint until it is uploaded (``checkpoints/``), metrics not yet logged
(``pending/*.json``) and, when the process gives up, why (``failure.txt``). It lives in a known place — beside an
embedded SQLite store, else under the user's cache — so a later ``fedtune train`` can find what a killed or
cut-off process left behind: flush it on ``--resume``, or remove it once nothing in it is still needed.
Also here: who owns a run (host, pid, process start time), so a dead owner can be told from a live one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path


def root(tracking_uri: str) -> Path:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "work"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fedtune" / "work"


class WorkDir:
    def __init__(self, tracking_uri: str, run_id: str):
        self.path = root(tracking_uri) / run_id
        self.checkpoints = self.path / "checkpoints"
        self.pending = self.path / "pending"

    # metrics not yet logged -------------------------------------------------------------------------------------
    def hold(self, name: str, values: dict[str, float], step: int) -> Path:
        """Keep ``values`` at ``step`` on disk until ``release``; written whole or not at all."""
        self.pending.mkdir(parents=True, exist_ok=True)
        path = self.pending / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "values": values}))
        tmp.replace(path)
        return path

    def held(self) -> list[tuple[Path, dict[str, float], int]]:
        found = []
        for path in sorted(self.pending.glob("*.json")):
            data = json.loads(path.read_text())
            found.append((path, data["values"], data["step"]))
        return found

    @staticmethod
    def release(path: Path) -> None:
        path.unlink(missing_ok=True)

    # the run's end ------------------------------------------------------------------------------------------------
    def note_failure(self, reason: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "failure.txt").write_text(reason)

    def failure(self) -> str | None:
        path = self.path / "failure.txt"
        return path.read_text() if path.is_file() else None

    def holds_data(self) -> bool:
        """True while metrics or a checkpoint here have not reached the tracking server."""
        return any(self.pending.glob("*.json")) or any(self.checkpoints.glob("round-*/state.json"))

    def clean(self) -> bool:
        """Remove the directory unless it holds data not yet uploaded; True when removed."""
        if self.holds_data():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True


# who owns a run -------------------------------------------------------------------------------------------------------
def _start_ticks(pid: int) -> str:
    """The process's start time (clock ticks since boot) from /proc; '' where /proc has no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def owner() -> dict[str, str]:
    """Tags naming this process; the start time tells a reused pid from the original owner."""
    pid = os.getpid()
    return {"fedtune.host": socket.gethostname(), "fedtune.pid": str(pid), "fedtune.pid_start": _start_ticks(pid),
            "fedtune.pid_namespace": _pid_namespace()}


def owned_here(tags: dict[str, str]) -> bool:
    """True when the run's owner ran on this machine, in this pid namespace (so its pid means something here)."""
    return tags.get("fedtune.host") == socket.gethostname() and tags.get("fedtune.pid_namespace") == _pid_namespace()


def owner_gone(tags: dict[str, str]) -> bool:
    """True only when the owning process surely ended: owned here, and no process with that pid and start time.
    A run owned elsewhere is never judged from here."""
    pid = int(tags.get("fedtune.pid", "0") or 0)
    if not owned_here(tags) or pid <= 0:
        return False
    if Path("/proc/self/stat").is_file():
        return _start_ticks(pid) != tags.get("fedtune.pid_start")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
