"""The timing every benchmark shares: interleaved repeats, medians and spreads, peak memory."""

import pytest
import torch

from distill.bench.timing import PeakMemory, interleaved, latency_stats, release_free_memory, spread, timed_runs


def test_interleaved_rotates_the_order_and_marks_the_warmup():
    calls = {name: (lambda n=name: n.upper()) for name in ("a", "b", "c")}
    samples = list(interleaved(calls, repeats=2, warmup=1))
    assert [s.name for s in samples] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [s.repeat for s in samples] == [-1] * 3 + [0] * 3 + [1] * 3
    assert [s.warmup for s in samples[:4]] == [True, True, True, False]
    assert all(s.result == s.name.upper() and s.wall_s >= 0 and s.cpu_s >= 0 for s in samples)


def test_timed_runs_keep_only_the_timed_repeats_and_sync_around_each_call():
    synced = []
    times = timed_runs({"x": lambda: None, "y": lambda: None}, repeats=3, warmup=2, sync=lambda: synced.append(1))
    assert {k: len(v) for k, v in times.items()} == {"x": 3, "y": 3}
    assert len(synced) == 2 * (2 + 3) * 2  # before and after each of the 10 calls
    with pytest.raises(ValueError, match="repeats"):
        next(interleaved({"x": lambda: None}, repeats=0))


def test_latency_stats_and_spread():
    stats = latency_stats([0.010, 0.020, 0.030, 0.040, 0.050])
    assert stats == {"median_ms": 30.0, "p90_ms": 46.0, "images_per_s": pytest.approx(33.33, abs=0.01)}
    assert spread([1.0]) is None
    # quartiles of 1, 2, 3, 4 (inclusive): 1.75 and 3.25; median 2.5
    assert spread([4.0, 1.0, 3.0, 2.0]) == pytest.approx(1.5 / 2.5)


def test_peak_memory_sees_a_large_allocation():
    memory = PeakMemory(torch.device("cpu"))
    # as the benches do: an earlier test in this process may have kept its freed heap resident (the engine's
    # keep_host_memory), which would serve the block without any rise
    release_free_memory()
    memory.begin()
    block = torch.ones(64, 2**20 // 4)  # 64 MiB, touched
    rise = memory.end()
    del block
    assert memory.kind in ("rss_peak", "ru_maxrss_growth")
    if memory.kind == "rss_peak":
        assert rise >= 48 * 2**20
