"""Weight quantization folded into the graph: int8 / int4 per channel, k-means sharing (lossy).

Papers: S. Han, H. Mao, W. Dally, "Deep Compression", ICLR 2016, arXiv:1510.00149 (k-means
weight sharing, Huffman coding of the indices); B. Jacob et al., "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (symmetric
per-channel int8 weights).

Before / after (``--mode weight``)::

    Conv(x, W float32)  =>  Conv(x, DequantizeLinear(Wq int8|int4, scale[O], axis=0))
        Wq = clip(round(W / scale), -qmax, qmax), scale_o = max|W_o| / qmax, qmax = 2^(b-1)-1

``--mode kmeans``::

    Conv(x, W float32)  =>  Conv(x, Gather(codebook[2^b] float32, Cast(idx uint8 -> int32)))
        2^b centroids per layer (linear initialization, Lloyd iterations on the weights)

The file shrinks ~4x (int8, kmeans) or ~8x (int4); plain ONNX Runtime folds the constant
dequantization at load, so latency is unchanged: this pass is about size. Int4 initializers
need opset >= 21 (DequantizeLinear on int4); older models keep 4-bit values in int8 storage
and the report says so. The report gives, per layer, bits, the relative weight error and the
bytes before/after, and for k-means the Huffman-coded size of the indices (the storage
figure Deep Compression quotes).

``--mode static``: int8 per-channel weights as above, and uint8 activations (asymmetric,
per tensor) through QuantizeLinear -> DequantizeLinear pairs on every quantized layer's input
and output (after its Relu/Clip), ranges from the calibration data (``--calibrator minmax``
or ``percentile``, 99.99 by default). ONNX Runtime fuses the QDQ pattern into integer
kernels (QLinearConv, QGemm). A Relu / Clip(0, c) after a layer is folded into the uint8
range. Measured as fast as ONNX Runtime's own quantizer (within noise) with better fidelity on
MobileNetV2 / EfficientNet-Lite0; before opset 13 weights are per tensor (still fusable), which
costs fidelity. Not yet: the entropy calibrator, automatic exclusion of sensitive layers.

Supported: Conv, ConvTranspose, Gemm and MatMul with a constant float weight read by that
node only. Skipped, with a reason: non-constant or shared weights, already quantized models,
tiny weights (``--min-params``).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import bench, calibrate
from onnxcomp.calibrate import Calibration
from onnxcomp.decompose import own_float_weight
from onnxcomp.graph import Graph
from onnxcomp.model import check_model, copy_model, default_opset
from onnxcomp.passbase import (
    Change,
    ConfigError,
    InputError,
    PassConfig,
    PassResult,
    Report,
    Skip,
    SkipReason,
)

MODES = ("weight", "kmeans", "static")
CALIBRATORS = ("minmax", "percentile")
# Percentile ranges need enough values to put a tail on; fewer samples is an error.
MIN_PERCENTILE_SAMPLES = 8
# Values kept per tensor for percentiles (a seeded subsample bounds the memory).
PERCENTILE_VALUES = 1_000_000
INT4_OPSET = 21
OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": 1}  # output-channel axis


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """Options of ``quantize``."""

    mode: str = "weight"
    bits: int = 8
    min_params: int = 1024
    kmeans_iters: int = 20
    calibrator: str = "percentile"
    percentile: float = 99.99
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.calibrator not in CALIBRATORS:
            raise ConfigError(f"--calibrator must be one of {', '.join(CALIBRATORS)}, got "
                              f"'{self.calibrator}'")
        if self.mode == "static" and self.bits != 8:
            raise ConfigError(f"static quantization is 8-bit, got --bits {self.bits}")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.mode == "weight" and self.bits not in (4, 8):
            raise ConfigError(f"--bits must be 4 or 8 for weight quantization, got {self.bits}")
        if self.mode == "kmeans" and not 1 <= self.bits <= 8:
            raise ConfigError(f"--bits must be in 1..8 for k-means, got {self.bits}")


class Quantize:
    """The ``quantize`` pass."""

    name: ClassVar[str] = "quantize"
    lossless: ClassVar[bool] = False
    config_cls: ClassVar[type[PassConfig]] = QuantizeConfig

    def __call__(self, model: onnx.ModelProto, config: PassConfig,
                 calib: Calibration | None = None) -> PassResult:
        """Quantize the constant weights of a copy of ``model``."""
        if not isinstance(config, QuantizeConfig):
            raise ConfigError("quantize needs a QuantizeConfig")
        report = Report(self.name)
        graph = Graph(model)
        opset = default_opset(model) or 0
        storage4 = config.mode == "weight" and config.bits == 4 and opset >= INT4_OPSET
        if config.mode == "weight" and config.bits == 4 and not storage4:
            report.notes.append(f"int4 initializers need opset >= {INT4_OPSET} (model has "
                                f"{opset}): 4-bit values are stored as int8")
        if config.mode == "static" and opset < 13:
            report.notes.append("opset < 13: static quantization uses per-tensor weight "
                                "scales (per-channel needs opset 13 to stay fusable)")
        if config.mode == "weight" and opset < 13:
            report.notes.append("opset < 13 has no per-channel DequantizeLinear: the "
                                "per-channel scales are applied by a Mul after it")
        if config.mode == "static":
            if calib is None or calib.synthetic:
                report.notes.append("static quantization without --calib: activation "
                                    "ranges come from random inputs")
            if calib is not None and config.calibrator == "percentile" and (
                    calib.num_samples < MIN_PERCENTILE_SAMPLES):
                raise InputError(f"the percentile calibrator needs at least "
                                 f"{MIN_PERCENTILE_SAMPLES} calibration samples, got "
                                 f"{calib.num_samples} (use --calibrator minmax)")
        huffman_bits = 0
        int4_names: set[str] = set()
        activations: list[str] = []
        gemm_bias: list[tuple[Any, str]] = []  # (Gemm, its input) for int32 biases
        # activation output -> (layer output, the Relu/Clip node, its upper bound)
        folded: dict[str, tuple[str, Any, float]] = {}
        for node in graph.nodes:
            if node.op not in OPS:
                continue
            skip = _check(graph, node, config)
            if skip is not None:
                report.add_skip(skip)
                continue
            w = graph.const_value(graph.input(node, 1))
            assert w is not None
            axis = _out_axis(node)
            if config.mode == "static":
                activations.append(node.inputs[0].name)
                if node.op == "Gemm" and graph.input(node, 2) is not None:
                    gemm_bias.append((node, node.inputs[0].name))
                act = _clamping_activation(graph, node.outputs[0])
                if act is not None:
                    folded[act[0].outputs[0].name] = (node.outputs[0].name, act[0], act[1])
                    activations.append(act[0].outputs[0].name)
                else:
                    activations.append(node.outputs[0].name)
            if config.mode in ("weight", "static"):
                # Static before opset 13: per-tensor weights, the only form ONNX Runtime can
                # fuse there (a per-channel Mul would keep the layer in float).
                per_tensor = config.mode == "static" and opset < 13
                q, scale, err = quantize_symmetric(w, config.bits, None if per_tensor else axis)
                if per_tensor:
                    scale = np.full(w.shape[axis], float(scale), dtype=np.float32)
                _insert_dq(graph, node, q, scale, axis, w.dtype, int4=storage4,
                           int4_names=int4_names, dq_axis=opset >= 13, per_tensor=per_tensor)
                after = scale.nbytes + (q.size + 1) // 2 if storage4 else scale.nbytes + q.size
                details: dict[str, Any] = {"bits": config.bits, "per_channel": True,
                                           "storage": "int4" if storage4 else "int8"}
            else:
                codebook, idx, err = kmeans_quantize(w, config.bits, config.kmeans_iters)
                _insert_gather(graph, node, codebook, idx, w.dtype)
                hb = huffman_bits_of(idx)
                huffman_bits += hb
                after = codebook.nbytes + idx.size
                details = {"bits": config.bits, "centroids": int(codebook.size),
                           "huffman_bytes": (hb + 7) // 8}
            report.apply(Change(
                node=node.name, op_type=node.op, what=f"{config.mode} {config.bits}-bit",
                params_before=int(w.size), params_after=int(w.size), macs_before=0,
                macs_after=0, error=round(err, 6),
                details={**details, "bytes_before": int(w.nbytes), "bytes_after": int(after),
                         "weight_rel_error": round(err, 6)}))
        if not report.applied:
            return PassResult(copy_model(model), report)
        if config.mode == "static":
            ranges = activation_ranges(model, list(dict.fromkeys(activations)), calib, config)
            for name in list(ranges):
                if name in folded:  # quantize the layer output, [0, bound]: the Relu/Clip goes
                    layer_out, act_node, bound = folded[name]
                    lo, hi = ranges.pop(name)
                    graph.bypass(act_node)
                    ranges[layer_out] = (0.0, min(hi, bound))
            report.metrics["activations_folded"] = len(folded)
            for node, x_name in gemm_bias:
                if x_name in ranges:
                    _quantize_bias(graph, node, *ranges[x_name])
            for name, (lo, hi) in ranges.items():
                _insert_qdq(graph, name, lo, hi)
            report.metrics["activations_quantized"] = len(ranges)
            report.metrics["calibrator"] = config.calibrator
            quantized = graph.export()
            if calib is not None:
                feeds = {k: v[:1] for k, v in calib.batches[0].items()}
                res = bench.benchmark([model, quantized], bench.BenchConfig(runs=20, warmup=3),
                                      inputs=feeds)
                speedup = float(res.speedups[0].median)
                report.metrics["measured_speedup"] = round(speedup, 3)
                if speedup < 1.0:
                    report.notes.append(
                        f"static int8 measured {speedup:.2f}x (slower than float) on cpu: "
                        f"ONNX Runtime could not fuse enough of the QDQ pattern here")
            return PassResult(quantized, report)
        if config.mode == "kmeans":
            report.metrics["huffman_index_bytes"] = (huffman_bits + 7) // 8
        if not int4_names:
            return PassResult(graph.export(), report)
        out = _to_int4(graph.export(check=False), int4_names)
        check_model(out, full=True)
        return PassResult(out, report)


PASS = Quantize()


def _out_axis(node: Any) -> int:
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return int(OPS[node.op] or 0)


def _check(graph: Graph, node: Any, config: QuantizeConfig) -> Skip | None:
    def skip(reason: SkipReason, detail: str) -> Skip:
        return Skip(node.name, node.op, reason, detail)

    w = own_float_weight(graph, node, config.exclude)
    if isinstance(w, Skip):
        return w
    if w.size < config.min_params and config.mode != "static":  # static: speed, not size
        return skip(SkipReason.TOO_SMALL, f"{w.size} weights < --min-params {config.min_params}")
    if node.op in ("Gemm", "MatMul") and w.ndim != 2:
        return skip(SkipReason.UNSUPPORTED_ATTRIBUTE, f"{w.ndim}-D weight")
    return None


# ====================================================================== the math
def quantize_symmetric(w: np.ndarray, bits: int, axis: int | None
                       ) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric quantization: (int8 values, float scales, relative error)."""
    qmax = 2 ** (bits - 1) - 1
    wf = w.astype(np.float64)
    if axis is None:
        amax = np.array(np.max(np.abs(wf)))
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(wf), axis=others)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(wf / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    back = q.astype(np.float64) * scale.reshape(shape)
    err = float(np.linalg.norm(back - wf) / max(float(np.linalg.norm(wf)), 1e-30))
    return q, scale.astype(np.float32), err


def kmeans_quantize(w: np.ndarray, bits: int, iters: int
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """1-D k-means with 2^bits linearly initialized centroids: (codebook, uint8 idx, error)."""
    wf = w.astype(np.float64).reshape(-1)
    distinct = np.unique(wf)
    k = min(2 ** bits, distinct.size)
    # Already shared: the values are the codebook; else Deep Compression's linear init.
    centers = distinct if distinct.size <= k else np.linspace(wf.min(), wf.max(), k)
    idx = np.full(wf.size, -1, dtype=np.int64)
    for _ in range(iters if distinct.size > k else 0):
        new = np.searchsorted((centers[1:] + centers[:-1]) / 2, wf)
        counts = np.bincount(new, minlength=k)
        sums = np.bincount(new, weights=wf, minlength=k)
        centers = np.where(counts > 0, sums / np.maximum(counts, 1), centers)
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # re-seed empty centroids at the worst-represented weights
            worst = np.argsort(-np.abs(wf - centers[new]))[:empty.size]
            centers[empty] = wf[worst]
        centers = np.sort(centers)
        if np.array_equal(new, idx) and not empty.size:
            break
        idx = new
    idx = np.searchsorted((centers[1:] + centers[:-1]) / 2, wf)
    back = centers[idx]
    err = float(np.linalg.norm(back - wf) / max(float(np.linalg.norm(wf)), 1e-30))
    return centers.astype(np.float32), idx.astype(np.uint8).reshape(w.shape), err


def huffman_bits_of(symbols: np.ndarray) -> int:
    """Total bits of a Huffman code of ``symbols`` (code lengths from their frequencies)."""
    counts = Counter(symbols.reshape(-1).tolist())
    if len(counts) <= 1:
        return int(symbols.size)  # one bit per symbol at least
    heap = [(c, i, 0) for i, c in enumerate(counts.values())]
    heapq.heapify(heap)
    total = 0
    tie = len(heap)
    while len(heap) > 1:
        c1, _, _ = heapq.heappop(heap)
        c2, _, _ = heapq.heappop(heap)
        total += c1 + c2  # every merge adds one bit to each symbol below it
        heapq.heappush(heap, (c1 + c2, tie, 0))
        tie += 1
    return int(total)


def _quantize_bias(graph: Graph, gemm: Any, lo: float, hi: float) -> None:
    """Put a Gemm's bias behind DequantizeLinear as int32 (input scale x weight scale).

    That is the form ONNX Runtime expects of a QDQ Gemm it may fuse into QGemm.
    """
    b = graph.const_value(graph.input(gemm, 2))
    dq = graph.producer(graph.input(gemm, 1))
    if b is None or dq is None or dq.op != "DequantizeLinear" or b.ndim != 1:
        return
    w_scale = graph.const_value(dq.inputs[1])
    if w_scale is None or float(gemm.attrs.get("alpha", 1.0)) != 1.0 or float(
            gemm.attrs.get("beta", 1.0)) != 1.0:
        return
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    x_scale = (hi - lo) / 255.0 if hi > lo else 1.0
    scale = (x_scale * np.asarray(w_scale, dtype=np.float64)).astype(np.float32)
    scale = np.broadcast_to(scale, b.shape).copy()
    q = np.clip(np.rint(b / scale), -(2**31), 2**31 - 1).astype(np.int32)
    name = gemm.inputs[2].name
    q_const = graph.constant(f"{name}_q", q)
    s_const = graph.constant(f"{name}_scale", scale)
    out = graph.variable(f"{name}_dq", dtype=np.float32)
    graph.add_node("DequantizeLinear", [q_const, s_const], [out], pass_name="quantize",
                   origin=gemm.name, attrs={"axis": 0}, suffix="bias")
    gemm.inputs[2] = out


def _clamping_activation(graph: Graph, tensor: Any) -> tuple[Any, float] | None:
    """A Relu, or a Clip with lower bound 0, reading only ``tensor``: (node, upper bound).

    Quantizing the layer's output to uint8 with range ``[0, hi]`` (zero point 0) clamps
    exactly like that activation, so the activation can go and ONNX Runtime can fuse the
    layer into one integer kernel (what its own quantizer does too).
    """
    if len(tensor.outputs) != 1 or graph.is_graph_output(tensor):
        return None
    act = tensor.outputs[0]
    if act.op == "Relu":
        return act, float("inf")
    if act.op != "Clip":
        return None
    lo = graph.const_value(graph.input(act, 1)) if len(act.inputs) > 1 else act.attrs.get("min")
    hi = graph.const_value(graph.input(act, 2)) if len(act.inputs) > 2 else act.attrs.get("max")
    if lo is None or float(np.asarray(lo)) != 0.0:
        return None
    return act, float(np.asarray(hi)) if hi is not None else float("inf")


def activation_ranges(model: onnx.ModelProto, names: list[str], calib: Calibration | None,
                      config: QuantizeConfig) -> dict[str, tuple[float, float]]:
    """(low, high) of each float tensor on the calibration data, per the calibrator."""
    if calib is None:
        calib = calibrate.synthetic_calibration(model, num_samples=8)
    lows = {n: np.inf for n in names}
    highs = {n: -np.inf for n in names}
    pools: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rng = np.random.default_rng(config.seed)
    per_batch = max(1, PERCENTILE_VALUES // max(len(calib.batches), 1))
    for batch in calibrate.iter_capture(model, names, calib):
        for n, x in batch.items():
            if x.dtype.kind != "f":
                continue
            lows[n] = min(lows[n], float(x.min()))
            highs[n] = max(highs[n], float(x.max()))
            if config.calibrator == "percentile":
                flat = x.reshape(-1)
                if flat.size > per_batch:
                    flat = flat[rng.choice(flat.size, per_batch, replace=False)]
                pools[n].append(flat.astype(np.float32))
    out = {}
    for n in names:
        if not np.isfinite(lows[n]):
            continue
        lo, hi = lows[n], highs[n]
        if config.calibrator == "percentile" and pools[n]:
            values = np.concatenate(pools[n])
            lo = float(np.percentile(values, 100 - config.percentile))
            hi = float(np.percentile(values, config.percentile))
        out[n] = (lo, hi)
    return out


# ====================================================================== graph edits
def _insert_qdq(graph: Graph, name: str, lo: float, hi: float) -> None:
    """``t -> QuantizeLinear -> DequantizeLinear`` (uint8, asymmetric) for ``t``'s readers."""
    tensor = graph.gs.tensors().get(name)
    if tensor is None:
        return
    output = graph.is_graph_output(tensor)
    if not tensor.outputs and not output:
        return
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = int(np.clip(np.rint(-lo / scale), 0, 255))
    s = graph.constant(f"{name}_scale", np.array(scale, dtype=np.float32))
    z = graph.constant(f"{name}_zero", np.array(zero, dtype=np.uint8))
    q = graph.variable(f"{name}_q", dtype=np.uint8)
    dq = graph.variable(f"{name}_dq", dtype=np.float32)
    readers = list(tensor.outputs)
    src = tensor
    if output:  # the graph output keeps its name: the producer writes a new tensor
        prod = graph.producer(tensor)
        if prod is None:
            return
        src = graph.variable(f"{name}_float", dtype=np.float32)
        prod.outputs[[i for i, t in enumerate(prod.outputs) if t is tensor][0]] = src
        dq = tensor
    graph.add_node("QuantizeLinear", [src, s, z], [q], pass_name="quantize", origin=name,
                   suffix="q")
    graph.add_node("DequantizeLinear", [q, s, z], [dq], pass_name="quantize", origin=name,
                   suffix="dq")
    if output:
        return
    for reader in readers:
        for i, t in enumerate(reader.inputs):
            if t is tensor and reader.op != "QuantizeLinear":
                reader.inputs[i] = dq
def _insert_dq(graph: Graph, node: Any, q: np.ndarray, scale: np.ndarray, axis: int,
               dtype: np.dtype[Any], int4: bool, int4_names: set[str], dq_axis: bool,
               per_tensor: bool = False) -> None:
    """Feed ``node`` ``W = DequantizeLinear(q, scale, axis)``.

    Before opset 13 (no ``axis``): ``W = DequantizeLinear(q, 1) * scale``, the scales shaped
    to broadcast.
    """
    w_t = graph.input(node, 1)
    assert w_t is not None
    base = w_t.name
    q_const = graph.constant(f"{base}_q4" if int4 else f"{base}_q", q)
    if int4:
        int4_names.add(q_const.name)
    out = graph.variable(f"{base}_dq", dtype=np.float32)
    props = {"bits": 4 if int4 else 8}
    if per_tensor:
        scale_const = graph.constant(f"{base}_scale", np.array(scale[0], dtype=np.float32))
        graph.add_node("DequantizeLinear", [q_const, scale_const], [out], pass_name="quantize",
                       origin=node.name, props=props)
    elif dq_axis:
        scale_const = graph.constant(f"{base}_scale", scale.astype(np.float32))
        inputs = [q_const, scale_const]
        if not int4:  # explicit zero points: ONNX Runtime's QGemm fusion looks for them
            inputs.append(graph.constant(f"{base}_zero", np.zeros(scale.shape, np.int8)))
        graph.add_node("DequantizeLinear", inputs, [out], pass_name="quantize",
                       origin=node.name, attrs={"axis": axis}, props=props)
    else:
        one = graph.constant(f"{base}_unit", np.array(1.0, dtype=np.float32))
        raw = graph.variable(f"{base}_dq_int", dtype=np.float32)
        graph.add_node("DequantizeLinear", [q_const, one], [raw], pass_name="quantize",
                       origin=node.name, props=props)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale_const = graph.constant(f"{base}_scale", scale.astype(np.float32).reshape(shape))
        graph.add_node("Mul", [raw, scale_const], [out], pass_name="quantize",
                       origin=node.name, suffix="scale")
    if np.dtype(dtype) != np.float32:
        cast = graph.variable(f"{base}_dq_cast", dtype=dtype)
        to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph.add_node("Cast", [out], [cast], pass_name="quantize", origin=node.name,
                       attrs={"to": to}, suffix="cast")
        out = cast
    node.inputs[1] = out


def _insert_gather(graph: Graph, node: Any, codebook: np.ndarray, idx: np.ndarray,
                   dtype: np.dtype[Any]) -> None:
    w_t = graph.input(node, 1)
    assert w_t is not None
    base = w_t.name
    idx_const = graph.constant(f"{base}_idx", idx)
    book = graph.constant(f"{base}_codebook", codebook.astype(dtype))
    idx32 = graph.variable(f"{base}_idx32", dtype=np.int32)
    graph.add_node("Cast", [idx_const], [idx32], pass_name="quantize", origin=node.name,
                   attrs={"to": TensorProto.INT32}, suffix="idx")
    out = graph.variable(f"{base}_shared", dtype=dtype)
    graph.add_node("Gather", [book, idx32], [out], pass_name="quantize", origin=node.name,
                   attrs={"axis": 0}, props={"centroids": codebook.size})
    node.inputs[1] = out


def _to_int4(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Store the named int8 initializers (values in [-7, 7]) as packed INT4 tensors."""
    for i, init in enumerate(model.graph.initializer):
        if init.name in names:
            values = numpy_helper.to_array(init).reshape(-1).astype(np.int8)
            nibbles = (values & 0x0F).astype(np.uint8)
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(0))
            raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
            packed = helper.make_tensor(init.name, TensorProto.INT4, list(init.dims), raw,
                                        raw=True)
            model.graph.initializer[i].CopyFrom(packed)
    return model
