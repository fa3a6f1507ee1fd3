"""Rounding of int8 conv weights that minimizes the layer's output error, not its weight error.

Nearest rounding makes each weight as close as it can be, but what a layer computes is
``W x``: errors of weights that read correlated inputs add up or cancel. AdaRound (Nagel et al.
2020, "Up or Down? Adaptive Rounding for Post-Training Quantization", arXiv:2004.10568) picks,
per weight, the grid point below or above ``W / s`` that minimizes the layer's output error
on calibration data. In the layer-wise form used here the objective is a quadratic in the
integer weights, from second moments alone:

    per output channel o:  E|| s_o q_o . x^ + b_o - y_o ||^2
        = (s_o q_o)^T A (s_o q_o) - 2 (s_o q_o)^T (c_o - A_xb b_o) + const
    A = E[x^ x^T]     x^: the layer's input in the quantized network (as far as it is rounded)
    c = E[x^ y^T]     y : the float layer's output on the same sample (the asymmetric target)

solved by greedy coordinate descent: each weight may move to the other of its two grid
neighbours when that lowers the quadratic (the change of one coordinate is exact and costs a
row update of the gradient), a few sweeps over the weights. The paper relaxes the choice to a
continuous variable and anneals it with gradient steps; the quadratic here needs no training
loop and never does worse than nearest rounding on the data it is given.

Each sample's error counts relative to its own size: its rows are weighted by the inverse RMS
of its float output at that layer. Unweighted, the few loud samples (on MobileNetV2 one photo
in 64 has late activations ten times the others') own the second moments, and the rounding
suits them, not the typical input. Measured (64 calibration samples, every layer int8, held
out): MobileNetV2 top-1 agreement 81.6 % -> 83.6 % on 512 crops (rel. L2 error 0.124 ->
0.122), EfficientNet-Lite0 96.1 % -> 96.9 %, PP-OCRv4 rec rel. error 0.100 -> 0.094 with the
same strings, Fashion-MNIST unchanged.

Layers are rounded one after the other in graph order, each on the inputs the already-rounded
layers before it produce (onnxcomp/stream.py). Convs with group 1 and depthwise convs are
rounded (a depthwise channel is a 9-weight problem of its own); FC layers, which see one row
per sample, and layers with fewer than ROWS_PER_WEIGHT sampled rows per weight of a channel,
are left at nearest rounding, so the quadratic describes data and not the few samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import capture, fidelity
from onnxcomp.calibration import Calibration
from onnxcomp.graph import Graph
from onnxcomp.judge import Judge
from onnxcomp.linear import ConvGeometry, Layer, conv_geometry, static_shapes
from onnxcomp.model import copy_model
from onnxcomp.moments import Sampler, im2col_rows, output_rows
from onnxcomp.passbase import Report
from onnxcomp.stream import LayerStream

ROWS_PER_WEIGHT = 10  # sampled input rows per weight of one output channel (fewer over-fit)
MAX_ROWS = 12_000  # sampled rows per layer
SWEEPS = 3
# Fewer calibration samples than this: no rounding. On PP-OCRv4 det's 16 crops it passed the
# check on half the samples and still lost 15 points of held-out IoU (bias correction has the
# same floor for the same reason).
MIN_SAMPLES = 32


@dataclasses.dataclass
class _Conv:
    """One int8 conv of the quantized model and what rounding it needs."""

    name: str
    layer: Layer  # float geometry and weight (from the float model)
    groups: int  # 1, or the channel count of a depthwise conv
    q_name: str  # the int8 weight initializer in the quantized model
    scale: np.ndarray  # [O]
    qmax: int
    q_input: str  # the conv's input tensor in the quantized model


def _convs(original: onnx.ModelProto, quantized: onnx.ModelProto, names: Sequence[str],
           calib: Calibration) -> tuple[list[_Conv], dict[str, str]]:
    """The roundable convs among ``names`` (graph order) and why the others are not."""
    skipped: dict[str, str] = {}
    inits = {t.name: t for t in quantized.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    qnodes = {n.name: n for n in quantized.graph.node}
    graph = Graph(original)
    shapes = static_shapes(original, calib)
    wanted = set(names)
    found: list[_Conv] = []
    for node in graph.nodes:
        if node.name not in wanted:
            continue
        qnode = qnodes.get(node.name)
        if node.op != "Conv" or qnode is None:
            skipped[node.name] = f"{node.op}: FC layers see one row per sample"
            continue
        dq = producer.get(qnode.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
            skipped[node.name] = "its weight is not one per-channel DequantizeLinear"
            continue
        q_init, s_init = inits.get(dq.input[0]), inits.get(dq.input[1])
        if q_init is None or s_init is None or q_init.data_type != onnx.TensorProto.INT8:
            skipped[node.name] = "its int8 weight is not an initializer"
            continue
        w = graph.const_value(graph.input(node, 1))
        b_t = graph.input(node, 2)
        b = graph.const_value(b_t) if b_t is not None else None
        x_name, y_name = node.inputs[0].name, node.outputs[0].name
        if w is None or w.ndim != 4 or x_name not in shapes or y_name not in shapes:
            skipped[node.name] = "not a 2-D conv with static shapes"
            continue
        group = int(node.attrs.get("group", 1))
        if group != 1 and not (group == w.shape[0] and w.shape[1] == 1):
            skipped[node.name] = f"grouped conv (group={group})"
            continue
        scale = numpy_helper.to_array(s_init).astype(np.float64).reshape(-1)
        if scale.size == 1:
            scale = np.full(w.shape[0], float(scale[0]))
        geom: ConvGeometry = conv_geometry(node, shapes[x_name][2:], w.shape[2:])
        layer = Layer(node, "Conv", w, b, geom, shapes[x_name][1:], shapes[y_name][1:], w.dtype)
        qmax = int(np.abs(numpy_helper.to_array(q_init)).max(initial=1))
        qmax = 127 if qmax > 63 else 63  # the grid the weights were put on (7 bits: reduce_range)
        found.append(_Conv(node.name, layer, group, dq.input[0], scale, qmax, qnode.input[0]))
    return found, skipped


def round_layers(original: onnx.ModelProto, quantized: onnx.ModelProto, calib: Calibration,
                 names: Sequence[str], seed: int = 0, sweeps: int = SWEEPS,
                 found: tuple[list[_Conv], dict[str, str]] | None = None
                 ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``quantized`` with the int8 weights of the convs ``names`` re-rounded.

    Returns the model and, per layer, the output error (relative RMS on the sampled rows)
    with nearest rounding and after, the share of weights moved, or why it was left.
    ``found``: what :func:`_convs` gave for these models, when the caller has it already.
    """
    convs, skipped = found or _convs(original, quantized, names, calib)
    stats: dict[str, Any] = {n: {"left": why} for n, why in skipped.items()}
    if not convs:
        return copy_model(quantized), stats
    samplers, targets = _targets(original, convs, calib, seed)
    model = copy_model(quantized)
    inits = {t.name: t for t in model.graph.initializer}
    with LayerStream(calib) as stream:
        for conv, sampler, target in zip(convs, samplers, targets, strict=True):
            rows = sampler.count * calib.num_samples
            width = conv.layer.weight[0].size
            if rows < ROWS_PER_WEIGHT * width:
                stats[conv.name] = {"left": f"{rows} sampled rows for {width} weights per "
                                            f"channel (needs {ROWS_PER_WEIGHT} per weight)"}
                continue
            a, c, yy, rows = _moments(stream, model, conv, sampler, target)
            tensor = inits[conv.q_name]
            q = numpy_helper.to_array(tensor).astype(np.int64)
            new_q, before, after, moved = _round(conv, q, a, c, sweeps)
            total = float(np.sum(yy))
            before, after = (float(np.sqrt(max(e + total, 0.0) / total)) if total > 0 else 0.0
                             for e in (before, after))
            tensor.CopyFrom(numpy_helper.from_array(new_q.astype(np.int8), tensor.name))
            stats[conv.name] = {"error_nearest": round(before, 6), "error": round(after, 6),
                                "moved": round(moved, 4)}
    return model, stats


def _targets(original: onnx.ModelProto, convs: list[_Conv], calib: Calibration, seed: int
             ) -> tuple[list[Sampler], list[list[np.ndarray]]]:
    """Per conv, the sampler of output positions and the float outputs there (per sample)."""
    samplers = []
    for i, conv in enumerate(convs):
        per_sample = -(-MAX_ROWS // max(calib.num_samples, 1))
        samplers.append(Sampler(i, conv.layer, per_sample, seed))
    targets: list[list[np.ndarray]] = [[] for _ in convs]
    names = list(dict.fromkeys(c.layer.node.outputs[0].name for c in convs))
    sample = 0
    for batch in capture.iter_capture(original, names, calib):
        n = next(iter(batch.values())).shape[0]
        for i, conv in enumerate(convs):
            y = batch[conv.layer.node.outputs[0].name]
            for s in range(n):
                pos = samplers[i].positions(sample + s)
                targets[i].append(output_rows(y[s], conv.layer, pos).astype(np.float32))
        sample += n
    return samplers, targets


def _moments(stream: LayerStream, model: onnx.ModelProto, conv: _Conv, sampler: Sampler,
             target: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``A = E[x x^T]``, ``C = E[x (y - b)^T]``, ``E[(y - b)^2]`` per channel, and the rows.

    ``x``: the conv's input rows in the quantized network. Group 1: A [D, D], C [D, O].
    Depthwise: per channel, A [O, k, k], C [O, k]. Each sample's rows count relative to the
    size of that sample's float output at this layer (see the module docstring).
    """
    layer = conv.layer
    o = layer.weight.shape[0]
    k = layer.weight[0].size
    bias = layer.bias_vector
    depthwise = conv.groups > 1
    a = np.zeros((o, k, k) if depthwise else (k, k))
    c = np.zeros((o, k) if depthwise else (k, o))
    yy = np.zeros(o)
    rows = 0
    sample = 0
    for x in stream.batches(model, conv.q_input):
        count = x.shape[0]
        xr = np.vstack([im2col_rows(x[s], layer, sampler.positions(sample + s))
                        for s in range(count)])  # [P, C*k] (c, a, b order)
        yr = np.vstack(target[sample:sample + count]).astype(np.float64) - bias[None, :]
        # each sample's rows weighted by the inverse RMS of its own float output here
        weight = np.concatenate([np.full(len(t), 1.0 / _rms(t))
                                 for t in target[sample:sample + count]])
        xr, yr = xr * weight[:, None], yr * weight[:, None]
        if depthwise:  # per channel: its k taps against themselves and its output
            per = np.ascontiguousarray(xr.reshape(len(xr), o, k).transpose(1, 2, 0),
                                       dtype=np.float32)  # [O, k, P]
            a += per @ per.transpose(0, 2, 1)
            c += (per @ np.ascontiguousarray(yr.T, dtype=np.float32)[:, :, None])[:, :, 0]
        else:  # float32 products (half the time), summed in float64
            x32 = xr.astype(np.float32)
            a += x32.T @ x32
            c += x32.T @ yr.astype(np.float32)
        yy += np.sum(yr * yr, axis=0)
        rows += len(xr)
        sample += count
    n = max(rows, 1)
    return a / n, c / n, yy / n, rows


def _rms(rows: np.ndarray) -> float:
    """Root mean square of one sample's output rows (1 when they are all zero)."""
    value = float(np.sqrt(np.mean(np.square(rows, dtype=np.float64))))
    return value if value > 0 else 1.0


def _round(conv: _Conv, q: np.ndarray, a: np.ndarray, c: np.ndarray, sweeps: int
           ) -> tuple[np.ndarray, float, float, float]:
    """Greedy coordinate descent over up/down per weight: (q, error before, after, moved)."""
    o = q.shape[0]
    w = conv.layer.weight.reshape(o, -1).astype(np.float64)
    s = conv.scale[:, None]
    ideal = w / s
    lo = np.clip(np.floor(ideal), -conv.qmax, conv.qmax)
    hi = np.clip(np.ceil(ideal), -conv.qmax, conv.qmax)
    start = q.reshape(o, -1).copy()
    cur = start.astype(np.float64)
    depthwise = a.ndim == 3
    # cost_o(v) = v^T A v - 2 v^T c_o (+ E||y_o - b_o||^2), v = s_o q_o; gradient 2 (A v - c_o)
    if depthwise:
        grad = np.einsum("oij,oj->oi", a, cur * s) - c  # [O, k]
        diag = np.diagonal(a, axis1=1, axis2=2)  # [O, k]
    else:
        grad = (cur * s) @ a - c.T  # [O, D]
        diag = np.broadcast_to(np.diagonal(a), cur.shape)
    before = _cost(a, c, cur * s, depthwise)
    for _ in range(sweeps):
        changed = 0
        for j in range(cur.shape[1]):
            other = np.where(cur[:, j] == lo[:, j], hi[:, j], lo[:, j])
            step = (other - cur[:, j]) * s[:, 0]  # the change of v_oj
            gain = 2 * step * grad[:, j] + step * step * diag[:, j]
            take = (gain < -1e-15) & (step != 0)
            if not take.any():
                continue
            changed += int(take.sum())
            cur[take, j] = other[take]
            delta = np.where(take, step, 0.0)
            if depthwise:
                grad += delta[:, None] * a[:, :, j]
            else:
                grad += delta[:, None] * a[j][None, :]
        if not changed:
            break
    after = _cost(a, c, cur * s, depthwise)
    moved = float(np.mean(cur != start))
    return cur.reshape(q.shape), before, after, moved


def _cost(a: np.ndarray, c: np.ndarray, v: np.ndarray, depthwise: bool) -> float:
    """``sum_o v_o^T A v_o - 2 v_o^T c_o`` (the output error up to a constant)."""
    if depthwise:
        return float(np.einsum("oi,oij,oj->", v, a, v) - 2 * np.sum(v * c))
    return float(np.sum((v @ a) * v) - 2 * np.sum(v * c.T))


def apply(model: onnx.ModelProto, quantized: onnx.ModelProto, report: Report,
          calib: Calibration, judge: Judge, seed: int = 0) -> onnx.ModelProto:
    """Re-round the int8 convs of ``quantized`` (:func:`round_layers`) when that generalizes.

    A choice of up or down per weight can fit a few samples' quirks, so it needs MIN_SAMPLES
    samples, and is judged on samples it was not fitted on: fitted on one half, judged on the
    other, both ways round (every sample is judged once, unseen). Only when that helps is it
    fitted on every sample, and kept when the loss on the calibration data does not grow.
    The report says what it did.

    Judged one way round only (half the samples), the check was a coin toss on MobileNetV2:
    4 against 5 of 32 decisions changed dropped a rounding that took its held-out agreement
    from 80.5 % to 83.6 % on 512 crops (rel. L2 error 0.132 -> 0.122).
    """
    layers = [ch.node for ch in report.applied if ch.op_type == "Conv"]
    if not layers:
        return quantized
    halves = _halves(calib)
    if halves is None or calib.num_samples < MIN_SAMPLES:
        report.note("rounding_skipped",
                    f"no output-error rounding: {calib.num_samples} calibration samples, fewer "
                    f"than the {MIN_SAMPLES} it needs not to fit their quirks")
        return quantized
    first, second = halves
    found = _convs(model, quantized, layers, calib)  # once: the halves share the layers
    reference = fidelity.Reference.of(model, calib, judge)
    nearest = reference.compare(quantized)  # once: the check and the final choice share it
    near, fitted = _unseen(model, quantized, reference, nearest, first, second, layers, seed,
                           found)
    carried = _better(fitted, near, strict=True)
    check = {"unseen_loss_nearest": round(fidelity.bound(near)[0], 6),
             "unseen_loss": round(fidelity.bound(fitted)[0], 6),
             "unseen_rel_l2_nearest": round(near.rel_l2, 6),
             "unseen_rel_l2": round(fitted.rel_l2, 6)}
    if not carried:
        report.metrics["rounding"] = {"layers": 0, "kept": False, **check}
        report.note("rounding_dropped",
                    f"output-error rounding not kept: fitted on each half of the calibration "
                    f"samples it did not help the other (rel. L2 error {near.rel_l2:.4g} -> "
                    f"{fitted.rel_l2:.4g})")
        return quantized
    rounded, stats = round_layers(model, quantized, calib, layers, seed, found=found)
    done = {n: s for n, s in stats.items() if "error" in s}
    fid_before, fid_after = nearest, reference.compare(rounded)
    (before, measure), (after, _) = fidelity.bound(fid_before), fidelity.bound(fid_after)
    rel_before, rel_after = fid_before.rel_l2, fid_after.rel_l2
    kept = bool(done) and _better(fid_after, fid_before, strict=False)
    report.metrics["rounding"] = {
        "layers": len(done), "kept": kept, "measure": measure,
        "loss_before": round(before, 6), "loss_after": round(after, 6),
        "rel_l2_before": round(rel_before, 6), "rel_l2_after": round(rel_after, 6),
        **check, "per_layer": stats}
    report.note("rounded" if kept else "rounding_dropped",
                f"output-error rounding (AdaRound, layer-wise) of {len(done)} int8 convs: "
                f"{measure} loss {before:.4g} -> {after:.4g}, rel. L2 error {rel_before:.4g} "
                f"-> {rel_after:.4g} (on the unseen half when fitted on the other: "
                f"{near.rel_l2:.4g} -> {fitted.rel_l2:.4g})"
                + ("" if kept else " (not kept: it did not help here)"))
    return rounded if kept else quantized


def _unseen(model: onnx.ModelProto, quantized: onnx.ModelProto, reference: fidelity.Reference,
            nearest: Any, first: Calibration, second: Calibration, layers: Sequence[str],
            seed: int, found: tuple[list[_Conv], dict[str, str]]
            ) -> tuple[Any, Any]:
    """The fidelity of nearest rounding and of rounding judged on samples it was not fitted on.

    ``nearest``: ``reference.compare(quantized)``, measured once by the caller.

    Fitted on each half and run on the other; the two unseen halves make up the calibration
    samples in order, so every sample is judged once. Outputs that are not batch-first
    cannot be put together: then the rounding fitted on the first half is judged on the
    second alone.
    """
    on_first, _ = round_layers(model, quantized, first, layers, seed, found=found)
    if not all(o.ndim and o.shape[0] == reference.calib.num_samples
               for o in reference.outputs):
        judge = reference.judge
        if judge.labels is not None:
            judge = dataclasses.replace(judge, labels=judge.labels[first.num_samples:])
        half = fidelity.Reference.of(model, second, judge)
        return half.compare(quantized), half.compare(on_first)
    on_second, _ = round_layers(model, quantized, second, layers, seed, found=found)
    cross = [np.concatenate([a, b]) for a, b in zip(
        fidelity.run(on_second, first), fidelity.run(on_first, second), strict=True)]
    return nearest, reference.compare_outputs(cross)


def _better(new: Any, old: Any, strict: bool) -> bool:
    """Whether fidelity ``new`` beats (or, not ``strict``, matches) ``old``.

    By the loss that bounds the model (fidelity.bound) first, then by the relative output
    error. A changed-decision count is coarse, but it is what the user's bound reads:
    treating a difference of a few samples as a tie, settled by the relative error, dropped
    rounding on PP-OCRv4 rec where fewer crops changed and the error of a few near-tied
    crops rose.
    """
    a, b = fidelity.bound(new)[0], fidelity.bound(old)[0]
    if a != b:
        return a < b
    return new.rel_l2 < old.rel_l2 if strict else new.rel_l2 <= old.rel_l2


def _halves(calib: Calibration) -> tuple[Calibration, Calibration] | None:
    """The samples in two contiguous halves (cut between batches when there are several)."""
    if calib.num_samples < 2:
        return None
    if calib.num_batches >= 2:
        cut = calib.num_batches // 2
        parts = (calib.batches[:cut], calib.batches[cut:])
    else:
        half = calib.num_samples // 2
        only = calib.batches[0]
        parts = ([{k: v[:half] for k, v in only.items()}],
                 [{k: v[half:] for k, v in only.items()}])
    first, second = (Calibration(list(b), calib.synthetic, f"{calib.source} ({which} half)")
                     for b, which in zip(parts, ("first", "second"), strict=True))
    return first, second
