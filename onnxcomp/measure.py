"""Latency of layers, chains and edges on an ONNX Runtime provider, memoized.

A rank option is judged by timing the layer alone and its replacement chain alone (one-layer
models, :func:`onnxcomp.chain.standalone`), minus what such a model pays at its edges and a
layer inside a network does not (:func:`edge_ms`). Every measurement goes through the run's
:class:`onnxcomp.timing.Timer`: remembered per shape in the process and, with a latency cache
attached, read from / written to a file so a second compile replays the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp import benchmark as bench
from onnxcomp.chain import standalone
from onnxcomp.linear import Layer, Plan
from onnxcomp.timing import Timer

# A one-layer measurement stops after this long (once bench.MIN_ROUNDS rounds are done):
# large layers take tens of ms a run, and their ratio is stable long before 25 rounds.
MAX_SECONDS = 1.5


class TimingSettings(Protocol):
    """Where and how long to time (a pass config with these fields)."""

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider."""
        ...

    @property
    def threads(self) -> int:
        """Intra-op threads."""
        ...

    @property
    def bench_runs(self) -> int:
        """Timed runs per measurement."""
        ...


def _micro(config: TimingSettings) -> bench.BenchConfig:
    return bench.BenchConfig(provider=config.provider, threads=config.threads, warmup=3,
                             runs=config.bench_runs, max_seconds=MAX_SECONDS)


def measure_plan(layer: Layer, plan: Plan, model: onnx.ModelProto, config: TimingSettings,
                 timer: Timer) -> tuple[float, float]:
    """(original ms, plan ms) of the layer alone on the provider; remembered per shape."""
    key = (plan.method, layer.op, layer.weight.shape, layer.in_shape, layer.out_shape,
           layer.geom, plan.ranks, plan.last_shape, config.provider, config.threads,
           tuple((st.weight.shape, repr(sorted(st.attrs.items()))) for st in plan.stages))

    def time_both() -> list[float]:
        a = standalone(layer, None, model.ir_version, model.opset_import)
        b = standalone(layer, plan, model.ir_version, model.opset_import)
        res = timer.compare([a, b], _micro(config), around=1.0)
        return [res.models[0].median_ms, res.models[0].median_ms / res.speedups[0].median]

    base, new = timer.remember(f"layer {key!r}", time_both)
    return base, new


def _edge_model(shape: Sequence[int], copies: int, ir_version: int, opsets: Sequence[Any]
                ) -> onnx.ModelProto:
    """``copies`` cheap layers on a tensor of ``shape`` (batch 1).

    Per-channel 1x1 depthwise convs on a 4-D tensor (ONNX Runtime's CPU provider runs them in
    its blocked layout, like the convs around them), Relu otherwise.
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
    full = [1, *shape]
    nodes, inits = [], []
    src = "x"
    for i in range(copies):
        dst = "y" if i == copies - 1 else f"t{i}"
        if len(full) == 4:
            inits.append(numpy_helper.from_array(
                np.full((full[1], 1, 1, 1), 1.0 + 1e-3 * i, np.float32), f"w{i}"))
            nodes.append(helper.make_node("Conv", [src, f"w{i}"], [dst], group=full[1],
                                          kernel_shape=[1, 1]))
        else:
            nodes.append(helper.make_node("Relu", [src], [dst]))
        src = dst
    graph = helper.make_graph(nodes, "edge", [helper.make_tensor_value_info("x", elem, full)],
                              [helper.make_tensor_value_info("y", elem, full)], inits)
    model = helper.make_model(graph, opset_imports=list(opsets))
    model.ir_version = ir_version
    return model


def _edges_from_copies(key: tuple[Any, ...], build: Callable[[int], onnx.ModelProto],
                       config: TimingSettings, timer: Timer) -> float:
    """Edge cost (ms) from timing 1 and 3 chained copies: t(1) - (t(3) - t(1)) / 2."""
    def time_copies() -> list[float]:
        res = timer.compare([build(1), build(3)], _micro(config), around=0.0)
        t1, t3 = res.models[0].median_ms, res.models[1].median_ms
        return [min(max(t1 - max(t3 - t1, 0.0) / 2, 0.0), t1)]

    return timer.remember(f"edge {(*key, config.provider, config.threads)!r}", time_copies)[0]


def edge_ms(shape: Sequence[int], model: onnx.ModelProto, config: TimingSettings,
            timer: Timer) -> float:
    """What a one-layer model on a tensor of ``shape`` pays at its edges, in ms.

    A layer timed alone pays costs a layer inside a network does not: the conversion into and
    out of the provider's blocked layout (ONNX Runtime CPU), per-run overhead. Timing 1 and 3
    copies of a cheap layer separates them.
    """
    return _edges_from_copies(
        (tuple(shape),),
        lambda n: _edge_model(shape, n, model.ir_version, model.opset_import), config, timer)


def layer_edges_ms(layer: Layer, model: onnx.ModelProto, config: TimingSettings,
                   timer: Timer) -> float:
    """Edge cost of a one-layer model of ``layer``.

    When the layer keeps its input's shape, from 1 and 3 chained copies of the layer itself;
    otherwise from cheap stand-in layers, half the input's edges and half the output's.
    """
    if tuple(layer.in_shape) != tuple(layer.out_shape):
        return 0.5 * (edge_ms(layer.in_shape, model, config, timer)
                      + edge_ms(layer.out_shape, model, config, timer))
    return _edges_from_copies(
        ("layer", layer.op, layer.weight.shape, tuple(layer.in_shape), layer.geom),
        lambda n: standalone(layer, None, model.ir_version, model.opset_import, copies=n),
        config, timer)
