"""Quantization folded into the graph: static int8 QDQ, int8 / int4 weights, k-means, binary.

Papers: S. Han, H. Mao, W. Dally, "Deep Compression", ICLR 2016, arXiv:1510.00149 (k-means
weight sharing, Huffman coding of the indices); B. Jacob et al., "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (symmetric
per-channel int8 weights, asymmetric uint8 activations); S. Migacz, "8-bit Inference with
TensorRT", GTC 2017 (entropy calibration); M. Rastegari et al., "XNOR-Net", ECCV 2016 (BWN).

``--mode static`` (the default): int8 per-channel weights and uint8 activations (asymmetric,
per tensor) through QuantizeLinear -> DequantizeLinear pairs on every quantized layer's input
and output (after its Relu/Clip, which the uint8 range [0, c] then replaces). Ranges come from
the calibration data: ``--calibrator percentile`` (99.99, default), ``minmax`` or ``entropy``
(KL-optimal clipping). ONNX Runtime fuses the pattern into integer kernels (QLinearConv,
QGemm). ``--max-drop X`` measures every layer's sensitivity (output error with it alone
quantized) and leaves the most sensitive in float until the fidelity drop on the calibration
data (1 - the share of samples whose decisions are all kept, see ``fidelity_drop``; relative
output error for a model with no decision output) is at most X. Before
opset 13 weights are per tensor (the only form that stays fusable there), which costs
fidelity.

Before / after (``--mode weight``)::

    Conv(x, W float32)  =>  Conv(x, DequantizeLinear(Wq int8|int4, scale[O], axis=0))
        Wq = clip(round(W / scale), -qmax, qmax), scale_o = max|W_o| / qmax, qmax = 2^(b-1)-1

``--mode kmeans``::

    Conv(x, W float32)  =>  Conv(x, Gather(codebook[2^b] float32, Cast(idx uint8 -> int32)))
        2^b centroids per layer (linear initialization, Lloyd iterations on the weights)

``--mode binary`` (experimental, BWN): ``W => DequantizeLinear(sign(W) int8, mean|W_o|)``.

Weight-only modes shrink the file ~4x (int8, kmeans, binary) or ~8x (int4); plain ONNX
Runtime folds the constant dequantization at load, so latency is unchanged: they are about
size. Int4 initializers need opset >= 21 (DequantizeLinear on int4); older models keep 4-bit
values in int8 storage and the report says so. The report gives, per layer, bits, the
relative weight error and the bytes before/after, and for k-means the Huffman-coded size of
the indices (the storage figure Deep Compression quotes).

Supported: Conv, ConvTranspose, Gemm and MatMul with a constant float weight read by that
node only. Skipped, with a reason: non-constant or shared weights, already quantized models,
tiny weights (``--min-params``).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import platform
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from onnxcomp import bench, calibration, capture, verify
from onnxcomp.calibration import Calibration
from onnxcomp.graph import Graph
from onnxcomp.linear import own_float_weight
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
from onnxcomp.passes import fold_bn

MODES = ("static", "weight", "kmeans", "binary")
CALIBRATORS = ("percentile", "minmax", "entropy")
# Percentile ranges need enough values to put a tail on; fewer samples is an error.
MIN_PERCENTILE_SAMPLES = 8
# Values kept per tensor for percentiles (a seeded subsample bounds the memory).
PERCENTILE_VALUES = 1_000_000
INT4_OPSET = 21
# Entropy calibrator: histogram bins of |x| and the stride of the threshold search.
ENTROPY_BINS = 2048
ENTROPY_STRIDE = 16
# --max-drop by default: static int8 that loses more than this on the calibration data (a
# fifth of the samples with a decision changed, or a relative output error of 0.2) is not a
# model anyone ships; the most sensitive layers stay in float until it holds, loudly.
DEFAULT_MAX_DROP = 0.2
# --max-drop: samples each candidate model is judged on, and samples per layer sensitivity.
DROP_SAMPLES = 256
SENSITIVITY_SAMPLES = 32
# Ops whose output values are some of their input's values (moved or picked).
RANGE_KEEPING = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze",
                           "Unsqueeze", "Identity"})
OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": 1}  # output-channel axis


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """Options of ``quantize``."""

    mode: str = "static"
    bits: int = 8
    min_params: int = 1024
    kmeans_iters: int = 20
    calibrator: str = "percentile"
    percentile: float = 99.99
    max_drop: float = DEFAULT_MAX_DROP
    activations: str = "auto"
    reduce_range: bool | None = None  # None: per CPU (see reduced_range)
    equalize: bool = True
    provider: str = "cpu"
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.calibrator not in CALIBRATORS:
            raise ConfigError(f"--calibrator must be one of {', '.join(CALIBRATORS)}, got "
                              f"'{self.calibrator}'")
        if self.activations not in ("auto", "uint8", "int8"):
            raise ConfigError(f"--activations must be auto, uint8 or int8, got "
                              f"'{self.activations}'")
        if self.max_drop != DEFAULT_MAX_DROP and self.mode != "static":
            raise ConfigError("--max-drop applies to --mode static")
        if not self.max_drop >= 0:  # also refuses NaN
            raise ConfigError(f"--max-drop must be >= 0 (inf: no bound), got {self.max_drop}")
        if self.mode == "static" and self.bits != 8:
            raise ConfigError(f"static quantization is 8-bit, got --bits {self.bits}")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.mode == "weight" and self.bits not in (4, 8):
            raise ConfigError(f"--bits must be 4 or 8 for weight quantization, got {self.bits}")
        if self.mode == "kmeans" and not 1 <= self.bits <= 8:
            raise ConfigError(f"--bits must be in 1..8 for k-means, got {self.bits}")


def signed_activations(config: QuantizeConfig) -> bool:
    """True for int8 (symmetric) activations, False for uint8 (asymmetric).

    ``auto`` picks per provider: uint8 on CPU, where ONNX Runtime's integer kernels are fast
    for u8 x s8 (its own quantizer measured 3.0x vs 1.15x with int8 activations on ResNet-18);
    int8 for CUDA / TensorRT, whose integer kernels want symmetric int8 on both sides.
    """
    if config.activations == "auto":
        return config.provider in ("cuda", "tensorrt")
    return config.activations == "int8"


def reduced_range(config: QuantizeConfig) -> bool:
    """7-bit weights for static quantization on x86 CPUs without VNNI (unless told).

    There ONNX Runtime multiplies uint8 activations by int8 weights with an instruction
    (vpmaddubsw) that adds pairs of products into int16 and saturates: 2 x 255 x 127 does not
    fit, 2 x 255 x 63 does. Measured here (AVX2, no VNNI) on a CP-decomposed Fashion-MNIST
    net: full-range weights agreed with the float model on 53 % of the calibration images
    once fused, against 87 % when the same QDQ graph ran unfused; 7-bit weights gave the same
    answer fused and unfused.
    """
    if config.reduce_range is not None:
        return config.reduce_range
    if config.provider != "cpu" or signed_activations(config):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not _cpu_has_vnni()


def _cpu_has_vnni() -> bool:
    """True when the CPU flags list VNNI / AMX (False when they cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


class Quantize:
    """The ``quantize`` pass."""

    name: ClassVar[str] = "quantize"
    lossless: ClassVar[bool] = False
    config_cls: ClassVar[type[PassConfig]] = QuantizeConfig

    def __call__(self, model: onnx.ModelProto, config: PassConfig,
                 calib: Calibration | None = None) -> PassResult:
        """Quantize the constant weights (and, static, the activations) of a copy of ``model``."""
        if not isinstance(config, QuantizeConfig):
            raise ConfigError("quantize needs a QuantizeConfig")
        if config.mode == "static":
            return _static(model, config, calib)
        return _weights_only(model, config)


PASS = Quantize()


def _weights_only(model: onnx.ModelProto, config: QuantizeConfig) -> PassResult:
    """``--mode weight | kmeans | binary``: only the constant weights change."""
    report = Report(PASS.name)
    graph = Graph(model)
    opset = default_opset(model) or 0
    storage4 = config.mode == "weight" and config.bits == 4 and opset >= INT4_OPSET
    if config.mode == "weight" and config.bits == 4 and not storage4:
        report.notes.append(f"int4 initializers need opset >= {INT4_OPSET} (model has "
                            f"{opset}): 4-bit values are stored as int8")
    if config.mode in ("weight", "binary") and opset < 13:
        report.notes.append("opset < 13 has no per-channel DequantizeLinear: the "
                            "per-channel scales are applied by a Mul after it")
    if config.mode == "binary":
        report.notes.append("binary weights (BWN) are experimental: without training the "
                            "error is large (see the fidelity); signs are stored as int8, "
                            "ONNX Runtime has no 1-bit type (packed_bytes: the 1-bit figure)")
    huffman_bits = 0
    int4_names: set[str] = set()
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
        details: dict[str, Any]
        if config.mode in ("weight", "binary"):
            if config.mode == "binary":
                q, scale, err = binarize(w, axis)
                after = scale.nbytes + q.size
                details = {"bits": 1, "per_channel": True, "storage": "int8",
                           "packed_bytes": int(scale.nbytes + (q.size + 7) // 8)}
            else:
                q, scale, err = quantize_symmetric(w, config.bits, axis)
                after = scale.nbytes + (q.size + 1) // 2 if storage4 else scale.nbytes + q.size
                details = {"bits": config.bits, "per_channel": True,
                           "storage": "int4" if storage4 else "int8"}
            _insert_dq(graph, node, q, scale, axis, w.dtype, int4=storage4,
                       int4_names=int4_names, dq_axis=opset >= 13)
        else:
            codebook, idx, err = kmeans_quantize(w, config.bits, config.kmeans_iters)
            _insert_gather(graph, node, codebook, idx, w.dtype)
            hb = huffman_bits_of(idx)
            huffman_bits += hb
            after = codebook.nbytes + idx.size
            details = {"bits": config.bits, "centroids": int(codebook.size),
                       "huffman_bytes": (hb + 7) // 8}
        bits = 1 if config.mode == "binary" else config.bits
        report.apply(Change(
            node=node.name, op_type=node.op, what=f"{config.mode} {bits}-bit",
            params_before=int(w.size), params_after=int(w.size), macs_before=0,
            macs_after=0, error=round(err, 6),
            details={**details, "bytes_before": int(w.nbytes), "bytes_after": int(after),
                     "weight_rel_error": round(err, 6)}))
    if not report.applied:
        return PassResult(copy_model(model), report)
    if config.mode == "kmeans":
        report.metrics["huffman_index_bytes"] = (huffman_bits + 7) // 8
    if not int4_names:
        return PassResult(graph.export(), report)
    out = _to_int4(graph.export(check=False), int4_names)
    check_model(out, full=True)
    return PassResult(out, report)


# ====================================================================== static int8
def _static(model: onnx.ModelProto, config: QuantizeConfig, calib: Calibration | None
            ) -> PassResult:
    """``--mode static``: int8 weights and uint8 activations in QDQ form.

    Activation ranges are measured once on the float model for every layer that could be
    quantized; each candidate model (all layers, or all but the most sensitive ones for
    ``--max-drop``) is then built from those ranges.
    """
    notes = []
    original = model  # what a pass that applies nothing hands back
    opset = default_opset(model) or 0
    if opset < 13:
        upgraded = _to_opset13(model)
        if upgraded is None:
            notes.append(f"opset {opset}: static quantization uses per-tensor weight scales "
                         f"(per-channel needs opset 13 to stay fusable, and the onnx version "
                         f"converter could not upgrade this model)")
        else:
            notes.append(f"opset {opset} -> 13 (onnx version converter), for per-channel "
                         f"int8 weights")
            model = upgraded
    if calib is None or calib.synthetic:
        notes.append("static quantization without --calib: activation ranges come from "
                     "random inputs")
    if calib is not None and config.calibrator in ("percentile", "entropy") and (
            calib.num_samples < MIN_PERCENTILE_SAMPLES):
        raise InputError(f"the {config.calibrator} calibrator needs at least "
                         f"{MIN_PERCENTILE_SAMPLES} calibration samples, got "
                         f"{calib.num_samples} (use --calibrator minmax)")
    if calib is None:
        calib = calibration.synthetic_calibration(model, num_samples=8)
    model, bn_folded = _fold_batchnorms(model)
    if bn_folded:
        notes.append(f"{bn_folded} BatchNormalization folded into their convs first (int8 "
                     f"between a conv and its BN loses what the BN scales up)")
    equalized = 0
    if config.equalize:
        model, equalized = equalize_linear_pairs(model, calib, config)
    graph = Graph(model)
    candidates = [n.name for n in graph.nodes
                  if n.op in OPS and _check(graph, n, config) is None]
    names = [t for n in graph.nodes if n.name in candidates
             for t in _static_tensors(graph, n)]
    ranges = activation_ranges(model, list(dict.fromkeys(names)), calib, config)
    quantized, report = _build_static(model, config, ranges, set())
    report.notes[:0] = notes
    if math.isfinite(config.max_drop) and report.applied:
        quantized, report = _meet_max_drop(model, config, calib, ranges, quantized, report,
                                           notes)
    if not report.applied:  # not even the equalization or the opset upgrade is kept
        return PassResult(copy_model(original), report)
    report.metrics["tensors_equalized"] = equalized
    report.metrics["batchnorms_folded"] = bn_folded
    feeds = {k: v[:1] for k, v in calib.batches[0].items()}
    res = bench.benchmark([model, quantized],
                          bench.BenchConfig(provider=config.provider, runs=20, warmup=3),
                          inputs=feeds)
    speedup = float(res.speedups[0].median)
    report.metrics["measured_speedup"] = round(speedup, 3)
    if speedup < 1.0:
        report.notes.append(
            f"static int8 measured {speedup:.2f}x (slower than float) on {config.provider}: "
            f"ONNX Runtime could not fuse enough of the QDQ pattern here")
    return PassResult(quantized, report)


def _fold_batchnorms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every BatchNormalization that can fold into its conv folded: (it, count).

    A trained conv's output often sits far from zero per channel, an offset its BN takes away
    again (BN's mean) before scaling the small rest up (gamma / sqrt(var)). One uint8 grid per
    tensor spread over those offsets rounds the rest away, and the BN then amplifies the
    rounding: a VGG-BN U-Net quantized that way lost all its maps. Folded, the grid covers
    only what the BN passes on, and the conv fuses with its Relu into one integer kernel.
    ONNX Runtime's own quantizer folds BN first for the same reason.
    """
    result = fold_bn.PASS(model, fold_bn.FoldBNConfig())
    if not result.report.applied:
        return model, 0
    return result.model, len(result.report.applied)


def _to_opset13(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` converted to opset 13 by onnx's version converter, or None if it cannot be.

    Per-channel DequantizeLinear (the ``axis`` attribute) needs opset 13; per-tensor weights
    cost much fidelity (PP-OCRv4 rec: 8.8 % of strings kept, vs far more per channel). The
    converted model is checked here; the pipeline verifies its outputs after the pass.
    """
    try:
        out = version_converter.convert_version(model, 13)
        check_model(out)
    except Exception:  # noqa: BLE001 - any converter failure means: stay per tensor
        return None
    return out


def _linear_pairs(graph: Graph, config: QuantizeConfig) -> list[tuple[Any, Any, bool]]:
    """(A, B, B is depthwise) for Conv A whose output only Conv B reads, nothing between.

    A's output channel c can be scaled by s_c if B's input channel c is scaled by 1/s_c:
    the pair computes the same. Decomposed chains (CP, Tucker, SVD) are made of such pairs.
    """
    pairs = []
    for a in graph.nodes:
        if a.op != "Conv" or _check(graph, a, config) is not None:
            continue
        t = a.outputs[0]
        if len(t.outputs) != 1 or graph.is_graph_output(t):
            continue
        b = t.outputs[0]
        if b.op != "Conv" or b.inputs[0] is not t or _check(graph, b, config) is not None:
            continue
        wa = graph.const_value(graph.input(a, 1))
        wb = graph.const_value(graph.input(b, 1))
        assert wa is not None and wb is not None
        group = int(b.attrs.get("group", 1))
        if group == 1 and wb.shape[1] == wa.shape[0]:
            pairs.append((a, b, False))
        elif group == wa.shape[0] == wb.shape[0] and wb.shape[1] == 1:
            pairs.append((a, b, True))
    return pairs


def equalize_linear_pairs(model: onnx.ModelProto, calib: Calibration, config: QuantizeConfig
                          ) -> tuple[onnx.ModelProto, int]:
    """Even out the channel ranges of tensors between two linear convs: (model, how many).

    One scale per tensor (activations are quantized per tensor) wastes the grid on channels
    much smaller than the largest: a CP chain's middle tensors span orders of magnitude. The
    idea of cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019),
    applied to activation ranges measured on the calibration data: channel c is scaled by
    ``s_c = (R / r_c)^alpha`` in A (weights and bias) and by ``1 / s_c`` in B; R is the
    largest channel range, alpha 1 when B is depthwise (its per-channel weight scales absorb
    1 / s_c exactly) and 1/2 when B is dense (its input columns change size).
    """
    graph = Graph(model)
    pairs = _linear_pairs(graph, config)
    if not pairs:
        return model, 0
    names = [a.outputs[0].name for a, _, _ in pairs]
    amax: dict[str, np.ndarray] = {}
    for batch in capture.iter_capture(model, names, calib):
        for n, x in batch.items():
            axes = tuple(i for i in range(x.ndim) if i != 1)
            m = np.max(np.abs(x), axis=axes).astype(np.float64)
            amax[n] = np.maximum(amax[n], m) if n in amax else m
    done = 0
    for a, b, depthwise in pairs:
        r = amax[a.outputs[0].name]
        live = r > 0
        if not live.any() or r[live].min() > 0.5 * r.max():
            continue  # already even enough
        alpha = 1.0 if depthwise else 0.5
        scale = np.ones_like(r)
        scale[live] = np.clip((r.max() / r[live]) ** alpha, 1.0, 1e4)
        wa = graph.const_value(graph.input(a, 1))
        wb = graph.const_value(graph.input(b, 1))
        assert wa is not None and wb is not None
        shape_a = (-1,) + (1,) * (wa.ndim - 1)
        graph.set_input_constant(a, 1, (wa * scale.reshape(shape_a)).astype(wa.dtype))
        bias = graph.const_value(graph.input(a, 2)) if len(a.inputs) > 2 else None
        if bias is not None:
            graph.set_input_constant(a, 2, (bias * scale).astype(bias.dtype))
        if depthwise:  # B's output channel c reads only input channel c
            inv = (1.0 / scale).reshape(shape_a)
        else:
            inv = (1.0 / scale).reshape((1, -1) + (1,) * (wb.ndim - 2))
        graph.set_input_constant(b, 1, (wb * inv).astype(wb.dtype))
        done += 1
    return (graph.export(), done) if done else (model, 0)


def _static_tensors(graph: Graph, node: Any) -> list[str]:
    """The activations static quantization puts QDQ pairs on for ``node``: input, output.

    The output is taken after a Relu / Clip(0, c) that follows the layer (it is folded).
    """
    out = node.outputs[0]
    if any(reader.op == "BatchNormalization" for reader in out.outputs):
        return [node.inputs[0].name]  # see _fold_batchnorms: never round before a BN
    act = _clamping_activation(graph, out)
    return [node.inputs[0].name, act[0].outputs[0].name if act else out.name]


def _build_static(model: onnx.ModelProto, config: QuantizeConfig,
                  all_ranges: dict[str, tuple[float, float]], excluded: set[str],
                  sensitivity: dict[str, float] | None = None
                  ) -> tuple[onnx.ModelProto, Report]:
    """The QDQ model with every candidate layer quantized except ``excluded``.

    ``sensitivity`` (layer -> output error with it alone quantized) goes into the report.
    """
    sensitivity = sensitivity or {}
    signed = signed_activations(config)
    wbits = 7 if reduced_range(config) else 8
    report = Report(PASS.name)
    graph = Graph(model)
    opset = default_opset(model) or 0
    per_tensor = opset < 13  # the only weight form ONNX Runtime fuses before opset 13
    activations: list[str] = []
    gemm_bias: list[tuple[Any, str]] = []  # (Gemm, its input) for int32 biases
    # activation output -> (layer output, the Relu/Clip node, its upper bound)
    folded: dict[str, tuple[str, Any, float]] = {}
    for node in graph.nodes:
        if node.op not in OPS:
            continue
        skip = _check(graph, node, config)
        if skip is None and node.name in excluded:
            skip = Skip(node.name, node.op, SkipReason.ERROR_TOO_HIGH,
                        f"left in float for --max-drop {config.max_drop}: output error "
                        f"{sensitivity.get(node.name, float('nan')):.3g} with this layer "
                        f"alone quantized")
        if skip is not None:
            report.add_skip(skip)
            continue
        w = graph.const_value(graph.input(node, 1))
        assert w is not None
        axis = _out_axis(node)
        activations.extend(_static_tensors(graph, node))
        if node.op == "Gemm" and graph.input(node, 2) is not None:
            gemm_bias.append((node, node.inputs[0].name))
        act = _clamping_activation(graph, node.outputs[0])
        if act is not None and not signed:  # int8 has no [0, c] grid to clamp with
            folded[act[0].outputs[0].name] = (node.outputs[0].name, act[0], act[1])
        q, scale, err = quantize_symmetric(w, wbits, None if per_tensor else axis)
        if per_tensor:
            scale = np.full(w.shape[axis], float(scale), dtype=np.float32)
        _insert_dq(graph, node, q, scale, axis, w.dtype, int4=False, int4_names=set(),
                   dq_axis=opset >= 13, per_tensor=per_tensor)
        report.apply(Change(
            node=node.name, op_type=node.op, what="static 8-bit",
            params_before=int(w.size), params_after=int(w.size), macs_before=0,
            macs_after=0, error=round(err, 6),
            details={"bits": wbits, "per_channel": not per_tensor, "storage": "int8",
                     "bytes_before": int(w.nbytes), "bytes_after": int(scale.nbytes + q.size),
                     "weight_rel_error": round(err, 6),
                     **({"sensitivity": round(sensitivity[node.name], 6)}
                        if node.name in sensitivity else {})}))
    if not report.applied:
        return copy_model(model), report
    ranges = {n: all_ranges[n] for n in dict.fromkeys(activations) if n in all_ranges}
    for name in list(ranges):
        if name in folded:  # quantize the layer output, [0, bound]: the Relu/Clip goes
            layer_out, act_node, bound = folded[name]
            lo, hi = ranges.pop(name)
            graph.bypass(act_node)
            ranges[layer_out] = (0.0, min(hi, bound))
    report.metrics["activations_folded"] = len(folded)
    report.metrics["ranges_shared"] = _share_ranges(graph, ranges)
    for node, x_name in gemm_bias:
        if x_name in ranges:
            _quantize_bias(graph, node, *ranges[x_name], signed=signed)
    for name, (lo, hi) in ranges.items():
        _insert_qdq(graph, name, lo, hi, signed=signed)
    report.metrics["activations_quantized"] = len(ranges)
    report.metrics["calibrator"] = config.calibrator
    report.metrics["activation_type"] = "int8" if signed else "uint8"
    report.metrics["weight_bits"] = wbits
    return graph.export(), report


def _share_ranges(graph: Graph, ranges: dict[str, tuple[float, float]]) -> int:
    """Give a tensor behind MaxPool / Reshape / Flatten / ... its source's range: how many.

    These ops only move or pick values, so the source's uint8 grid holds their output too;
    with equal scale and zero point on both sides ONNX Runtime drops the DequantizeLinear /
    QuantizeLinear pair around them and runs them on uint8 (as its own quantizer arranges).
    """
    shared = 0
    for node in graph.nodes:
        if node.op not in RANGE_KEEPING or node.outputs[0].name not in ranges:
            continue
        t = node.inputs[0]
        while t.name not in ranges:
            prod = graph.producer(t)
            if prod is None or prod.op not in RANGE_KEEPING or len(t.outputs) != 1:
                break
            t = prod.inputs[0]
        if t.name in ranges and ranges[node.outputs[0].name] != ranges[t.name]:
            ranges[node.outputs[0].name] = ranges[t.name]
            shared += 1
    return shared


def fidelity_drop(reference: list[np.ndarray], names: list[str], model: onnx.ModelProto,
                  calib: Calibration, decisions: Sequence[tuple[int, int]] = ()
                  ) -> tuple[float, float]:
    """(drop, relative output error) of ``model`` against the float outputs ``reference``.

    The drop is 1 - the share of samples whose decisions are all kept, for the float model's
    ``decisions`` (see :func:`verify.decision_outputs`: a classifier's top-1, a recognizer's
    character at every step); with none, 1 - top-1 agreement for a classifier-like output
    (2-D, several classes), else the relative L2 error of the outputs. Run with ONNX Runtime's
    optimizations, so the QDQ pattern is fused as it will be when deployed.
    """
    got = capture.run_model(model, calib, optimize=True)
    fid = verify.compare_outputs(names, reference, got, decisions)
    kept = fid.decision_agreement if fid.decision_agreement is not None else fid.top1_agreement
    return (1.0 - kept if kept is not None else fid.rel_l2), fid.rel_l2


def _subset(calib: Calibration, samples: int) -> Calibration:
    """The first ``samples`` samples of ``calib`` (whole batches, the last one cut)."""
    out: list[dict[str, np.ndarray]] = []
    left = samples
    for batch, size in zip(calib.batches, calib.batch_sizes(), strict=True):
        if left <= 0:
            break
        out.append({k: v[:left] for k, v in batch.items()} if size > left else batch)
        left -= size
    return Calibration(out, calib.synthetic, f"{calib.source} (first {samples})")


def _meet_max_drop(model: onnx.ModelProto, config: QuantizeConfig, calib: Calibration,
                   ranges: dict[str, tuple[float, float]], quantized: onnx.ModelProto,
                   report: Report, notes: list[str]) -> tuple[onnx.ModelProto, Report]:
    """Leave the most sensitive layers in float until the drop is within ``--max-drop``.

    Sensitivity of a layer: the output error with that layer alone quantized (on at most
    ``SENSITIVITY_SAMPLES`` calibration samples). The count left in float is found by
    doubling, then bisection; each count is judged on up to ``DROP_SAMPLES`` samples.
    """
    check = _subset(calib, DROP_SAMPLES)
    names = [o.name for o in model.graph.output]
    reference = capture.run_model(model, check, optimize=True)
    decisions = verify.calibrated_decisions(model, calib)
    drop, _ = fidelity_drop(reference, names, quantized, check, decisions)
    report.metrics["drop_all_layers"] = round(drop, 5)
    if drop <= config.max_drop:
        report.metrics["drop"] = round(drop, 5)
        report.metrics["layers_left_in_float"] = 0
        return quantized, report
    probe = _subset(check, SENSITIVITY_SAMPLES)
    if all(r.ndim and r.shape[0] == check.num_samples for r in reference):
        probe_ref = [r[:probe.num_samples] for r in reference]  # batch-first outputs
    else:
        probe_ref = capture.run_model(model, probe, optimize=True)
    layers = [c.node for c in report.applied]
    sensitivity = {}
    for name in layers:
        alone, _ = _build_static(model, config, ranges, {n for n in layers if n != name})
        sensitivity[name] = fidelity_drop(probe_ref, names, alone, probe)[1]
    ranked = sorted(layers, key=lambda n: -sensitivity[n])
    tried: dict[int, tuple[onnx.ModelProto, Report, float]] = {}

    def attempt(k: int) -> float:
        if k not in tried:
            m, r = _build_static(model, config, ranges, set(ranked[:k]), sensitivity)
            tried[k] = (m, r, fidelity_drop(reference, names, m, check, decisions)[0]
                        if r.applied
                        else 0.0)
        return tried[k][2]

    bad, good, k = 0, len(ranked), 1  # 0 layers in float is known to miss the bound
    while k < len(ranked):
        if attempt(k) <= config.max_drop:
            good = k
            break
        bad, k = k, 2 * k
    while good - bad > 1:
        mid = (good + bad) // 2
        if attempt(mid) <= config.max_drop:
            good = mid
        else:
            bad = mid
    if good == len(ranked):
        attempt(good)
    best, best_report, best_drop = tried[good]
    best_report.notes[:0] = notes
    best_report.metrics["drop_all_layers"] = round(drop, 5)
    best_report.metrics["drop"] = round(best_drop, 5)
    best_report.metrics["layers_left_in_float"] = good
    best_report.metrics["models_tried"] = len(tried)
    worst = ", ".join(f"{n} ({sensitivity[n]:.3g})" for n in ranked[:3])
    lost = (f"static int8 of every layer drops fidelity by {drop:.3g} on the calibration data "
            f"(share of samples with a decision changed, or relative output error)")
    if good == len(ranked):
        best_report.warn("quantize.max_drop_unmet",
                         f"{lost}, and no layer can be quantized within --max-drop "
                         f"{config.max_drop}: the model is left in float (most sensitive "
                         f"layers, output error alone: {worst})")
    else:
        best_report.warn("quantize.layers_in_float",
                         f"{lost}, above --max-drop {config.max_drop}: {good} most sensitive "
                         f"layer(s) left in float, drop now {best_drop:.3g} (most sensitive, "
                         f"output error alone: {worst})")
    if good == len(ranked):
        best_report.notes.append(f"--max-drop {config.max_drop}: not met with any layer "
                                 f"quantized; the model is left in float")
    else:
        best_report.notes.append(
            f"--max-drop {config.max_drop}: {good} most sensitive layer(s) left in float; "
            f"drop {best_drop:.4f} on {check.num_samples} calibration samples (all layers: "
            f"{drop:.4f})")
    return best, best_report




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


def _quantize_bias(graph: Graph, gemm: Any, lo: float, hi: float, signed: bool) -> None:
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
        calib = calibration.synthetic_calibration(model, num_samples=8)
    lows = {n: np.inf for n in names}
    highs = {n: -np.inf for n in names}
    pools: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rng = np.random.default_rng(config.seed)
    per_batch = max(1, PERCENTILE_VALUES // max(len(calib.batches), 1))
    for batch in capture.iter_capture(model, names, calib):
        for n, x in batch.items():
            if x.dtype.kind != "f":
                continue
            lows[n] = min(lows[n], float(x.min()))
            highs[n] = max(highs[n], float(x.max()))
            if config.calibrator in ("percentile", "entropy"):
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
        elif config.calibrator == "entropy" and pools[n]:
            lo, hi = entropy_range(np.concatenate(pools[n]), lo, hi)
        out[n] = (lo, hi)
    return out


# ====================================================================== graph edits
def _insert_qdq(graph: Graph, name: str, lo: float, hi: float, signed: bool = False) -> None:
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
