"""What the round loop tells the code that hangs on it (MLflow logging, Optuna pruning, the terminal printer).

Kept free of torch so that tracking and tuning can define callbacks without loading the engine.
"""

from __future__ import annotations

from pathlib import Path


class Callback:
    """Receives values from the loop; ``after_round`` returning True stops the run after that round."""

    def after_round(self, round_: int, metrics: dict[str, float], clients: list[dict]) -> bool:
        return False

    def after_checkpoint(self, round_: int, path: Path) -> None:
        pass
