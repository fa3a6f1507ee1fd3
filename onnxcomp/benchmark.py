"""onnxruntime latency of one or more models, measured interleaved (A/B/A/B...).

Every model gets one session, created once. After a warm-up of each model, ``runs`` rounds
follow; each round runs every model once, in an order rotated by one each round (round ``r``
starts at model ``r % k``), so slow drift (thermal, frequency scaling, a noisy neighbour) hits
all models alike. Besides per-model latency statistics the result holds, for every model
``i > 0``, the per-round ratio ``latency[0] / latency[i]``: the speedup of model ``i`` over
model 0 measured within the same round, which is far less noisy than a ratio of medians.

``time_model`` and ``compare_models`` are thin conveniences on :func:`benchmark` for the
micro-benchmarks passes run on one subgraph.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnxruntime as ort

from onnxcomp import runtime, serial
from onnxcomp.errors import ConfigError, InputError

log = logging.getLogger(__name__)

MIN_ROUNDS = 5
"""With ``max_seconds`` set, measurement stops early only after this many rounds."""

# The clock used for timing; a module attribute so tests can replace it.
_clock: Callable[[], float] = time.perf_counter


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How to benchmark.

    ``batch`` is the leading dim of synthesized inputs (given inputs are used as they are);
    ``optimize`` turns onnxruntime's graph optimizations on, as deployed; ``max_seconds`` stops
    the measurement early once that much time has passed and ``MIN_ROUNDS`` rounds are done.
    """

    provider: str = "cpu"
    threads: int = 1
    batch: int = 1
    warmup: int = 10
    runs: int = 50
    seed: int = 0
    optimize: bool = True
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.provider, str) or not self.provider:
            raise ConfigError(
                f"BenchConfig.provider must be a provider name, got {self.provider!r}"
            )
        for name, low in (("threads", 1), ("batch", 1), ("warmup", 0), ("runs", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"BenchConfig.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.optimize, bool):
            raise ConfigError(f"BenchConfig.optimize must be a bool, got {self.optimize!r}")
        limit = self.max_seconds
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
            or limit <= 0
        ):
            raise ConfigError(
                f"BenchConfig.max_seconds must be None or a number > 0, got {limit!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelTiming(serial.Record):
    """Latencies of one model, one per measured round, in milliseconds."""

    label: str
    latencies_ms: np.ndarray
    median_ms: float
    p10_ms: float
    p90_ms: float

    @classmethod
    def from_latencies(cls, label: str, latencies_ms: np.ndarray) -> ModelTiming:
        """Statistics of ``latencies_ms``."""
        median, p10, p90 = _stats(latencies_ms)
        return cls(label, latencies_ms, median, p10, p90)


@dataclasses.dataclass(frozen=True, eq=False)
class Speedup(serial.Record):
    """Per-round speedup ``latency[0] / latency[index]`` of model ``index`` over model 0."""

    label: str
    index: int
    ratios: np.ndarray
    median: float
    p10: float
    p90: float


@dataclasses.dataclass(frozen=True, eq=False)
class BenchResult(serial.Record):
    """Latencies of every model and speedups of models 1.. over model 0."""

    config: BenchConfig
    models: tuple[ModelTiming, ...]
    speedups: tuple[Speedup, ...]
    rounds: int


def benchmark(
    models: Sequence[onnx.ModelProto],
    config: BenchConfig,
    inputs: Mapping[str, np.ndarray] | None = None,
    labels: Sequence[str] | None = None,
) -> BenchResult:
    """Time ``models`` interleaved on onnxruntime; model 0 is the baseline of the speedups.

    Without ``inputs``, seeded random inputs are made from model 0's graph inputs (floats:
    standard normal, integers and booleans: zeros; the leading dim is ``config.batch``).
    Raises :class:`InputError` when the provider is unavailable, the models' input names
    differ, an input has a symbolic dim other than the batch, or a model's fixed batch
    differs from the inputs' batch.
    """
    if not models:
        raise InputError("benchmark needs at least one model")
    names = list(labels) if labels is not None else [f"model{i}" for i in range(len(models))]
    if len(names) != len(models):
        raise InputError(f"got {len(names)} labels for {len(models)} models")
    expected = _input_names(models[0])
    for label, model in zip(names[1:], models[1:], strict=True):
        if _input_names(model) != expected:
            raise InputError(
                f"{label}: inputs {sorted(_input_names(model))} differ from "
                f"{names[0]}'s inputs {sorted(expected)}"
            )
    feeds = dict(inputs) if inputs is not None else _synthesize(models[0], config)
    for label, model in zip(names, models, strict=True):
        _check_feeds(label, model, feeds)
    feeds = {k: v for k, v in feeds.items() if k in expected}

    sessions = [
        runtime.make_session(m, config.provider, config.threads, config.optimize) for m in models
    ]
    runners = [_runner(session, feeds) for session in sessions]
    table = _measure(runners, config.runs, config.warmup, config.max_seconds)

    timings = tuple(ModelTiming.from_latencies(label, table[:, i]) for i, label in enumerate(names))
    speedups = []
    for i in range(1, len(models)):
        ratios = table[:, 0] / table[:, i]
        median, p10, p90 = _stats(ratios)
        speedups.append(Speedup(names[i], i, ratios, median, p10, p90))
    result = BenchResult(config, timings, tuple(speedups), rounds=int(table.shape[0]))
    for timing in timings:
        log.info(
            "%s: median %.3f ms (p10 %.3f, p90 %.3f)",
            timing.label,
            timing.median_ms,
            timing.p10_ms,
            timing.p90_ms,
        )
    return result


def speedup(result: BenchResult, i: int) -> float:
    """Median per-round speedup of model ``i`` over model 0 (1.0 for model 0 itself)."""
    if not 0 <= i < len(result.models):
        raise InputError(f"no model {i}: the result holds {len(result.models)} models")
    return 1.0 if i == 0 else result.speedups[i - 1].median


def time_model(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray] | None = None,
               provider: str = "cpu", threads: int = 1, runs: int = 30, warmup: int = 5
               ) -> float:
    """Median latency of ``model`` in milliseconds.

    Synthesized inputs use the model's fixed batch, or 1 when its batch is symbolic.
    """
    config = _micro_config(model, provider, threads, runs, warmup)
    return benchmark([model], config, inputs).models[0].median_ms


def compare_models(a: onnx.ModelProto, b: onnx.ModelProto,
                   inputs: Mapping[str, np.ndarray] | None = None, provider: str = "cpu",
                   threads: int = 1, runs: int = 30, warmup: int = 5) -> float:
    """Median per-round ``latency(a) / latency(b)``, measured interleaved: > 1 when b is faster."""
    config = _micro_config(a, provider, threads, runs, warmup)
    return speedup(benchmark([a, b], config, inputs, labels=["a", "b"]), 1)


# ------------------------------------------------------------------------------ measuring


def _run_once(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> None:
    """One inference; the seam tests replace to observe or fake the runs."""
    session.run(None, feeds)


def _runner(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
    def run() -> None:
        _run_once(session, feeds)

    return run


def _measure(
    runners: Sequence[Callable[[], None]], runs: int, warmup: int, max_seconds: float | None
) -> np.ndarray:
    """Latencies in ms, shape ``(rounds, len(runners))``; round ``r`` starts at ``r % k``."""
    for run in runners:
        for _ in range(warmup):
            run()
    k = len(runners)
    table = np.zeros((runs, k), dtype=np.float64)
    start = _clock()
    rounds = 0
    for r in range(runs):
        for j in range(k):
            i = (r + j) % k
            t0 = _clock()
            runners[i]()
            table[r, i] = (_clock() - t0) * 1e3
        rounds = r + 1
        if (
            max_seconds is not None
            and rounds >= min(MIN_ROUNDS, runs)
            and _clock() - start >= max_seconds
        ):
            log.info("stopping after %d of %d rounds (max_seconds=%s)", rounds, runs, max_seconds)
            break
    return table[:rounds]


def _stats(values: np.ndarray) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile as Python floats."""
    median, p10, p90 = np.percentile(values, [50, 10, 90])
    return float(median), float(p10), float(p90)


def _micro_config(
    model: onnx.ModelProto, provider: str, threads: int, runs: int, warmup: int
) -> BenchConfig:
    batch = 1
    for value in _graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            batch = int(dims[0].dim_value)
            break
    return BenchConfig(provider=provider, threads=threads, batch=batch, warmup=warmup, runs=runs)


# ------------------------------------------------------------------------------ inputs


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old IR versions list initializers as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _input_names(model: onnx.ModelProto) -> set[str]:
    return {v.name for v in _graph_inputs(model)}


def _synthesize(model: onnx.ModelProto, config: BenchConfig) -> dict[str, np.ndarray]:
    """Seeded random inputs for ``model``'s graph inputs."""
    rng = np.random.default_rng(config.seed)
    feeds = {}
    for value in _graph_inputs(model):
        if not value.type.HasField("tensor_type"):
            raise InputError(f"input '{value.name}' is not a tensor; pass inputs explicitly")
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if axis == 0:
                shape.append(config.batch)
            elif dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                raise InputError(
                    f"input '{value.name}' dim {axis} ('{dim.dim_param or '?'}') is symbolic; "
                    "pass inputs explicitly"
                )
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            feeds[value.name] = np.zeros(shape, dtype=dtype)
        else:
            raise InputError(f"input '{value.name}' has unsupported dtype {dtype}")
    return feeds


def _check_feeds(label: str, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`InputError` when ``feeds`` miss an input or contradict a fixed dim."""
    for value in _graph_inputs(model):
        if value.name not in feeds:
            raise InputError(f"{label}: no data for input '{value.name}'")
        if not value.type.tensor_type.HasField("shape"):
            continue
        shape = np.shape(feeds[value.name])
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise InputError(
                f"{label}: input '{value.name}' has rank {len(dims)}, the data has shape {shape}"
            )
        for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            if not dim.HasField("dim_value") or dim.dim_value in (size, -1):
                continue
            if axis == 0:
                raise InputError(
                    f"{label}: the model's batch is fixed to {dim.dim_value} (input "
                    f"'{value.name}'), the inputs have batch {size}"
                )
            raise InputError(
                f"{label}: input '{value.name}' dim {axis} is fixed to {dim.dim_value}, "
                f"the data has {size}"
            )
