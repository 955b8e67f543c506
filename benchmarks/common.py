"""Shared benchmark plumbing: one case per subprocess, medians, peak memory, Markdown."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """Peak memory of a block above its start, in MiB.

    CUDA: the caching allocator's peak. CPU (Linux): the resident-set high-water
    mark, reset through /proc/self/clear_refs. That is why each case runs in a
    fresh process: a reused heap would hide allocations.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _vm_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _vm_kib("VmHWM") * 1024
        self.mib = (peak - self._base) / 2**20


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def launch_counts(
    fn: Callable[[], object], device: torch.device | None = None
) -> tuple[int, int | None]:
    """(top-level aten ops, CUDA kernels or None) of one call of ``fn``: the aten ops
    called from Python or autograd, not from inside another aten op. On a GPU each is
    at least one launch (views excepted), whatever its size."""
    cuda = device is not None and device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()

    def nested(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    ops = sum(e.name.startswith("aten::") and not nested(e) for e in events)
    if not cuda:
        return ops, None
    return ops, sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)


def run_case(module: str, args: list[str], timeout: float) -> dict:
    """Run ``python -m module --case ARGS`` in a fresh process; parse its JSON line."""
    cmd = [sys.executable, "-m", module, "--case", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {out.returncode}: {tail[0][:120]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name())
    return "; ".join(parts)


def write_report(text: str, name: str, out: str | None = None) -> str:
    """Write a benchmark's Markdown to ``out`` or ``results/<name>.md``; returns the text."""
    path = Path(out) if out else RESULTS / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\nwrote {path}")
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
