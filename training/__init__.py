"""fedtune: federated fine-tuning studies of transformer text classifiers, tracked end to end."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedtune")  # pyproject.toml's, as installed: one place to bump it
except PackageNotFoundError:  # a source tree used without `pip install -e .`
    __version__ = "0+unknown"
