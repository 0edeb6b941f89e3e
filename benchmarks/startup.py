"""Start-up: wall time of `fedtune --help`, `fedtune train --help` and a bad config; time to the first training step.

    python benchmarks/startup.py                          # this checkout
    python benchmarks/startup.py --source /tmp/old-clone  # another checkout's code, run with this interpreter

Each command runs --repeats times in a fresh process (median printed). The first training step is timed from the
process's start to the end of the first optimizer step (a global torch step hook) of `fedtune train` with
--model (default tiny-bert, one round) into a fresh SQLite MLflow store.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "fedtune --help": ["--help"],
    "fedtune train --help": ["train", "--help"],
    "fedtune train --set fl.rounds=0 (bad config)": ["train", "--set", "fl.rounds=0"],
}
# runs `fedtune` from the checkout on PYTHONPATH; with --first-step, prints the time of the first optimizer step
LAUNCH = """
import sys, time
if sys.argv[1] == "--first-step":
    def first(optimizer, args, kwargs):
        print(f"FIRST-STEP {time.time()}", file=sys.stderr, flush=True)
        raise SystemExit(0)
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(first)
    del sys.argv[1]
from training.cli import main
sys.argv[0] = "fedtune"
sys.exit(main())
"""


def run(source: Path, args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    tic = time.time()
    out = subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, cwd=source,
                         env={**os.environ, "PYTHONPATH": str(source), **env})
    return time.time() - tic, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose code runs (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="tiny-bert", help="model.name for the time to the first step")
    args = parser.parse_args()
    print(f"code from {args.source}; load average {os.getloadavg()[0]:.2f}", flush=True)
    for label, argv in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            seconds, out = run(args.source, argv, {})
            times.append(seconds)
        last = (out.stderr or out.stdout).strip().splitlines()[-1][:100]
        print(f"  {label:45s} median {statistics.median(times):5.2f} s (min {min(times):.2f}), exit {out.returncode}: "
              f"{last}", flush=True)
    with tempfile.TemporaryDirectory() as store:
        tic = time.time()
        argv = ["--first-step", "train", "--set", f"model.name={args.model}", "--set", "fl.rounds=1"]
        _, out = run(args.source, argv, {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"})
        stamps = [float(stamp) for stamp in re.findall(r"FIRST-STEP ([\d.]+)", out.stderr)]
        if not stamps:
            sys.exit(f"no training step seen:\n{out.stderr[-2000:]}")
        print(f"  time to the first training step of `fedtune train --set model.name={args.model}` "
              f"(fresh store): {stamps[0] - tic:.2f} s")


if __name__ == "__main__":
    main()
