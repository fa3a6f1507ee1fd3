"""The measurement service every pass times through: one timer, one memo, one latency cache.

A :class:`Timer` runs interleaved A/B measurements (:func:`onnxcomp.benchmark.benchmark` by
default), measures more rounds when the spread of a speedup is wide, remembers what it
measured (in the process, and in a :class:`LatencyCache` file when one is attached) and keeps
a count of what it spent. Passes get theirs from the run context
(:class:`onnxcomp.passbase.RunContext`); tests hand in a Timer whose ``benchmark`` is a model
of latency (:class:`Modelled`) instead of patching module functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from onnxcomp import benchmark as bench
from onnxcomp.latency_cache import LatencyCache, machine_key, structure_hash

# A speedup whose p10-p90 spans more than this share of its median is measured again.
WIDE_SPREAD = 0.12
# How many more times a wide measurement is repeated (its rounds pooled with the first).
MAX_REPEATS = 2


class Benchmark(Protocol):
    """What times models: :func:`onnxcomp.benchmark.benchmark`'s signature."""

    def __call__(self, models: Sequence[onnx.ModelProto], config: bench.BenchConfig,
                 inputs: Mapping[str, np.ndarray] | None = None,
                 labels: Sequence[str] | None = None) -> bench.BenchResult:
        """Time ``models`` interleaved; model 0 is the baseline."""
        ...


# What the process has measured with the real benchmark, shared by every default Timer
# (keys say what was measured: shapes, provider, threads).
_PROCESS_MEMO: dict[str, Any] = {}


@dataclasses.dataclass
class Spent:
    """What a Timer spent: measurements, repeats for noise, memo and file-cache hits, seconds."""

    measurements: int = 0
    repeats: int = 0
    memo_hits: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return dataclasses.asdict(self)


class Timer:
    """Interleaved, noise-aware latency measurement with a memo and an optional file cache."""

    def __init__(self, benchmark: Benchmark | None = None, cache: LatencyCache | None = None,
                 memo: dict[str, Any] | None = None, wide_spread: float = WIDE_SPREAD,
                 max_repeats: int = MAX_REPEATS) -> None:
        self.benchmark: Benchmark = benchmark if benchmark is not None else bench.benchmark
        self.cache = cache
        if memo is None:
            memo = _PROCESS_MEMO if benchmark is None else {}
        self.memo = memo
        self.wide_spread = wide_spread
        self.max_repeats = max_repeats
        self.spent = Spent()
        self._remembering = 0

    def with_cache(self, cache: LatencyCache | None) -> Timer:
        """The same timer (benchmark, memo, counts) reading and writing ``cache``."""
        if cache is None or cache is self.cache:
            return self
        other = Timer(self.benchmark, cache, self.memo, self.wide_spread, self.max_repeats)
        other.spent = self.spent
        return other

    def with_cache_file(self, path: str | None, provider: str, threads: int) -> Timer:
        """The same timer reading and writing the latency cache at ``path`` (None: as is).

        A timer already attached to that file (a run's shared timer) keeps its cache object,
        so one run records each measurement once.
        """
        if not path:
            return self
        if self.cache is not None and self.cache.path == Path(path) and (
                self.cache.machine == machine_key(provider, threads)):
            return self
        return self.with_cache(LatencyCache(Path(path), provider, threads))

    def compare(self, models: Sequence[onnx.ModelProto], config: bench.BenchConfig,
                inputs: Mapping[str, np.ndarray] | None = None,
                around: float | None = None) -> bench.BenchResult:
        """Time ``models`` interleaved (model 0 the baseline); repeat while a speedup is wide.

        A repeat runs the same rounds again and pools them with the earlier ones, so a
        decision on a wide measurement rests on more rounds, not on a lucky second draw.
        ``around``: the speedup a decision compares with (a target); then only a wide
        measurement whose p10-p90 contains it is repeated (more rounds would not change a
        decision that is clear either way).
        """
        key = None
        # Whole models: replayed from the file, never the memo; a comparison made for
        # remember() is recorded under remember's key alone.
        if self.cache is not None and not self._remembering:
            key = _compare_key(models, config, inputs)
            if (hit := self.cache.get(key)) is not None:
                return _replayed(hit, config)
        start = time.perf_counter()
        with measuring():
            result = self.benchmark(models, config, inputs)
            self.spent.measurements += 1
            for _ in range(self.max_repeats):
                if not self._wide(result, around):
                    break
                result = pool(result, self.benchmark(models, config, inputs))
                self.spent.repeats += 1
        self.spent.seconds += time.perf_counter() - start
        if self.cache is not None and key is not None:
            self.cache.put(key, _recorded(result))
        return result

    def _wide(self, result: bench.BenchResult, around: float | None = None) -> bool:
        return any(s.p90 - s.p10 > self.wide_spread * max(s.median, 1e-12)
                   and (around is None or s.p10 <= around <= s.p90)
                   for s in result.speedups)

    def latency_ms(self, model: onnx.ModelProto, config: bench.BenchConfig,
                   inputs: Mapping[str, np.ndarray] | None = None) -> float:
        """Median latency of one model (ms)."""
        start = time.perf_counter()
        with measuring():
            result = self.benchmark([model], config, inputs)
        self.spent.measurements += 1
        self.spent.seconds += time.perf_counter() - start
        return result.models[0].median_ms

    def remember(self, key: str, measure: Callable[[], list[float]], *,
                 in_process: bool = True) -> list[float]:
        """``measure()``, or what was recorded under ``key`` (process memo, then the file).

        ``in_process=False`` reads only the file cache: for whole-model measurements, whose
        key is a structure digest that a later compile in the same process must re-measure
        (the machine's load changes; a layer's ratio does not, to within its noise).
        """
        if in_process and key in self.memo:
            self.spent.memo_hits += 1
            value = list(self.memo[key])
        elif self.cache is not None and (hit := self.cache.get(key)) is not None:
            value = [float(v) for v in (hit if isinstance(hit, list) else [hit])]
            if in_process:
                self.memo[key] = list(value)
            return value
        else:
            self._remembering += 1
            try:
                with measuring():
                    value = [float(v) for v in measure()]
            finally:
                self._remembering -= 1
        if in_process:
            self.memo[key] = list(value)
        if self.cache is not None:
            self.cache.put(key, list(value))  # new to the file (measured, or from the memo)
        return value

    def save(self) -> dict[str, Any] | None:
        """Write the file cache (if any); its hit / measured counts for the report."""
        if self.cache is None:
            return None
        self.cache.save()
        return self.cache.stats()


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Hold the measurement lock (when workers share one: no two processes time at once)."""
    lock = _MEASURE_LOCK[0]
    if lock is None:
        yield
        return
    with lock:
        yield


def share_measurements(lock: Any) -> None:
    """Make ``lock`` (a multiprocessing lock) the one every measurement of this process holds.

    A process pool's workers and their parent share one, so a latency is never measured while
    another process of the same run measures one (they still compute beside it).
    """
    _MEASURE_LOCK[0] = lock


def shared_lock() -> Any:
    """The lock :func:`share_measurements` installed (None: this process times alone)."""
    return _MEASURE_LOCK[0]


_MEASURE_LOCK: list[Any] = [None]


def _compare_key(models: Sequence[onnx.ModelProto], config: bench.BenchConfig,
                 inputs: Mapping[str, np.ndarray] | None) -> str:
    shapes = sorted((k, tuple(v.shape)) for k, v in (inputs or {}).items())
    return (f"compare {[structure_hash(m) for m in models]} {config.provider} x{config.threads} "
            f"batch {config.batch} runs {config.runs} {shapes}")


def _recorded(result: bench.BenchResult) -> list[float]:
    """What the file keeps of a comparison: each model's median, each speedup's quantiles."""
    return [*(m.median_ms for m in result.models),
            *(v for s in result.speedups for v in (s.median, s.p10, s.p90))]


def _replayed(values: Any, config: bench.BenchConfig) -> bench.BenchResult:
    values = [float(v) for v in values]
    n = (len(values) + 3) // 4  # n medians, then 3 quantiles for each of n - 1 speedups
    models = tuple(bench.ModelTiming(f"model{i}", np.array([values[i]]), values[i], values[i],
                                     values[i]) for i in range(n))
    speedups = tuple(bench.Speedup(f"model{i}", i, np.array([values[n + 3 * (i - 1)]]),
                                   *values[n + 3 * (i - 1): n + 3 * i]) for i in range(1, n))
    return bench.BenchResult(config, models, speedups, 0)


def pool(a: bench.BenchResult, b: bench.BenchResult) -> bench.BenchResult:
    """Both measurements' rounds as one result (same models, same order)."""
    models = tuple(bench.ModelTiming.from_latencies(x.label, np.concatenate(
        [x.latencies_ms, y.latencies_ms])) for x, y in zip(a.models, b.models, strict=True))
    speedups = []
    for x, y in zip(a.speedups, b.speedups, strict=True):
        ratios = np.concatenate([x.ratios, y.ratios])
        median, p10, p90 = (float(v) for v in np.percentile(ratios, [50, 10, 90]))
        speedups.append(bench.Speedup(x.label, x.index, ratios, median, p10, p90))
    return bench.BenchResult(a.config, models, tuple(speedups), a.rounds + b.rounds)


class Modelled:
    """A benchmark that computes latencies instead of timing them (tests, dry runs).

    ``latency_ms(model)`` gives each model's latency; ``spread`` widens every round's ratio
    to ``median * (1 - spread) .. median * (1 + spread)`` (evenly, deterministic), so the
    noise handling can be exercised. Calls are counted in ``calls``.
    """

    def __init__(self, latency_ms: Callable[[onnx.ModelProto], float], spread: float = 0.0,
                 rounds: int = 10) -> None:
        self.latency_ms = latency_ms
        self.spread = spread
        self.rounds = rounds
        self.calls = 0

    def __call__(self, models: Sequence[onnx.ModelProto], config: bench.BenchConfig,
                 inputs: Mapping[str, np.ndarray] | None = None,
                 labels: Sequence[str] | None = None) -> bench.BenchResult:
        """Each model's modelled latency for every round; speedups over model 0."""
        self.calls += 1
        names = list(labels) if labels is not None else [f"model{i}" for i in range(len(models))]
        wobble = 1.0 + self.spread * np.linspace(-1.0, 1.0, self.rounds)
        ms = [float(self.latency_ms(m)) for m in models]
        timings = tuple(bench.ModelTiming.from_latencies(n, np.full(self.rounds, t))
                        for n, t in zip(names, ms, strict=True))
        speedups = []
        for i in range(1, len(models)):
            ratios = ms[0] / max(ms[i], 1e-12) * wobble
            median, p10, p90 = (float(v) for v in np.percentile(ratios, [50, 10, 90]))
            speedups.append(bench.Speedup(names[i], i, ratios, median, p10, p90))
        return bench.BenchResult(config, timings, tuple(speedups), self.rounds)
