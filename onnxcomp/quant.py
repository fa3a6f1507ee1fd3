"""Quantization math and the graph edits that fold it into ONNX (the engine of ``quantize``).

Symmetric per-channel weights, asymmetric (uint8) or symmetric (int8) activations through
QuantizeLinear -> DequantizeLinear pairs, k-means weight sharing with a codebook and Gather,
binary weights, and activation ranges from calibration data (percentile, min-max, entropy).
Papers are cited in ``passes/quantize.py``.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import capture
from onnxcomp.calibration import Calibration
from onnxcomp.graph import Graph
from onnxcomp.ops import RANGE_KEEPING

# Values kept per tensor for percentiles (a seeded subsample bounds the memory).
PERCENTILE_VALUES = 1_000_000
INT4_OPSET = 21
# Entropy calibrator: histogram bins of |x| and the stride of the threshold search.
ENTROPY_BINS = 2048
ENTROPY_STRIDE = 16
OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": 1}  # output-channel axis


def share_ranges(graph: Graph, ranges: dict[str, tuple[float, float]]) -> int:
    """Give a tensor behind MaxPool / Reshape / Split / Resize / ... its source's range: how many.

    These ops only move, pick or interpolate values, so the source's uint8 grid holds their
    outputs too; with equal scale and zero point on both sides ONNX Runtime drops the
    DequantizeLinear / QuantizeLinear pair around them and runs them on uint8 (as its own
    quantizer arranges). In graph order, so a Transpose after a Split takes the grid the
    Split's parts took. Not a cubic Resize: it overshoots its input's range.
    """
    shared = 0
    for node in graph.nodes:
        if not _keeps_range(node):
            continue
        for out in node.outputs:
            if out.name not in ranges:
                continue
            t = node.inputs[0]
            while t.name not in ranges:
                prod = graph.producer(t)
                if prod is None or not _keeps_range(prod) or len(t.outputs) != 1:
                    break
                t = prod.inputs[0]
            if t.name in ranges and ranges[out.name] != ranges[t.name]:
                ranges[out.name] = ranges[t.name]
                shared += 1
    return shared


def _keeps_range(node: Any) -> bool:
    """``node``'s outputs stay within its data input's range."""
    if node.op == "Resize":
        mode = node.attrs.get("mode", "nearest")
        return (mode.decode() if isinstance(mode, bytes) else mode) != "cubic"
    return node.op in RANGE_KEEPING or node.op == "Split"


# Ops ONNX Runtime runs as integer kernels (QLinearSigmoid, QLinearMul, QLinearAdd,
# QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool) when each input comes through
# a DequantizeLinear and the output goes to a QuantizeLinear. Split, MaxPool and Resize pass
# values on within the source's range, so their outputs keep its grid (ONNX Runtime runs
# them on uint8).
ELEMENTWISE = ("Sigmoid", "Mul", "Add", "Concat", "GlobalAveragePool", "AveragePool")
PASS_ON = ("Split", "MaxPool", "Resize")


def elementwise_tensors(graph: Graph, quantized: set[str]) -> list[str]:
    """Tensors to quantize so the elementwise ops between int8 layers run on integers.

    In graph order, an op of ELEMENTWISE whose every input is in ``quantized`` or already
    taken (never a constant: a Mul by a weight stays float), or one of PASS_ON whose data
    input is, gets its outputs taken: a SiLU (Sigmoid and Mul) between two int8 convs, a
    residual Add of two of their outputs, the Split and Concat of a C2f block, the MaxPools
    of an SPPF, an upsampling Resize. A node that writes a graph output is never taken:
    boxes and scores keep their float resolution (one hop away they may be quantized, as
    the next op's input).
    """
    have = set(quantized)
    taken: list[str] = []
    for node in graph.nodes:
        if node.op not in ELEMENTWISE and node.op not in PASS_ON:
            continue
        data = node.inputs[:1] if node.op in PASS_ON else node.inputs
        if not data or any(t.name not in have for t in data):
            continue
        if any(graph.is_graph_output(t) for t in node.outputs):
            continue
        outs = [t for t in node.outputs if t.outputs]  # a MaxPool's unread indices: not data
        for t in outs:
            if t.name not in have:
                have.add(t.name)
                taken.append(t.name)
    return taken


def out_axis(node: Any) -> int:
    """The output-channel axis of a layer's weight (per-channel scales go along it)."""
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return int(OPS[node.op] or 0)


def quantize_symmetric(w: np.ndarray, bits: int, axis: int | None
                       ) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric quantization: (int8 values, float scales, relative error).

    Worked through in slices along the channel axis (the first axis when per-tensor), so a
    large weight never has more than a slice's float64 copies at once.
    """
    qmax = 2 ** (bits - 1) - 1
    along = 0 if axis is None else axis
    q = np.empty(w.shape, np.int8)
    if w.size == 0:
        return q, np.ones(() if axis is None else w.shape[along], np.float32), 0.0
    step = max(1, _SLICE_VALUES // max(w.size // max(w.shape[along], 1), 1))
    cuts = [slice(i, i + step) for i in range(0, w.shape[along], step)]

    def part(cut: slice) -> tuple[slice, ...]:
        return tuple(cut if i == along else slice(None) for i in range(w.ndim))

    if axis is None:
        amax = np.array(max(float(np.max(np.abs(w[part(c)].astype(np.float64))))
                            for c in cuts))
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.concatenate([np.max(np.abs(w[part(c)].astype(np.float64)), axis=others)
                               for c in cuts])
    scale = np.where(amax > 0, amax / qmax, 1.0)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    residual = total = 0.0
    for c in cuts:
        wf = w[part(c)].astype(np.float64)
        s = scale.reshape(shape) if axis is None else scale[c].reshape(shape)
        qc = np.clip(np.rint(wf / s), -qmax, qmax).astype(np.int8)
        q[part(c)] = qc
        residual += float(np.sum((qc.astype(np.float64) * s - wf) ** 2))
        total += float(np.sum(wf * wf))
    err = float(np.sqrt(residual) / max(float(np.sqrt(total)), 1e-30))
    return q, scale.astype(np.float32), err


# quantize_symmetric works on slices of about this many values (float64: 8 bytes each).
_SLICE_VALUES = 1 << 23


def binarize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, float]:
    """BWN: sign(W) * mean|W| per output channel: (int8 signs, float scales, relative error).

    mean|W| is the scale that minimises ||W - a * sign(W)|| (Rastegari et al. 2016).
    """
    wf = w.astype(np.float64)
    others = tuple(i for i in range(w.ndim) if i != axis)
    alpha = np.mean(np.abs(wf), axis=others)
    scale = np.where(alpha > 0, alpha, 1.0)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.where(wf >= 0, 1, -1).astype(np.int8)
    back = q * scale.reshape(shape)
    err = float(np.linalg.norm(back - wf) / max(float(np.linalg.norm(wf)), 1e-30))
    return q, scale.astype(np.float32), err


# --calibrator mse: candidate clipping points, as shares of the largest |value| and as quantiles,
# and how many sampled values each candidate grid is scored on.
MSE_SHARES = (1.0, 0.8, 0.64, 0.5, 0.4, 0.32, 0.25, 0.2, 0.16, 0.125, 0.1)
MSE_QUANTILES = (0.999, 0.9999, 0.99999)
MSE_VALUES = 200_000


def mse_range(values: np.ndarray, signed: bool = False, weights: np.ndarray | None = None
              ) -> tuple[float, float]:
    """The clipping range whose int8 grid rounds ``values`` with the least weighted error.

    Clipping the tail is weighed against resolving the bulk. ``weights`` (one per value) make
    the error each sample's own relative error: a few samples whose activations run ten times
    larger than the rest (a blank or overexposed photo) then cannot set the grid that every
    other sample is rounded on. Searched one side at a time (the high end with the low end
    at its extreme, then the low end); for int8 (symmetric) only the magnitude.
    """
    flat = values.reshape(-1)
    step = max(1, -(-flat.size // MSE_VALUES))
    sample = flat[::step].astype(np.float64)
    wts = (np.ones_like(sample) if weights is None
           else weights.reshape(-1)[::step].astype(np.float64))
    qmin, qmax = (-127, 127) if signed else (0, 255)

    def candidates(side: np.ndarray) -> list[float]:
        top = float(side.max(initial=0.0))
        found = {top * f for f in MSE_SHARES}
        found |= {float(np.quantile(side, q)) for q in MSE_QUANTILES} if side.size else set()
        return sorted(v for v in found if v > 0) or [0.0]

    def error(lo: float, hi: float) -> float:
        scale, zero = activation_qparams(lo, hi, signed)
        back = (np.clip(np.rint(sample / scale) + zero, qmin, qmax) - zero) * scale
        return float(np.sum(wts * (back - sample) ** 2))

    if signed:
        mags = candidates(np.abs(sample))
        best = min(mags, key=lambda a: error(-a, a))
        return -best, best
    lo = min(float(sample.min(initial=0.0)), 0.0)
    hi = min(candidates(sample[sample > 0]), key=lambda h: error(lo, h))
    if lo < 0:
        lo = -min(candidates(-sample[sample < 0]), key=lambda a: error(-a, hi))
    return lo, hi


def entropy_range(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The range whose 8-bit quantization loses least information (KL divergence).

    TensorRT's calibration idea (Migacz 2017): histogram |x| into ``ENTROPY_BINS`` bins; for
    every candidate threshold, fold the clipped tail into the last kept bin (P), merge the
    kept bins into as many levels as the uint8 grid gives that side (Q, spread back over the
    non-empty bins) and keep the threshold with the smallest KL(P || Q). Exact zeros are left
    out: every grid holds 0 exactly, and a Relu's spike of zeros would otherwise dominate P
    and pull the threshold far into the bulk.
    """
    levels = 256 if lo >= 0 else 128  # one-sided tensors (after Relu) get the whole grid
    a = np.abs(values[values != 0].astype(np.float64))
    amax = float(a.max()) if a.size else 0.0
    if amax <= 0:
        return lo, hi
    hist = np.histogram(a, bins=ENTROPY_BINS, range=(0.0, amax))[0].astype(np.float64)
    best, best_i = np.inf, ENTROPY_BINS
    for i in range(levels, ENTROPY_BINS + 1, ENTROPY_STRIDE):
        kept = hist[:i]
        p = kept.copy()
        p[-1] += hist[i:].sum()
        level = (np.arange(i) * levels) // i
        nonzero = kept > 0
        sums = np.bincount(level, weights=kept, minlength=levels)
        counts = np.bincount(level, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[level] / np.maximum(counts[level], 1), 0.0)
        p /= p.sum()
        q /= max(q.sum(), 1e-300)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    t = amax * best_i / ENTROPY_BINS
    return max(lo, -t), min(hi, t)


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


def activation_qparams(lo: float, hi: float, signed: bool) -> tuple[float, int]:
    """(scale, zero point) of an activation range: uint8 asymmetric or int8 symmetric."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if signed:
        amax = max(-lo, hi)
        return (amax / 127.0 if amax > 0 else 1.0), 0
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return scale, int(np.clip(np.rint(-lo / scale), 0, 255))


def quantize_bias(graph: Graph, gemm: Any, lo: float, hi: float, signed: bool) -> None:
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
    x_scale, _ = activation_qparams(lo, hi, signed)
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


def clamping_activation(graph: Graph, tensor: Any) -> tuple[Any, float] | None:
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
    bounds = [graph.input(act, i) for i in (1, 2)]
    if any(t is not None and graph.const_value(t) is None for t in bounds):
        return None  # a bound computed at run time
    lo = graph.const_value(bounds[0]) if len(act.inputs) > 1 else act.attrs.get("min")
    hi = graph.const_value(bounds[1]) if len(act.inputs) > 2 else act.attrs.get("max")
    if lo is None or float(np.asarray(lo)) != 0.0:
        return None
    return act, float(np.asarray(hi)) if hi is not None else float("inf")


def activation_ranges(model: onnx.ModelProto, names: list[str], calib: Calibration,
                      calibrator: str = "percentile", percentile: float = 99.99, seed: int = 0,
                      signed: bool = False) -> dict[str, tuple[float, float]]:
    """(low, high) of each float tensor on the calibration data, per the calibrator."""
    lows = {n: np.inf for n in names}
    highs = {n: -np.inf for n in names}
    pools: dict[str, list[np.ndarray]] = {n: [] for n in names}
    weights: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rng = np.random.default_rng(seed)
    per_batch = max(1, PERCENTILE_VALUES // max(len(calib.batches), 1))
    for batch in capture.iter_capture(model, names, calib):
        for n, x in batch.items():
            if x.dtype.kind != "f":
                continue
            lows[n] = min(lows[n], float(x.min()))
            highs[n] = max(highs[n], float(x.max()))
            if calibrator in ("percentile", "entropy"):
                flat = x.reshape(-1)
                if flat.size > per_batch:
                    flat = flat[rng.choice(flat.size, per_batch, replace=False)]
                pools[n].append(flat.astype(np.float32))
            elif calibrator == "mse":  # per sample, each weighed by its own energy
                per_sample = max(1, per_batch // max(x.shape[0], 1))
                for one in x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1):
                    energy = float(np.mean(np.square(one, dtype=np.float64)))
                    if one.size > per_sample:
                        one = one[rng.choice(one.size, per_sample, replace=False)]
                    pools[n].append(one.astype(np.float32))
                    weights[n].append(np.full(one.size, 1.0 / max(energy, 1e-30) / one.size,
                                              np.float32))
    out = {}
    for n in names:
        if not np.isfinite(lows[n]):
            continue
        lo, hi = lows[n], highs[n]
        if calibrator == "percentile" and pools[n]:
            values = np.concatenate(pools[n])
            lo = float(np.percentile(values, 100 - percentile))
            hi = float(np.percentile(values, percentile))
        elif calibrator == "entropy" and pools[n]:
            lo, hi = entropy_range(np.concatenate(pools[n]), lo, hi)
        elif calibrator == "mse" and pools[n]:
            lo, hi = mse_range(np.concatenate(pools[n]), signed, np.concatenate(weights[n]))
        out[n] = (lo, hi)
    return out


def insert_qdq(graph: Graph, name: str, lo: float, hi: float, signed: bool = False) -> None:
    """``t -> QuantizeLinear -> DequantizeLinear`` (uint8 asymmetric / int8 symmetric)."""
    tensor = graph.gs.tensors().get(name)
    if tensor is None:
        return
    output = graph.is_graph_output(tensor)
    if not tensor.outputs and not output:
        return
    scale, zero = activation_qparams(lo, hi, signed)
    qtype = np.int8 if signed else np.uint8
    s = graph.constant(f"{name}_scale", np.array(scale, dtype=np.float32))
    z = graph.constant(f"{name}_zero", np.array(zero, dtype=qtype))
    q = graph.variable(f"{name}_q", dtype=qtype)
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


def insert_dq(graph: Graph, node: Any, q: np.ndarray, scale: np.ndarray, axis: int,
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


def insert_gather(graph: Graph, node: Any, codebook: np.ndarray, idx: np.ndarray,
                  dtype: np.dtype[Any]) -> None:
    """Feed ``node`` ``W = Gather(codebook, Cast(idx))`` (k-means weight sharing)."""
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


def to_int4(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
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


def keep_float(graph: Graph) -> list[str]:
    """Keep float the Conv / ConvTranspose / Gemm layers left in float between QDQ pairs.

    ONNX Runtime (1.20 on, its WeightBiasQuantization transformer) quantizes a layer with a
    float weight whose input comes through a DequantizeLinear with one scale and whose output
    goes, unbranched, to a QuantizeLinear: per tensor, symmetric, whatever the channels'
    ranges. Measured here: MobileNetV2 with its first depthwise conv "in float" (weights up to
    15 after BN folding, so per-tensor int8) had twice the output error of the model with it
    int8 per channel (0.18 against 0.09), so layers kept in float for fidelity lost it.

    Each such layer gets a DequantizeLinear of its own with the same scale repeated along the
    channel axis (per-axis, equal values: the same numbers), which that transformer does not
    take, so the layer runs in float as meant. Returns the layers.
    """
    kept: list[str] = []
    for node in list(graph.nodes):
        channels = _float_layer_channels(graph, node)
        if channels is None:
            continue
        dq = graph.producer(node.inputs[0])
        if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 3:
            continue
        scale, zero = graph.const_value(dq.inputs[1]), graph.const_value(dq.inputs[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            continue
        x = node.inputs[0]
        along = [graph.constant(f"{x.name}_{what}_per_channel",
                                np.full(channels, v.reshape(()), dtype=v.dtype))
                 for what, v in (("scale", scale), ("zero", zero))]
        out = graph.variable(f"{x.name}_float_dq", dtype=np.float32, shape=x.shape)
        graph.add_node("DequantizeLinear", [dq.inputs[0], *along], [out], pass_name="quantize",
                       origin=node.name, suffix="float_input", attrs={"axis": 1})
        node.inputs[0] = out
        kept.append(node.name)
    return kept


def _float_layer_channels(graph: Graph, node: Any) -> int | None:
    """The input channels of a Conv / ConvTranspose / Gemm whose weight is a float constant."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 2:
        return None
    weight = graph.const_value(node.inputs[1])
    if weight is None or weight.dtype != np.float32 or weight.ndim < 2:
        return None
    if node.op == "Conv":
        return int(weight.shape[1] * node.attrs.get("group", 1))
    if node.op == "ConvTranspose":
        return int(weight.shape[0])
    if node.attrs.get("transA", 0):
        return None  # axis 1 of A is its rows
    return int(weight.shape[1] if node.attrs.get("transB", 0) else weight.shape[0])
