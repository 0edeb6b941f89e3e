"""``python -m analysis.run_metrics RECORD OUT``: a train stage's DVC metric, the headline of its run record.

The record (`fedtune train --metrics-out`) holds the MLflow run id, the registered model and every final number; the
report reads it. `dvc metrics show` puts every metrics file of the pipeline in one table with a column per key, so
the metric keeps three numbers under short names and the table fits a terminal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADLINE = {"val_acc": "val_accuracy", "test_acc": "test_accuracy", "test_f1": "test_macro_f1"}  # metric: record key


def headline(record: dict) -> dict:
    return {short: record[key] for short, key in HEADLINE.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.run_metrics", description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path, help="the JSON `fedtune train --metrics-out` wrote")
    parser.add_argument("out", type=Path, help="the DVC metrics file to write")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(headline(json.loads(args.record.read_text())), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
