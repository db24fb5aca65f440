"""Helpers shared by every benchmark side (imported in the main venv and in the peer venvs alike)."""

import json
import os
import resource
import sys
import time


def start() -> tuple[dict, str]:
    """Read the spec; pin the thread count the parent chose (the same for every side)."""
    import torch

    threads = int(os.environ.get("BENCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    return spec, sys.argv[2]


def peak_memory_mb() -> dict:
    """Peak RSS of this process (CPU) and, on a GPU, the peak of torch's allocator."""
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def finish(result_path: str, result: dict) -> None:
    result.update(peak_memory_mb())
    with open(result_path, "w") as f:
        json.dump(result, f)


class Clock:
    """Timestamps of step ends; times() are the gaps between consecutive ones (full iterations).

    Wall time and this process's CPU time (all its threads) are both kept: on a shared, loaded
    machine the CPU seconds of a single-threaded run are far steadier than its wall seconds."""

    def __init__(self):
        self.stamps: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]

    def cpu_times(self) -> list[float]:
        return [b - a for a, b in zip(self.cpu, self.cpu[1:], strict=False)]

    def every(self, k: int) -> "Clock":
        """A clock keeping every k-th tick (the k-th, 2k-th, ...): with k optimizer steps per rollout
        batch, its gaps are whole iterations (sampling, scoring and k steps)."""
        thinned = Clock()
        thinned.stamps, thinned.cpu = self.stamps[k - 1 :: k], self.cpu[k - 1 :: k]
        return thinned


def clock_optimizer_steps(clock: Clock) -> None:
    """Tick `clock` at the end of every torch.optim.AdamW step (both sides' trainers use AdamW): the
    same hook on both sides, installed before any optimizer exists."""
    import torch

    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        clock.tick()
        return out

    torch.optim.AdamW.step = step
