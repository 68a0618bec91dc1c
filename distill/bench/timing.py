"""Timing for the benchmarks: interleaved repeats, medians and spreads, wall and CPU time, named phases, peak memory.

Every ``distill bench`` measurement goes through :func:`interleaved`: each repeat runs every contender once, in an
order that rotates from repeat to repeat, so the slow drifts of a shared machine (other jobs, clock changes)
hit all of them alike; the reports then give medians. On CPU the process CPU time is recorded beside wall time:
it counts the work done, not the waits for a core, and drifts far less on a shared machine.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Sample:
    """One timed call: its contender, repeat index (negative during warm-up), wall and CPU seconds, result."""

    name: Hashable
    repeat: int
    wall_s: float
    cpu_s: float
    result: Any

    @property
    def warmup(self) -> bool:
        return self.repeat < 0


def interleaved(
    calls: Mapping[Hashable, Callable[[], Any]], repeats: int, warmup: int = 0, sync: Callable[[], None] | None = None
) -> Iterator[Sample]:
    """Run every call once per repeat, rotating the order each repeat; ``warmup`` repeats come first and are
    yielded with a negative ``repeat``, for the caller to drop. ``sync`` (e.g. a CUDA synchronize)
    runs before starting and before stopping each clock, so queued device work is not charged to the next call.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} / {warmup}")
    names = list(calls)
    sync = sync or (lambda: None)
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            result = calls[name]()
            sync()
            yield Sample(name, i - warmup, time.perf_counter() - start, time.process_time() - cpu_start, result)


def timed_runs(
    calls: Mapping[Hashable, Callable[[], Any]], repeats: int, warmup: int = 0, sync: Callable[[], None] | None = None
) -> dict[Hashable, list[float]]:
    """Wall seconds of every timed (not warm-up) call of :func:`interleaved`, per contender."""
    times: dict[Hashable, list[float]] = {name: [] for name in calls}
    for sample in interleaved(calls, repeats, warmup, sync):
        if not sample.warmup:
            times[sample.name].append(sample.wall_s)
    return times


def latency_stats(times_s: Sequence[float]) -> dict[str, float]:
    """Median and 90th-percentile latency in ms, and calls per second at the median."""
    ms = np.asarray(times_s) * 1e3
    median = float(np.median(ms))
    return {"median_ms": round(median, 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "images_per_s": round(1e3 / median, 2)}  # fmt: skip


def spread(values: Sequence[float]) -> float | None:
    """Interquartile range over median: the run-to-run noise; None for fewer than two values."""
    if len(values) < 2:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


class PhaseClock:
    """Named time spans of one call. CPU: wall time and process CPU time. CUDA: event pairs, read back by
    :meth:`seconds` after the call's closing synchronize, so timing adds no host sync inside the call."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._spans: dict[str, list] = defaultdict(list)
        self._open: dict[str, Any] = {}

    def reset(self) -> None:
        self._spans.clear()
        self._open.clear()

    def start(self, phase: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open[phase] = event
        else:
            self._open[phase] = (time.perf_counter(), time.process_time())

    def stop(self, phase: str) -> None:
        begin = self._open.pop(phase)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans[phase].append((begin, end))
        else:
            self._spans[phase].append((time.perf_counter() - begin[0], time.process_time() - begin[1]))

    def timed(self, phase: str, fn: Callable) -> Callable:
        """``fn`` with each call timed as ``phase``."""

        def call(*args, **kwargs):
            self.start(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(phase)

        return call

    def seconds(self) -> dict[str, float]:
        """phase -> wall seconds summed over its spans (call after the work has finished on the device)."""
        if not self.cuda:
            return {k: float(sum(w for w, _ in v)) for k, v in self._spans.items()}
        return {k: sum(b.elapsed_time(e) for b, e in v) / 1000.0 for k, v in self._spans.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """phase -> process CPU seconds (CPU runs only; empty on CUDA)."""
        if self.cuda:
            return {}
        return {k: float(sum(c for _, c in v)) for k, v in self._spans.items()}


class PeakMemory:
    """Largest rise of memory over a span: CUDA allocated bytes, or the CPU resident-set high-water mark.

    On Linux CPUs the high-water mark is reset through ``/proc/self/clear_refs`` at :meth:`begin` (call
    :func:`release_free_memory` first, so the allocator's free pages do not hide the rise); elsewhere only the
    growth of ``ru_maxrss`` beyond the process's earlier peak can be seen.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif _can_reset_hwm():
            self.kind = "rss_peak"
        else:
            self.kind = "ru_maxrss_growth"
        self._base = 0

    def begin(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.kind == "rss_peak":
            _reset_hwm()
            self._base = _proc_status_kib("VmRSS") * 1024
        else:
            self._base = _maxrss_bytes()

    def end(self) -> int:
        """Bytes above the level at :meth:`begin`."""
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.kind == "rss_peak":
            return max(0, _proc_status_kib("VmHWM") * 1024 - self._base)
        return max(0, _maxrss_bytes() - self._base)


def release_free_memory() -> None:
    """Garbage-collect, and on glibc return the heap's free pages to the OS (``malloc_trim``)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")


def _reset_hwm() -> None:
    # '5' resets the peak RSS of this process to its current RSS (Linux >= 4.0); it touches nothing else
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _can_reset_hwm() -> bool:
    try:
        _reset_hwm()
        return _proc_status_kib("VmHWM") > 0
    except (OSError, KeyError, ValueError):
        return False


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
