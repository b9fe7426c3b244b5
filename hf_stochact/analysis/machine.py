"""What a benchmark ran on: the CPU, the instruction-set extensions the kernels can use, the machine's load, and a
measured memory read bandwidth — printed with every table, since the machines change and timings mean nothing
without them."""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings

import torch

#: The CPU features that decide which code runs (ours, oneDNN's, MKL's, llama.cpp's).
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
         "asimd", "sve", "bf16")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The :data:`FLAGS` this CPU has (Linux ``/proc/cpuinfo``; empty where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in FLAGS if flag in have]
    except OSError:
        pass
    return []


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """GB/s that ``torch.amax`` reads from a ``mib`` MiB float32 tensor (median of ``repeats``; all torch threads).
    (``torch.sum`` reads slower: its cascade summation costs instructions; ``amax`` is a plain streaming reduction.)"""
    x = torch.ones(mib << 18)
    x.amax()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.amax()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def load() -> float:
    """The 1-minute load average (0.0 where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def machine_report(bandwidth: bool = True) -> dict:
    """CPU model, flags, core count, torch threads and version, load average and (optionally) read bandwidth."""
    report = {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "load": round(load(), 2)}
    if bandwidth:
        report["read_gbps"] = round(read_bandwidth(), 1)
    return report


_WARNED: list[bool] = []


def warn_if_busy(threshold: float = 0.5) -> bool:
    """Warn (once per process; returns True each time) when the machine's load says other work is running: timings
    would be wrong."""
    busy = load() >= threshold * max(1, (os.cpu_count() or 1) / 2)
    if busy and not _WARNED:
        _WARNED.append(True)
        warnings.warn(f"the machine is busy (1-minute load {load():.2f} on {os.cpu_count()} cores): timings measured "
                      "now are not the machine's; run benchmarks with nothing else running", UserWarning, stacklevel=2)
    return busy


def describe(report: dict) -> str:
    """One markdown line: the machine a table was measured on."""
    bw = f"; `torch.amax` reads {report['read_gbps']} GB/s" if "read_gbps" in report else ""
    return (f"CPU: {report['cpu']} ({report['cores']} cores; {', '.join(report['flags']) or 'no listed extensions'})"
            f"{bw}; torch {report['torch']}, {report['threads']} threads; load average {report['load']}")
