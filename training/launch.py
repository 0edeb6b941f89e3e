"""`fedtune launch`: run any fedtune command inside the fedtune image through the Docker SDK, on all, some or none of
the GPUs, or as one container per GPU (e.g. one Optuna worker each).

`container_specs` turns the request into `containers.run` keyword arguments and touches nothing; `launch` starts the
containers, streams their logs, waits for them and removes them; `run_command` does both for one fedtune command.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import docker
import requests

# Where the Dockerfile puts the non-root user's Hugging Face cache (its HF_HOME).
HF_HOME = "/home/fedtune/.cache/huggingface"
# Passed into the container as they are; everything else in the caller's environment stays outside.
PASSED_PREFIXES = ("FEDTUNE_", "MLFLOW_", "HF_", "NCCL_", "GLOO_", "TORCH_")  # torch.distributed tuning too
# Host paths that mean nothing inside: the mounted cache replaces them.
HOST_PATH_VARIABLES = {"HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE",
                       "HF_MODULES_CACHE", "HF_TOKEN_PATH"}
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
# Docker's 64 MB /dev/shm is too small for NCCL and DataLoader workers; this caps it, memory is used as needed.
SHM_SIZE = "8g"


class LaunchError(RuntimeError):
    """`fedtune launch` cannot go ahead: no engine, an unusable GPU selection or image, or a store out of reach."""


def container_specs(command: list[str], *, image: str, gpus: str, per_gpu: bool, workspace: Path,
                    env: Mapping[str, str], hf_cache: Path | None, name_prefix: str) -> list[dict]:
    """Keyword arguments for `docker.from_env().containers.run(...)`, one dict per container to start.

    gpus is "all", comma-separated host GPU ids ("0,2") or "none"/""; per_gpu starts one container per listed id.
    """
    if not workspace.is_absolute():
        raise LaunchError(f"the workspace must be an absolute path, not {workspace}")
    groups = _device_groups(gpus, per_gpu)
    environment = _environment(env, workspace)
    if groups == ["none"]:
        # A GPU host whose default runtime is nvidia exposes every GPU unless told otherwise.
        environment["CUDA_VISIBLE_DEVICES"] = ""
    volumes = {str(workspace): {"bind": str(workspace), "mode": "rw"}}
    if hf_cache is not None:
        volumes[str(hf_cache)] = {"bind": HF_HOME, "mode": "rw"}
    base = {
        "image": image,
        "command": list(command),
        "environment": environment,
        "volumes": volumes,
        "working_dir": str(workspace),
        "shm_size": SHM_SIZE,
        "detach": True,
    }
    # host network: to reach a tracking server on this machine's loopback, and for multi-node rendezvous
    if any(_is_loopback_url(value) for value in environment.values()) or "--rdzv-endpoint" in command:
        base["network_mode"] = "host"
    return [
        base | {
            "name": f"{name_prefix}-{index}",
            "device_requests": _device_requests(group),
            "labels": {"fedtune.launch": name_prefix, "fedtune.command": " ".join(command), "fedtune.gpus": group},
        }
        for index, group in enumerate(groups)
    ]


def _device_groups(gpus: str, per_gpu: bool) -> list[str]:
    """The GPU selection of each container: "all", "none" or comma-separated ids."""
    ids = [part.strip() for part in gpus.lower().split(",") if part.strip()] or ["none"]
    if ids not in (["all"], ["none"]) and not all(part.isdigit() for part in ids):
        raise LaunchError(f"--gpus takes all, none or comma-separated GPU ids such as 0,2; got {gpus!r}")
    if not per_gpu:
        return [",".join(ids)]
    if ids in (["all"], ["none"]):
        # Listing the host's GPUs would need the engine; this function only describes containers.
        raise LaunchError(f"--per-gpu needs the GPU ids to spread over, e.g. --gpus 0,1; got --gpus {gpus!r}")
    return ids


def _device_requests(group: str) -> list[docker.types.DeviceRequest]:
    if group == "none":
        return []
    if group == "all":
        return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return [docker.types.DeviceRequest(device_ids=group.split(","), capabilities=[["gpu"]])]


def _environment(env: Mapping[str, str], workspace: Path) -> dict[str, str]:
    """The caller's FEDTUNE_*, MLFLOW_* and HF_* variables, less host-only paths; a store out of reach is refused.

    CUDA_VISIBLE_DEVICES never passes: the container sees only its requested GPUs, numbered from 0, so the host's
    numbering would select the wrong ones.
    """
    passed = {
        key: value
        for key, value in env.items()
        if key.startswith(PASSED_PREFIXES) and key not in HOST_PATH_VARIABLES
    }
    if "MLFLOW_TRACKING_URI" in passed:
        _check_store(passed["MLFLOW_TRACKING_URI"], workspace)
    return passed


def _check_store(uri: str, workspace: Path) -> None:
    """Refuse a local MLflow store outside the workspace: the container would write a fresh, private one."""
    path = _local_store_path(uri)
    if path is None:
        return
    store = Path(os.path.normpath(workspace / path))  # a relative path is relative to the workspace, the working dir
    if not store.is_relative_to(workspace):
        raise LaunchError(
            f"MLFLOW_TRACKING_URI={uri} lies outside the workspace {workspace}, which is all the container sees: "
            "move the store into the workspace, pass --workspace, or use a tracking server"
        )


def _local_store_path(uri: str) -> str | None:
    """The file path of a sqlite:// or file:// store URI or of a bare path; None for servers and in-memory stores."""
    scheme, separator, rest = uri.partition("://")
    if not separator:
        return uri  # a bare path is MLflow's file store
    if scheme == "file":
        return rest
    if scheme == "sqlite" and rest not in ("", "/:memory:"):
        return rest.removeprefix("/")  # sqlite:///x is the relative path x, sqlite:////x the absolute /x
    return None


def _is_loopback_url(value: str) -> bool:
    try:
        return "://" in value and urlsplit(value).hostname in LOOPBACK
    except ValueError:  # not a URL after all
        return False


def launch(specs: list[dict], client: docker.DockerClient | None = None) -> int:
    """Start the containers, stream their logs to stdout and wait; the worst exit code, 0 when all succeeded.

    The containers are removed afterwards, also on Ctrl-C (which stops them).
    """
    client = client or _connect()
    try:
        return _follow([_start(client, spec) for spec in specs])
    finally:
        for spec in specs:
            _remove(client, spec["name"])


def _connect() -> docker.DockerClient:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as err:
        raise LaunchError(
            f"no Docker engine reachable at DOCKER_HOST={host}: start Docker or run the command without "
            f"`fedtune launch` ({err})"
        ) from err
    return client


def _start(client: docker.DockerClient, spec: dict):
    try:
        return client.containers.run(**spec)
    except docker.errors.NotFound as err:  # the SDK has tried to pull the image already
        image = spec["image"]
        raise LaunchError(f"image {image} not found ({err.explanation}): build it, docker build -t {image} .") from err
    except docker.errors.APIError as err:
        hint = "; without NVIDIA's container toolkit use --gpus none" if "device driver" in str(err) else ""
        raise LaunchError(f"could not start {spec['name']}: {err.explanation or err}{hint}") from err


def _remove(client: docker.DockerClient, name: str) -> None:
    """Remove a container by name: one whose start failed exists too, though `containers.run` returned nothing."""
    try:
        client.containers.get(name).remove(force=True, v=True)
    except docker.errors.NotFound:  # never created
        pass


def _follow(containers: list) -> int:
    """Print every container's log as it comes, prefixed by its name when there are several, then wait for all."""
    lock = threading.Lock()
    prefixed = len(containers) > 1
    streams = [
        threading.Thread(target=_print_log, args=(container, f"[{container.name}] " if prefixed else "", lock),
                         daemon=True)
        for container in containers
    ]
    for stream in streams:
        stream.start()
    codes = [container.wait()["StatusCode"] for container in containers]
    for stream in streams:
        stream.join()
    return max(codes, default=0)


def _print_log(container, prefix: str, lock: threading.Lock) -> None:
    for line in _lines(container.logs(stream=True, follow=True)):
        with lock:  # whole lines, so that two containers' output never mixes within one
            print(prefix + line.decode(errors="replace"), flush=True)


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Re-split a byte stream whose chunks end anywhere into lines."""
    pending = b""
    for chunk in chunks:
        *complete, pending = (pending + chunk).split(b"\n")
        yield from complete
    if pending:
        yield pending


def run_command(command: list[str], *, image: str, gpus: str, per_gpu: bool, workspace: Path,
                hf_cache: Path | None) -> int:
    """Run the fedtune ``command`` (e.g. ``["train", "--set", "fl.rounds=5"]``) in the ``image``, with the
    ``workspace`` mounted and the ``hf_cache`` as the Hugging Face cache (None: a throwaway one); the worst exit code
    of its containers, 130 when stopped with Ctrl-C."""
    if not command:
        raise LaunchError("name the fedtune command to run after --, e.g. fedtune launch -- train")
    if hf_cache is not None:
        hf_cache.mkdir(parents=True, exist_ok=True)  # else the engine creates it, owned by root
    specs = container_specs(
        command,
        image=image,
        gpus=gpus,
        per_gpu=per_gpu,
        workspace=workspace.resolve(),
        env=os.environ,
        hf_cache=hf_cache,
        name_prefix=f"fedtune-{secrets.token_hex(3)}",
    )
    try:
        code = launch(specs)
    except KeyboardInterrupt:  # launch has already stopped and removed the containers
        return 130
    if code:
        print(f"fedtune launch: a container exited with code {code}", file=sys.stderr)
    return code
