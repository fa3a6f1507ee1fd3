"""The measurement service: noise-aware repeats, memo, latency-cache replay, modelled timing."""

from __future__ import annotations

import numpy as np
from builders import conv_model

from onnxcomp import benchmark as bench
from onnxcomp.latency_cache import LatencyCache
from onnxcomp.timing import Modelled, Timer, pool

CFG = bench.BenchConfig(runs=5, warmup=0)


def _models():
    w = np.ones([4, 4, 1, 1], np.float32)
    return conv_model(w), conv_model(w[:2])


def test_a_narrow_measurement_is_taken_once():
    a, b = _models()
    modelled = Modelled(lambda m: 2.0 if m is a else 1.0, spread=0.01)
    timer = Timer(modelled)
    res = timer.compare([a, b], CFG)
    assert modelled.calls == 1 and timer.spent.repeats == 0
    assert res.speedups[0].median == 2.0


def test_a_wide_measurement_is_repeated_and_pooled():
    a, b = _models()
    modelled = Modelled(lambda m: 2.0 if m is a else 1.0, spread=0.3, rounds=10)
    timer = Timer(modelled, max_repeats=2)
    res = timer.compare([a, b], CFG)
    assert modelled.calls == 3 and timer.spent.repeats == 2
    assert res.rounds == 30 and len(res.speedups[0].ratios) == 30
    assert len(res.models[0].latencies_ms) == 30


def test_pool_recomputes_the_statistics():
    a, b = _models()
    low = Modelled(lambda m: 1.0)([a, b], CFG)
    high = Modelled(lambda m: 3.0 if m is a else 1.0)([a, b], CFG)
    both = pool(low, high)
    assert both.speedups[0].p10 == 1.0 and both.speedups[0].p90 == 3.0
    assert both.rounds == low.rounds + high.rounds


def test_remember_uses_the_memo_then_the_file(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return [1.5, 2.5]

    cache = LatencyCache(tmp_path / "lat.json", "cpu", 1)
    timer = Timer(Modelled(lambda m: 1.0), cache=cache)
    assert timer.remember("k", measure) == [1.5, 2.5]
    assert timer.remember("k", measure) == [1.5, 2.5]
    assert len(calls) == 1 and timer.spent.memo_hits == 1
    timer.save()

    fresh = Timer(Modelled(lambda m: 1.0), cache=LatencyCache(tmp_path / "lat.json", "cpu", 1))
    assert fresh.remember("k", measure) == [1.5, 2.5]
    assert len(calls) == 1
    assert fresh.save() == {"file": str(tmp_path / "lat.json"), "hits": 1, "measured": 0}


def test_file_only_keys_are_measured_again_without_a_file():
    calls = []
    timer = Timer(Modelled(lambda m: 1.0))
    for _ in range(2):
        timer.remember("whole", lambda: calls.append(1) or [1.0], in_process=False)
    assert len(calls) == 2


def test_old_scalar_cache_entries_still_read(tmp_path):
    cache = LatencyCache(tmp_path / "lat.json", "cpu", 1)
    cache.put("speedup x y", 1.7)
    timer = Timer(Modelled(lambda m: 1.0), cache=cache)
    assert timer.remember("speedup x y", lambda: [9.0], in_process=False) == [1.7]


def test_default_timers_share_the_process_memo_and_fakes_do_not():
    assert Timer().memo is Timer().memo
    fake = Modelled(lambda m: 1.0)
    assert Timer(fake).memo is not Timer().memo
