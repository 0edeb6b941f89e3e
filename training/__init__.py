"""fedtune: federated fine-tuning studies of transformer text classifiers, tracked end to end."""

__version__ = "0.1.0"
