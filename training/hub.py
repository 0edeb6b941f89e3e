"""The Hugging Face Hub, asked once and quickly: offline, a hub id fails in seconds instead of retrying for minutes."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from training.config import ConfigError


def reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint accepts a TCP connection (HF_HUB_OFFLINE=1 means no)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load(field: str, name: str, loader, **kwargs):
    """Call ``loader(name, **kwargs)`` (a ``from_pretrained``/``load_dataset``), from the local cache when offline.

    Any failure becomes a ConfigError that names ``field`` and says what to pass instead.
    """
    online = reachable()
    try:
        if online:
            return loader(name, **kwargs)
        return loader(name, local_files_only=True, **kwargs)
    except Exception as err:  # the hub's many error types all mean: this name cannot be used
        where = "" if online else " (the Hugging Face Hub is not reachable and it is not in the local cache)"
        raise ConfigError(
            f"{field}={name!r} could not be loaded{where}: {type(err).__name__}: {str(err).splitlines()[0][:200]}. "
            f"Pass a local directory, a pkg://package/path, or a hub id that exists."
        ) from err
