"""Running a command while sampling its resident memory, for the benchmarks."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil


def run_sampled(
    command: list[str], cwd: Path, env: dict[str, str], *, tree: bool = True, interval: float = 0.1
) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run `command`; return wall seconds, the peak RSS in bytes (of the whole process tree, or
    of the process alone) and the finished process with its stdout and stderr."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                processes = [root, *root.children(recursive=True)] if tree else [root]
                peak = max(peak, sum(p.memory_info().rss for p in processes if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    return seconds, peak, subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
