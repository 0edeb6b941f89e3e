"""The Docker engine and the fedtune image the container tests run on: skipped where there is none, a failure in CI
(`.ci/run` starts a private engine and builds the image, so a missing one there is a broken CI, not a reason to skip).
"""

from __future__ import annotations

import os

import docker
import pytest
import requests

# .ci/run builds fedtune:cpu (Debian base, CPU torch) and names it here; users' default tag otherwise.
IMAGE = os.environ.get("FEDTUNE_IMAGE", "fedtune:latest")


def unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run starts the engine and builds the image, see .ci/docker.sh)")
    pytest.skip(reason)


def connect() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as err:
        unavailable(f"no Docker engine answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(default)')}: {err}")
    return client


def image_uid(client: docker.DockerClient) -> int:
    """The uid the fedtune image runs as; a bind-mounted workspace must belong to it (the host user's uid)."""
    try:
        image = client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        unavailable(f"no {IMAGE} image: build it, docker build -t {IMAGE} . (.ci/images.sh in CI)")
    return int(image.attrs["Config"]["User"])


def own(path, uid: int) -> None:
    """Hand a workspace to the image's user, as a host user's own directory would be."""
    os.chown(path, uid, uid)
