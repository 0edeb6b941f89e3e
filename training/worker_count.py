"""How many worker processes this machine should run (`fedtune train --workers auto`): measured, not guessed.

For each candidate count, that many probe processes (``python -m training.worker_count``) build the federation as a
worker does and train real client steps at the same time; their summed samples/s and each one's peak memory decide.
The fewest processes within ``TOLERANCE`` of the fastest count that fits in memory win: more processes for the same
speed only cost memory and start-up. This module imports no ``torch.distributed``: the probes never talk to each
other except through files, so a failed probe is skipped, not a hung collective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TOLERANCE = 0.05  # within 5% of the fastest counts as as fast: measurement noise, not a reason for more processes
MEMORY_MARGIN = 1.25  # over the measured peak: later rounds, the main worker's evaluation, allocator fragmentation
CUDA_CONTEXT_BYTES = 2**29  # a process's CUDA context and kernels, outside the caching allocator's count
CHUNK_STEPS = 2  # batches per probe "client": short, so every probe checks the clock and the stop file often
PROBE_SECONDS = 6.0  # measured after one warm-up chunk: a few chunks even for MiniLM on 2 CPU cores
PROBE_TIMEOUT = 300.0  # per candidate count, start-up and data loading included: a stuck probe is killed
GIB = 2**30


@dataclass(frozen=True)
class Probe:
    """What one candidate count of processes measured, training at the same time."""

    samples_per_second: float = 0.0  # summed over the processes
    peak_bytes: int = 0  # the largest peak memory of one process
    threads: int = 0  # torch threads of each process
    error: str = ""  # why the count was not measured or its probe failed; empty = measured


def fits(count: int, probe: Probe, free_bytes: int, margin: float = MEMORY_MARGIN) -> bool:
    return count * probe.peak_bytes * margin <= free_bytes


def choose(measured: dict[int, Probe], free_bytes: int, cohort_size: int, devices: int = 1,
           tolerance: float = TOLERANCE, margin: float = MEMORY_MARGIN) -> int:
    """Worker processes to run: per device, the fewest whose throughput is within ``tolerance`` of the fastest count
    that fits in ``free_bytes`` and gives every worker a client; times ``devices``, never more than the cohort.

    ``measured`` maps processes per device to their ``Probe``; one process always qualifies (it is today's run).
    """
    usable = {count: probe.samples_per_second for count, probe in measured.items() if not probe.error and (
        count == 1 or (fits(count, probe, free_bytes, margin) and count * devices <= cohort_size))}
    if not usable:  # even one process failed to probe: run as without --workers
        return 1
    best = max(usable.values())
    per_device = min(count for count, rate in usable.items() if rate >= (1 - tolerance) * best)
    return max(1, min(per_device * devices, cohort_size))


def candidates(device: str, cores: int) -> list[int]:
    """Processes per device worth trying: 1, 2 and 4 sharing a GPU; on the CPU powers of two up to the cores, so
    each process gets ``cores // count`` whole threads."""
    if device == "cuda":
        return [1, 2, 4]
    return [2**i for i in range(cores.bit_length()) if 2**i <= cores]


def threads_per_worker(cores: int, workers: int) -> int:
    return max(1, cores // workers)


@dataclass
class Decision:
    workers: int
    measured: dict[int, Probe]
    device: str = "cpu"
    devices: int = 1  # GPUs the workers spread over (1 on the CPU)
    cores: int = 1
    free_bytes: int = 0
    cohort_size: int = 1
    seconds: float = 0.0

    def table(self) -> str:
        """The measurements and the choice, for a person deciding whether to trust it."""
        unit = "processes/GPU" if self.device == "cuda" else "processes"
        head = (f"fedtune: --workers auto on {self.device} ({self.devices} GPU(s), " if self.device == "cuda" else
                f"fedtune: --workers auto on the cpu ({self.cores} cores, ")
        lines = [f"{head}{self.free_bytes / GIB:.1f} GiB free, cohort of {self.cohort_size} clients), "
                 f"measured in {self.seconds:.1f} s:",
                 f"  {unit:>13} {'threads':>8} {'samples/s':>10} {'peak memory/process':>20}"]
        chosen = max(1, self.workers // self.devices)
        for count, probe in sorted(self.measured.items()):
            figures = (f"{probe.threads:>8} {probe.samples_per_second:>10.1f} {probe.peak_bytes / GIB:>16.2f} GiB"
                       if not probe.error else f"{'-':>8} {'-':>10} {'-':>20}  {probe.error}")
            lines.append(f"  {count:>13} {figures}{'  <- chosen' if count == chosen and not probe.error else ''}")
        rule = f"the fewest processes within {TOLERANCE:.0%} of the fastest that fit in memory"
        lines.append(f"fedtune: --workers auto: {self.workers} worker(s) ({rule})")
        return "\n".join(lines)

    def tags(self) -> dict[str, str]:
        """MLflow tags of the run: the choice and what it rested on."""
        figures = "; ".join(f"{c}: {p.error}" if p.error else
                            f"{c}: {p.samples_per_second:.1f} samples/s, {p.peak_bytes / GIB:.2f} GiB"
                            for c, p in sorted(self.measured.items()))
        return {"workers.auto": str(self.workers), "workers.auto.probe": f"{self.device}: {figures}",
                "workers.auto.seconds": f"{self.seconds:.1f}"}

    def environment(self) -> dict[str, str]:
        """For the workers: their share of the cores (torchrun alone would give each worker one thread); a value
        the user set wins."""
        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                  str(threads_per_worker(self.cores, self.workers)))}


def decide(cfg, split=None, seconds: float = PROBE_SECONDS, timeout: float = PROBE_TIMEOUT) -> Decision:
    """Probe one process, then larger counts while they pay off and fit; print the table on stderr."""
    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    setup = {"config": cfg.to_dict(), "split": None if split is None else [list(map(int, p)) for p in split],
             "seconds": seconds}
    print("fedtune: --workers auto: measuring 1 process, then more at once while they pay off ...", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(prefix="fedtune-workers-") as folder:
        first, seen = measure(Path(folder), setup, 1, None, timeout)
        if first.error:
            print(f"fedtune: --workers auto: the probe of one process failed ({first.error}); running 1 worker",
                  file=sys.stderr)
            return Decision(1, {1: first}, cores=cores, seconds=time.perf_counter() - started)
        device, free, cohort = seen["device"], seen["free_bytes"], seen["cohort_size"]
        devices = seen["gpus"] if device == "cuda" else 1
        measured, gained = {1: first}, True
        for count in candidates(device, cores)[1:]:
            reason = skip_reason(count, devices, cohort, first, free, gained)
            if reason:
                measured[count] = Probe(error=reason)
                continue
            print(f"fedtune: --workers auto: measuring {count} processes at once ...", file=sys.stderr, flush=True)
            fastest = max(p.samples_per_second for p in measured.values())
            measured[count], _ = measure(Path(folder), setup, count, threads_per_worker(cores, count * devices),
                                         timeout)
            gained = measured[count].samples_per_second >= (1 + TOLERANCE) * fastest
    decision = Decision(choose(measured, free, cohort, devices), measured, device, devices, cores, free, cohort,
                        time.perf_counter() - started)
    print(decision.table(), file=sys.stderr, flush=True)
    return decision


def skip_reason(count: int, devices: int, cohort: int, first: Probe, free: int, gained: bool) -> str:
    """Why ``count`` processes per device need not be probed (the next smaller count did not pay off, they would
    leave workers without clients, or would not fit); empty when they should be."""
    if not gained:
        return f"skipped: the previous count was not {TOLERANCE:.0%} faster than fewer processes"
    if count * devices > cohort:
        return f"skipped: {count * devices} workers for a cohort of {cohort} clients"
    if not fits(count, first, free):
        return (f"skipped: {count} x {first.peak_bytes / GIB:.2f} GiB x {MEMORY_MARGIN} margin > "
                f"{free / GIB:.1f} GiB free")
    return ""


def measure(folder: Path, setup: dict, count: int, threads: int | None, timeout: float) -> tuple[Probe, dict]:
    """Start ``count`` probe processes at once and sum what they measured; on a failure or past ``timeout`` kill
    them all and return the reason. Also returns the first process's report (device, free memory, cohort)."""
    here = folder / f"count-{count}"
    here.mkdir()
    (here / "setup.json").write_text(json.dumps({**setup, "count": count}))
    env = dict(os.environ)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    procs, broken = [], None
    try:
        for index in range(count):
            with open(here / f"{index}.json", "w") as out, open(here / f"{index}.err", "w") as err:
                procs.append(subprocess.Popen([sys.executable, "-m", "training.worker_count", str(here), str(index)],
                                              stdout=out, stderr=err, env=env))
        deadline = time.monotonic() + timeout
        while broken is None and any(p.poll() is None for p in procs):
            # one that failed first: the others would wait at the barrier for it
            broken = next((i for i, p in enumerate(procs) if p.returncode), None)
            if broken is None and time.monotonic() > deadline:
                return Probe(error=f"failed: no result within {timeout:.0f} s"), {}
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if broken is None:  # all exited: one may have failed in the last poll
        broken = next((i for i, p in enumerate(procs) if p.returncode), None)
    if broken is not None:
        code = procs[broken].returncode
        why = f"killed by signal {-code}" if code < 0 else last_line(here / f"{broken}.err") or f"exit code {code}"
        return Probe(error=f"failed: {why}"), {}
    reports = [json.loads((here / f"{i}.json").read_text().splitlines()[-1]) for i in range(count)]
    return Probe(sum(r["samples_per_second"] for r in reports), max(r["peak_bytes"] for r in reports),
                 reports[0]["threads"]), reports[0]


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


# the probe process ----------------------------------------------------------------------------------------------------
def available_memory() -> int:
    """The kernel's estimate of memory new processes can use without swapping (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def peak_resident() -> int:
    """This process's peak resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def wait_for_all(here: Path, index: int, count: int, timeout: float) -> None:
    """A barrier through files: every probe measures the same stretch of time, once all have warmed up."""
    (here / f"ready-{index}").touch()
    deadline = time.monotonic() + timeout
    while len(list(here.glob("ready-*"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other {count - 1} probes were not ready within {timeout:.0f} s")
        time.sleep(0.02)


def probe(here: Path, index: int) -> dict:
    """Build the federation as a worker does, warm up on one chunk, then train chunks of real client batches (the
    executor's own ``run_clients``) until ``seconds`` pass or another probe has finished."""
    import dataclasses

    import numpy as np
    import torch

    from training import config
    from training.executor import run_clients
    from training.federation import build
    from training.rounds import sample_cohort

    setup = json.loads((here / "setup.json").read_text())
    cfg = config.from_dict(setup["config"])
    free = available_memory()
    federation = build(cfg, None if setup["split"] is None else [np.asarray(p) for p in setup["split"]])
    cuda = federation.where.device.type == "cuda"
    if cuda:  # what was free before this process's own tensors
        free = torch.cuda.mem_get_info(federation.where.device)[0] + torch.cuda.memory_reserved()
    rows = np.concatenate(federation.parts)
    size = cfg.client.batch_size * CHUNK_STEPS
    chunks = [rows[i:i + size] for i in range(0, len(rows) - size + 1, size)] or [rows]
    trial = dataclasses.replace(federation, parts=chunks)
    state = federation.global_state()
    run_clients(trial, state, [index % len(chunks)], 1)  # warm-up: first allocations, kernel choice
    wait_for_all(here, index, setup["count"], PROBE_TIMEOUT)
    stop = here / "stop"
    samples, done, started = 0, 0, time.perf_counter()
    while done == 0 or not (time.perf_counter() - started >= setup["seconds"] or stop.exists()):
        samples += run_clients(trial, state, [(index + done + 1) % len(chunks)], 1).num_samples
        done += 1
    stop.touch()  # the others stop after their current chunk: every rate is measured while all of them ran
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_reserved() + CUDA_CONTEXT_BYTES if cuda else peak_resident()
    return {"samples_per_second": samples * cfg.client.local_epochs / elapsed, "peak_bytes": peak,
            "threads": torch.get_num_threads(), "device": federation.where.device.type,
            "gpus": torch.cuda.device_count() if cuda else 0, "free_bytes": free, "seconds": elapsed,
            "cohort_size": len(sample_cohort(cfg.fl.num_clients, cfg.fl.client_fraction, cfg.fl.seed, 1))}


if __name__ == "__main__":  # one probe process: python -m training.worker_count FOLDER INDEX
    print(json.dumps(probe(Path(sys.argv[1]), int(sys.argv[2]))), flush=True)
