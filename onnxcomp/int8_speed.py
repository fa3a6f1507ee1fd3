"""Which layers int8 makes slower: each candidate layer timed alone, in int8 and in float.

ONNX Runtime's integer kernels win on layers with enough channels to fill their vector
lanes; on a conv that reads one to three input channels (the first layer of most image
networks), a tiny Gemm or a narrow factorized stage, the int8 kernel plus its requantization
can take longer than the float kernel. Measured on this machine: the first conv of the
Fashion-MNIST net (1 -> 32 channels, 3x3, 28x28) takes about 20 us as QLinearConv and 5 us in
float, the largest single loss of its int8 model.

So the layers are found in two steps, on the provider, interleaved:

1. Screen: each layer timed as two one-layer models, int8 (``Q -> QLinearConv -> DQ``, the
   layer quantized as the pass quantizes it) and float (the layer alone). Inside an int8
   network a float layer costs ``DQ -> float kernel -> Q`` against the integer kernel, so a
   layer whose int8 model is not slower than the float one even with the quantize and
   dequantize at its edges counted against it is never worth leaving in float. (Alone
   between QDQ pairs, a float layer would be quantized by ONNX Runtime itself, per tensor;
   in the model, quant.keep_float keeps it float.)
2. Confirm: the whole int8 model against the same model with the screened layers in float;
   they stay in float only when that measures faster beyond noise: the median over
   1 + NOISE, and faster in more rounds than chance explains (a sign test at two sigma:
   more than ``n / 2 + sqrt(n)`` of ``n`` rounds). Requiring 9 rounds in 10 instead made
   a real gain of a few percent flip run to run on a shared machine, where single rounds
   swing more than that.

Screen measurements are remembered per shape (and in the latency cache file when one is
attached), so a second compile replays them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxcomp import benchmark as bench
from onnxcomp import quant
from onnxcomp.calibration import Calibration
from onnxcomp.graph import Graph
from onnxcomp.latency_cache import structure_hash
from onnxcomp.linear import static_shapes
from onnxcomp.passbase import Note
from onnxcomp.timing import Timer

# One layer's measurement stops after this long once bench.MIN_ROUNDS rounds are done.
MAX_SECONDS = 1.0
RUNS = 40
# Leaving layers in float must measure this much faster (whole model) to be kept.
NOISE = 0.03


def layer_model(model: onnx.ModelProto, layer: str, shapes: Mapping[str, Sequence[int]],
                graph: Graph | None = None) -> tuple[onnx.ModelProto, str, str] | None:
    """The layer alone (with the Relu / Clip that follows it): (model, input, output tensor).

    None when the layer reads anything but its data input and constants, or a shape is
    unknown. The output passes through an Identity so that, as inside a network, the layer's
    activation has a reader (static quantization folds it into the layer's output grid).
    """
    graph = graph if graph is not None else Graph(model)
    node = next((n for n in graph.nodes if n.name == layer), None)
    if node is None or not node.inputs or not node.outputs:
        return None
    x = node.inputs[0].name
    act = quant.clamping_activation(graph, node.outputs[0])
    chain = [node, *([act[0]] if act else [])]
    y = chain[-1].outputs[0].name
    # a Relu / Clip keeps its input's shape
    y_shape = shapes.get(y, shapes.get(node.outputs[0].name))
    if x not in shapes or y_shape is None:
        return None
    protos = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    nodes, used = [], []
    for member in chain:
        proto = protos.get(member.name)
        if proto is None:
            return None
        for i, name in enumerate(proto.input):
            if not name or i == 0:
                continue
            if name not in inits:
                return None  # computed weights: not a layer to time alone
            used.append(inits[name])
        nodes.append(proto)
    nodes.append(helper.make_node("Identity", [y], ["layer_out"], name="layer_out"))
    elem = onnx.TensorProto.FLOAT
    out = helper.make_model(
        helper.make_graph(nodes, "layer",
                          [helper.make_tensor_value_info(x, elem, list(shapes[x]))],
                          [helper.make_tensor_value_info("layer_out", elem, list(y_shape))],
                          list({t.name: t for t in used}.values())),
        opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out, x, y


def slow_layers(model: onnx.ModelProto, layers: Sequence[str],
                quantize: Callable[[onnx.ModelProto, set[str]], onnx.ModelProto],
                feeds: Mapping[str, np.ndarray], ranges: Mapping[str, tuple[float, float]],
                shapes: Mapping[str, Sequence[int]], timer: Timer, provider: str, threads: int
                ) -> tuple[dict[str, float], float | None]:
    """Layers to leave in float for speed: ({name: int8 speedup alone}, whole-model gain).

    ``quantize(m, excluded)`` is the pass's int8 form of ``m`` with ``excluded`` left in
    float; ``feeds`` one sample of the model's inputs; ``shapes`` every tensor's shape at
    batch 1. The gain is the measured speedup of leaving the screened layers in float (None
    when none screened); the layers come back only when :func:`faster` holds for it.
    """
    config = bench.BenchConfig(provider=provider, threads=threads, warmup=3, runs=RUNS,
                               max_seconds=MAX_SECONDS)
    screened: dict[str, float] = {}
    graph = Graph(model)
    for layer in layers:
        built = layer_model(model, layer, shapes, graph)
        if built is None:
            continue
        micro, x, _ = built
        if x not in ranges:
            continue

        def time_both(micro: onnx.ModelProto = micro, x: str = x) -> list[float]:
            rng = np.random.default_rng(0)
            lo, hi = ranges[x]
            inputs = {x: rng.uniform(lo, hi, size=tuple(shapes[x])).astype(np.float32)}
            res = timer.compare([micro, quantize(micro, set())], config, inputs, around=1.0)
            return [res.speedups[0].median, res.speedups[0].p90]

        median, p90 = timer.remember(_key(micro, provider, threads), time_both)
        if p90 < 1.0:
            screened[layer] = median
    if not screened:
        return {}, None
    whole = bench.BenchConfig(provider=provider, threads=threads, warmup=5, runs=RUNS)
    pair = [quantize(model, set()), quantize(model, set(screened))]

    def decide() -> list[float]:
        res = timer.compare(pair, whole, feeds, around=1.0 + NOISE)
        return [res.speedups[0].median, float(faster(res.speedups[0].ratios))]

    # the decision is recorded, not only the quantiles: a latency cache replays the choice
    key = (f"int8 float layers {structure_hash(pair[0])} -> {structure_hash(pair[1])} "
           f"{provider} x{threads}")
    gain, won = timer.remember(key, decide, in_process=False)
    return (screened if won else {}), gain


def faster(ratios: np.ndarray) -> bool:
    """True when per-round speedups show a gain beyond noise.

    The median gains more than NOISE, and the rounds that gain anything outnumber what a
    fair coin gives by two standard deviations (``n / 2 + sqrt(n)``). More rounds (the
    timer pools repeats of a wide measurement) make the test sharper, not stricter.
    """
    n = len(ratios)
    return bool(n and np.median(ratios) > 1.0 + NOISE
                and np.sum(ratios > 1.0) > n / 2 + np.sqrt(n))


def for_pass(model: onnx.ModelProto, layers: Sequence[str],
             quantize: Callable[[onnx.ModelProto, set[str]], onnx.ModelProto],
             calib: Calibration, ranges: Mapping[str, tuple[float, float]], timer: Timer,
             where: Any, notes: list[Note]) -> dict[str, float]:
    """:func:`slow_layers` for the quantize pass: the layers' shapes, a note of the outcome.

    ``where`` has the pass config's ``provider`` and ``threads``.
    """
    if not layers:
        return {}
    feeds = {k: v[:1] for k, v in calib.batches[0].items()}
    # shape inference, running one sample only for what it cannot follow
    shapes = static_shapes(model, calib)
    slow, gain = slow_layers(model, layers, quantize, feeds, ranges, shapes, timer,
                             where.provider, where.threads)
    if gain is not None:
        kept = "left in float" if slow else "quantized anyway (not faster beyond noise)"
        notes.append(Note("per_layer_speed",
                          f"int8 measured slower than float for layers alone; in the whole "
                          f"model leaving them in float measured {gain:.2f}x: {kept}"))
    return slow


def _key(micro: onnx.ModelProto, provider: str, threads: int) -> str:
    """What a one-layer int8-vs-float measurement depends on: ops, attributes, shapes."""
    parts: list[Any] = [
        (n.op_type, sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))
        for n in micro.graph.node]
    parts.append([tuple(t.dims) for t in micro.graph.initializer])
    dims = [d.dim_value for d in micro.graph.input[0].type.tensor_type.shape.dim]
    return f"int8 vs float {parts!r} in {dims} {provider} x{threads}"
