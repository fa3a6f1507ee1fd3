"""Quantization folded into the graph: static int8 QDQ, int8 / int4 weights, k-means, binary.

Papers: S. Han, H. Mao, W. Dally, "Deep Compression", ICLR 2016, arXiv:1510.00149 (k-means
weight sharing, Huffman coding of the indices); B. Jacob et al., "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (symmetric
per-channel int8 weights, asymmetric uint8 activations); S. Migacz, "8-bit Inference with
TensorRT", GTC 2017 (entropy calibration); M. Rastegari et al., "XNOR-Net", ECCV 2016 (BWN).

``--mode static`` (the default): int8 per-channel weights and uint8 activations (asymmetric,
per tensor) through QuantizeLinear -> DequantizeLinear pairs on every quantized layer's input
and output (after its Relu/Clip, which the uint8 range [0, c] then replaces). Ranges come from
the calibration data: ``--calibrator percentile`` (99.99, default), ``minmax``, ``entropy``
(KL-optimal clipping) or ``mse`` (per tensor, the quantile pair whose grid rounds the tensor's
values with the least squared error). Each int8 conv's weights are then rounded up or down by
the conv's output error on the calibration data (onnxcomp/rounding.py, after M. Nagel et al.,
"Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020, arXiv:2004.10568),
and its per-channel output mean restored (onnxcomp/bias_correction.py). ONNX Runtime fuses the
pattern into integer kernels (QLinearConv, QGemm). ``--max-drop X`` measures every layer's
sensitivity (output error with it alone quantized) and leaves the most sensitive in float until
the fidelity drop on the calibration data (``fidelity.bound``: the worst of decisions changed,
score sets lost and the error of the outputs beside them; relative output error for a model
whose outputs decide nothing) is at most X. ``--float-budget F`` first tries the 1, 2, 4, ...
most sensitive layers in float while the model keeps 1 - F of the all-int8 speed, and keeps
the count with the least output error (onnxcomp/int8_fallback.py). A layer left in float
between int8 layers reads its input through a DequantizeLinear of its own, per channel
(quant.keep_float): ONNX Runtime would otherwise quantize it itself, per tensor. The Sigmoid /
Mul / Add / Concat / GlobalAveragePool / AveragePool (and Split, MaxPool, Resize) between int8
layers are quantized too (``--int8-elementwise``),
so ONNX Runtime runs a SiLU or a C2f block's Concat on integers. Before opset 13 weights are
per tensor (the only form that stays fusable there), which costs fidelity.

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
import math
import platform
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from onnxcomp import benchmark as bench
from onnxcomp import bias_correction, int8_fallback, int8_speed, quant, rounding, runtime
from onnxcomp import passbase as pb
from onnxcomp.calibration import Calibration
from onnxcomp.graph import Graph
from onnxcomp.linear import own_float_weight
from onnxcomp.model import check_model, copy_model, default_opset
from onnxcomp.passes import canonicalize, equalize, fold_bn
from onnxcomp.passes import opset as opset_mod

MODES = ("static", "weight", "kmeans", "binary")
CALIBRATORS = ("percentile", "minmax", "entropy", "mse")
# Percentile ranges need enough values to put a tail on; fewer samples is an error.
MIN_PERCENTILE_SAMPLES = 8
# --max-drop by default: static int8 that loses more than this on the calibration data (a
# fifth of the samples with a decision changed, or a relative output error of 0.2) is not a
# model anyone ships; the most sensitive layers stay in float until it holds, loudly.
DEFAULT_MAX_DROP = 0.2
# Bias correction estimates each channel's output mean: with fewer samples it fits them.
BIAS_CORRECTION_SAMPLES = 32


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(pb.PassConfig):
    """Options of ``quantize``."""

    mode: str = pb.option(
        'static',
        'quantize: static int8 QDQ with calibrated activations, int weights '
        '(DequantizeLinear), k-means sharing (codebook + Gather) or binary weights '
        '(experimental).',
        choices=('static', 'weight', 'kmeans', 'binary'))
    bits: int = pb.option(8, 'quantize: 8 or 4 (weight), 1..8 (kmeans).')
    min_params: int = 1024
    kmeans_iters: int = 20
    calibrator: str = pb.option(
        'percentile',
        'quantize --mode static: activation ranges.',
        choices=('percentile', 'minmax', 'entropy', 'mse'))
    percentile: float = 99.99
    max_drop: float = pb.option(
        DEFAULT_MAX_DROP,
        'quantize --mode static: leave the most sensitive layers in float until the fidelity '
        'drop on the calibration data is at most this: the share of samples with an argmax '
        "decision changed, 1 - the F1 of a sigmoid output's above-threshold set, the relative "
        'error of outputs beside them, or the relative output error when the outputs decide '
        'nothing (inf: no bound).')
    float_budget: float = pb.option(
        0.0,
        'quantize --mode static: share of the int8 model\'s measured speed to spend on '
        'fidelity: of the 1, 2, 4, ... most sensitive layers left in float while the model '
        'keeps at least 1 - this of the all-int8 speed, the count with the least output '
        'error on the calibration data (0: off).')
    activations: str = pb.option(
        'auto',
        'quantize --mode static: activation type; auto = uint8 on cpu, int8 (symmetric) on '
        'cuda / tensorrt.',
        choices=('auto', 'uint8', 'int8'))
    reduce_range: bool | None = pb.option(
        None,
        'quantize --mode static: 7-bit weights (default on x86 CPUs without VNNI, where 8-bit'
        ' products saturate in ONNX Runtime).',
        flag='--reduce-range/--full-range')
    equalize: bool = True
    elementwise: bool = pb.option(
        True,
        'quantize --mode static: also quantize the Sigmoid / Mul / Add / Concat / average '
        'pools (and Split, MaxPool, Resize) between int8 layers, so ONNX Runtime runs a '
        'SiLU, a residual Add or a Concat on integers (as its own quantizer does).',
        flag='--int8-elementwise/--no-int8-elementwise')
    keep_fast: bool = pb.option(
        True,
        'quantize --mode static: time each layer alone in int8 and in float on the provider '
        '(interleaved) and leave in float those int8 makes slower (a first conv with one to '
        'three input channels, narrow stages).',
        flag='--per-layer-speed/--no-per-layer-speed')
    rounding: bool = pb.option(
        True,
        "quantize --mode static: round int8 conv weights up or down by output error on the "
        "calibration data (AdaRound, layer-wise), not to nearest; kept when it helps.")
    bias_correction: bool = pb.option(
        True,
        "quantize --mode static: restore each int8 conv's per-channel output mean on the "
        "calibration data (empirical bias correction; kept when the loss does not grow).")
    provider: str = "cpu"
    threads: int = 1
    exclude: tuple[str, ...] = pb.exclude_option()
    seed: int = pb.seed_option()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise pb.ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.calibrator not in CALIBRATORS:
            raise pb.ConfigError(f"--calibrator must be one of {', '.join(CALIBRATORS)}, got "
                              f"'{self.calibrator}'")
        if self.activations not in ("auto", "uint8", "int8"):
            raise pb.ConfigError(f"--activations must be auto, uint8 or int8, got "
                              f"'{self.activations}'")
        if self.max_drop != DEFAULT_MAX_DROP and self.mode != "static":
            raise pb.ConfigError("--max-drop applies to --mode static")
        if not self.max_drop >= 0:  # also refuses NaN
            raise pb.ConfigError(f"--max-drop must be >= 0 (inf: no bound), got {self.max_drop}")
        if not 0.0 <= self.float_budget < 1.0:
            raise pb.ConfigError(f"--float-budget must be in [0, 1), got {self.float_budget}")
        if self.float_budget and self.mode != "static":
            raise pb.ConfigError("--float-budget applies to --mode static")
        if self.mode == "static" and self.bits != 8:
            raise pb.ConfigError(f"static quantization is 8-bit, got --bits {self.bits}")
        if not 50 < self.percentile <= 100:
            raise pb.ConfigError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.mode == "weight" and self.bits not in (4, 8):
            raise pb.ConfigError(f"--bits must be 4 or 8 for weight quantization, got {self.bits}")
        if self.mode == "kmeans" and not 1 <= self.bits <= 8:
            raise pb.ConfigError(f"--bits must be in 1..8 for k-means, got {self.bits}")


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
    return bool(runtime.cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


class Quantize(pb.PassBase, name="quantize", lossless=False, config=QuantizeConfig):
    """The ``quantize`` pass."""

    def call(self, model: onnx.ModelProto, config: pb.PassConfig,
             calib: Calibration | None, ctx: pb.RunContext) -> pb.PassResult:
        """Quantize the constant weights (and, static, the activations) of a copy of ``model``."""
        if not isinstance(config, QuantizeConfig):
            raise pb.ConfigError("quantize needs a QuantizeConfig")
        if config.mode == "static":
            return _static(model, config, calib, ctx)
        return _weights_only(model, config)


    def needs_calibration(self, config: pb.PassConfig) -> bool:
        """Static int8 reads calibration data; the weight-only modes do not."""
        return isinstance(config, QuantizeConfig) and config.mode == "static"

    def prerequisites(self, model: onnx.ModelProto, config: pb.PassConfig
                      ) -> tuple[list[tuple[str, pb.PassConfig]], pb.PassConfig]:
        """Lossless passes the pipeline runs (and verifies) first, and the config after them.

        Static int8 wants the graph canonicalized (an exporter's four-node HardSwish costs
        more than int8 saves), BN folded (see _fold_batchnorms), opset 13 and equalized pairs:
        each a verified step of its own. Called directly, the pass does all but the first.
        """
        assert isinstance(config, QuantizeConfig)
        if config.mode != "static":
            return [], config
        steps: list[tuple[str, pb.PassConfig]] = [
            ("canonicalize", canonicalize.CanonicalizeConfig()),
            ("fold_bn", fold_bn.FoldBNConfig())]
        if (default_opset(model) or 0) < 13:
            steps.append(("opset", opset_mod.OpsetConfig(target_opset=13)))
        if config.equalize:
            steps.append(("equalize", equalize.EqualizeConfig(exclude=config.exclude)))
            config = dataclasses.replace(config, equalize=False)
        return steps, config


PASS = Quantize()


def _weights_only(model: onnx.ModelProto, config: QuantizeConfig) -> pb.PassResult:
    """``--mode weight | kmeans | binary``: only the constant weights change."""
    report = pb.Report(PASS.name)
    graph = Graph(model)
    opset = default_opset(model) or 0
    storage4 = config.mode == "weight" and config.bits == 4 and opset >= quant.INT4_OPSET
    if config.mode == "weight" and config.bits == 4 and not storage4:
        report.note("int4_stored_as_int8",
                    f"int4 initializers need opset >= {quant.INT4_OPSET} (model has {opset}): "
                    f"4-bit values are stored as int8")
    if config.mode in ("weight", "binary") and opset < 13:
        report.note("scales_by_mul", "opset < 13 has no per-channel DequantizeLinear: the "
                                     "per-channel scales are applied by a Mul after it")
    if config.mode == "binary":
        report.note("experimental",
                    "binary weights (BWN) are experimental: without training the error is "
                    "large (see the fidelity); signs are stored as int8, ONNX Runtime has no "
                    "1-bit type (packed_bytes: the 1-bit figure)")
    huffman_bits = 0
    int4_names: set[str] = set()
    for node, w, axis in _layers(graph, config, report):
        details: dict[str, Any]
        if config.mode in ("weight", "binary"):
            if config.mode == "binary":
                q, scale, err = quant.binarize(w, axis)
                after = scale.nbytes + q.size
                details = {"bits": 1, "per_channel": True, "storage": "int8",
                           "packed_bytes": int(scale.nbytes + (q.size + 7) // 8)}
            else:
                q, scale, err = quant.quantize_symmetric(w, config.bits, axis)
                after = scale.nbytes + (q.size + 1) // 2 if storage4 else scale.nbytes + q.size
                details = {"bits": config.bits, "per_channel": True,
                           "storage": "int4" if storage4 else "int8"}
            quant.insert_dq(graph, node, q, scale, axis, w.dtype, int4=storage4,
                       int4_names=int4_names, dq_axis=opset >= 13)
        else:
            codebook, idx, err = quant.kmeans_quantize(w, config.bits, config.kmeans_iters)
            quant.insert_gather(graph, node, codebook, idx, w.dtype)
            hb = quant.huffman_bits_of(idx)
            huffman_bits += hb
            after = codebook.nbytes + idx.size
            details = {"bits": config.bits, "centroids": int(codebook.size),
                       "huffman_bytes": (hb + 7) // 8}
        bits = 1 if config.mode == "binary" else config.bits
        report.apply(pb.Change(
            node=node.name, op_type=node.op, what=f"{config.mode} {bits}-bit",
            params_before=int(w.size), params_after=int(w.size), macs_before=0,
            macs_after=0, error=round(err, 6),
            details={**details, "bytes_before": int(w.nbytes), "bytes_after": int(after),
                     "weight_rel_error": round(err, 6)}))
    if not report.applied:
        return pb.PassResult(copy_model(model), report)
    if config.mode == "kmeans":
        report.metrics["huffman_index_bytes"] = (huffman_bits + 7) // 8
    if not int4_names:
        return pb.PassResult(graph.export(), report)
    out = quant.to_int4(graph.export(check=False), int4_names)
    check_model(out, full=True)
    return pb.PassResult(out, report)


# ====================================================================== static int8
def _static(model: onnx.ModelProto, config: QuantizeConfig, calib: Calibration | None,
            ctx: pb.RunContext) -> pb.PassResult:
    """``--mode static``: int8 weights, uint8 activations (QDQ), from ranges measured once."""
    notes: list[pb.Note] = []
    original = model  # what a pass that applies nothing hands back
    opset = default_opset(model) or 0
    if opset < 13:
        upgraded = opset_mod.convert(model, 13)
        if isinstance(upgraded, str):  # the converter's reason
            notes.append(pb.Note("per_tensor_weights",
                              f"opset {opset}: static quantization uses per-tensor weight scales "
                              f"(per-channel needs opset 13 to stay fusable, and the onnx version "
                              f"converter could not upgrade this model)"))
        else:
            notes.append(pb.Note("opset_upgraded", f"opset {opset} -> 13 (onnx version "
                                                f"converter), for per-channel int8 weights"))
            model = upgraded
    assert calib is not None  # PassBase gives synthetic inputs to static runs (and says so)
    if config.calibrator in ("percentile", "entropy", "mse") and (
            calib.num_samples < MIN_PERCENTILE_SAMPLES):
        raise pb.InputError(f"the {config.calibrator} calibrator needs at least "
                         f"{MIN_PERCENTILE_SAMPLES} calibration samples, got "
                         f"{calib.num_samples} (use --calibrator minmax)")
    model, bn_folded = _fold_batchnorms(model)
    if bn_folded:
        notes.append(pb.Note("bn_folded", f"{bn_folded} BatchNormalization folded into their "
                                       f"convs first (int8 between a conv and its BN loses what "
                                       f"the BN scales up)"))
    equalized = 0
    if config.equalize:
        eq = equalize.PASS(model, equalize.EqualizeConfig(exclude=config.exclude), calib)
        model, equalized = eq.model, len(eq.report.applied)
    graph = Graph(model)
    candidates = [n.name for n in graph.nodes
                  if n.op in quant.OPS and _check(graph, n, config) is None]
    names = [t for n in graph.nodes if n.name in candidates
             for t in _static_tensors(graph, n)]
    if config.elementwise:
        names += quant.elementwise_tensors(graph, set(names))
    ranges = quant.activation_ranges(model, list(dict.fromkeys(names)), calib,
                                   config.calibrator, config.percentile, config.seed,
                                   signed_activations(config))
    slow = int8_speed.for_pass(
        model, candidates, lambda m, ex: _build_static(m, config, ranges, ex)[0], calib, ranges,
        ctx.timer, config, notes) if config.keep_fast else {}
    quantized, report = _build_static(model, config, ranges, set(slow), slow=slow)
    report.notes[:0] = notes
    if not report.applied:  # not even the equalization or the opset upgrade is kept
        return pb.PassResult(copy_model(original), report)
    codes: dict[str, np.ndarray] = {}
    if config.rounding:  # first: --max-drop then judges the layers as they will be rounded
        quantized = rounding.apply(model, quantized, report, calib, ctx.judge, config.seed)
        codes = int8_fallback.int8_codes(quantized, report)
    budget: set[str] = set()

    def build(excluded: set[str], sensitivity: dict[str, float] | None = None,
              for_budget: set[str] | None = None) -> tuple[onnx.ModelProto, pb.Report]:
        floats = budget if for_budget is None else for_budget  # float for --float-budget
        return _build_static(model, config, ranges, excluded | floats, sensitivity, slow,
                             codes, floats)

    if config.float_budget > 0:
        quantized, report, budget = int8_fallback.float_layers_for_budget(
            model, build, calib, quantized, report, config.float_budget, ctx.judge,
            ctx.timer, bench.BenchConfig(provider=config.provider, threads=config.threads,
                                         runs=20, warmup=3))
    if math.isfinite(config.max_drop):
        quantized, report = int8_fallback.float_layers_for_drop(
            model, build, calib, quantized, report, config.max_drop, ctx.judge,
            "static int8 of every layer" + (f" but the {len(budget)} --float-budget left in "
                                            f"float" if budget else ""))
    if config.bias_correction:
        quantized = bias_correction.apply(model, quantized, report, calib, ctx.judge,
                                          BIAS_CORRECTION_SAMPLES)
    report.metrics["left_in_float_for_speed"] = len(slow)
    report.metrics["tensors_equalized"] = equalized
    report.metrics["batchnorms_folded"] = bn_folded
    feeds = {k: v[:1] for k, v in calib.batches[0].items()}
    res = ctx.timer.compare([model, quantized],
                            bench.BenchConfig(provider=config.provider, threads=config.threads,
                                              runs=20, warmup=3),
                            feeds, around=1.0)
    speedup = float(res.speedups[0].median)
    report.metrics["measured_speedup"] = round(speedup, 3)
    if speedup < 1.0:
        report.note(
            "slower_than_float",
            f"static int8 measured {speedup:.2f}x (slower than float) on {config.provider}: "
            f"ONNX Runtime could not fuse enough of the QDQ pattern here")
    return pb.PassResult(quantized, report)


def _fold_batchnorms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every BatchNormalization that can fold into its conv folded: (it, count).

    A trained conv's output often sits far from zero per channel, an offset its BN takes away
    again (BN's mean) before scaling the small rest up (gamma / sqrt(var)). One uint8 grid per
    tensor spread over those offsets rounds the rest away, and the BN then amplifies the
    rounding: a VGG-BN U-Net quantized that way lost all its maps. Folded, the grid covers
    only what the BN passes on, and the conv fuses with its Relu into one integer kernel.
    ONNX Runtime's own quantizer folds BN first for the same reason.
    """
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model, 0  # the usual case in the pipeline, which ran fold_bn before
    result = fold_bn.PASS(model, fold_bn.FoldBNConfig())
    if not result.report.applied:
        return model, 0
    return result.model, len(result.report.applied)


def _static_tensors(graph: Graph, node: Any) -> list[str]:
    """The activations static quantization puts QDQ pairs on for ``node``: input, output.

    The output is taken after a Relu / Clip(0, c) that follows the layer (it is folded).
    """
    out = node.outputs[0]
    if any(reader.op == "BatchNormalization" for reader in out.outputs):
        return [node.inputs[0].name]  # see _fold_batchnorms: never round before a BN
    act = quant.clamping_activation(graph, out)
    return [node.inputs[0].name, act[0].outputs[0].name if act else out.name]


def _build_static(model: onnx.ModelProto, config: QuantizeConfig,
                  all_ranges: dict[str, tuple[float, float]], excluded: set[str],
                  sensitivity: dict[str, float] | None = None,
                  slow: Mapping[str, float] | None = None,
                  codes: Mapping[str, np.ndarray] | None = None,
                  budget: Collection[str] = ()) -> tuple[onnx.ModelProto, pb.Report]:
    """The QDQ model with every candidate layer quantized except ``excluded`` (and ``slow``).

    ``sensitivity`` (layer -> output error with it alone quantized) goes into the report;
    ``slow`` (layer -> int8's measured speedup alone, < 1) too. ``codes``: int8 weights that
    rounding chose (on the same per-channel grid), used instead of nearest rounding.
    ``budget``: the excluded layers that ``--float-budget`` left in float.
    """
    slow = slow or {}
    excluded = excluded | set(slow)
    sensitivity = sensitivity or {}
    signed = signed_activations(config)
    wbits = 7 if reduced_range(config) else 8
    report = pb.Report(PASS.name)
    graph = Graph(model)
    opset = default_opset(model) or 0
    per_tensor = opset < 13  # the only weight form ONNX Runtime fuses before opset 13
    activations: list[str] = []
    gemm_bias: list[tuple[Any, str]] = []  # (Gemm, its input) for int32 biases
    # activation output -> (layer output, the Relu/Clip node, its upper bound)
    folded: dict[str, tuple[str, Any, float]] = {}
    for node, w, axis in _layers(graph, config, report, excluded, sensitivity, slow, budget):
        activations.extend(_static_tensors(graph, node))
        if node.op == "Gemm" and graph.input(node, 2) is not None:
            gemm_bias.append((node, node.inputs[0].name))
        act = quant.clamping_activation(graph, node.outputs[0])
        if act is not None and not signed:  # int8 has no [0, c] grid to clamp with
            folded[act[0].outputs[0].name] = (node.outputs[0].name, act[0], act[1])
        q, scale, err = quant.quantize_symmetric(w, wbits, None if per_tensor else axis)
        if codes is not None and node.name in codes and codes[node.name].shape == q.shape:
            q = codes[node.name]
            shape = [-1 if i == axis else 1 for i in range(w.ndim)]
            err = float(np.linalg.norm(q * scale.reshape(shape) - w)
                        / max(float(np.linalg.norm(w)), 1e-30))
        if per_tensor:
            scale = np.full(w.shape[axis], float(scale), dtype=np.float32)
        quant.insert_dq(graph, node, q, scale, axis, w.dtype, int4=False, int4_names=set(),
                   dq_axis=opset >= 13, per_tensor=per_tensor)
        report.apply(pb.Change(
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
    if config.elementwise:
        activations += quant.elementwise_tensors(graph, set(activations))
    ranges = {n: all_ranges[n] for n in dict.fromkeys(activations) if n in all_ranges}
    for name in list(ranges):
        if name in folded:  # quantize the layer output, [0, bound]: the Relu/Clip goes
            layer_out, act_node, bound = folded[name]
            lo, hi = ranges.pop(name)
            graph.bypass(act_node)
            ranges[layer_out] = (0.0, min(hi, bound))
    report.metrics["activations_folded"] = len(folded)
    report.metrics["ranges_shared"] = quant.share_ranges(graph, ranges)
    for node, x_name in gemm_bias:
        if x_name in ranges:
            quant.quantize_bias(graph, node, *ranges[x_name], signed=signed)
    for name, (lo, hi) in ranges.items():
        quant.insert_qdq(graph, name, lo, hi, signed=signed)
    report.metrics["activations_quantized"] = len(ranges)
    report.metrics["calibrator"] = config.calibrator
    report.metrics["activation_type"] = "int8" if signed else "uint8"
    report.metrics["weight_bits"] = wbits
    quant.keep_float(graph)  # else ONNX Runtime quantizes the float layers per tensor itself
    return graph.export(), report


def _layers(graph: Graph, config: QuantizeConfig, report: pb.Report,
            excluded: Collection[str] = (), sensitivity: Mapping[str, float] | None = None,
            slow: Mapping[str, float] | None = None, budget: Collection[str] = ()
            ) -> Iterator[tuple[Any, np.ndarray, int]]:
    """Every layer to quantize, with its weight and output-channel axis; the others are skips.

    ``excluded`` layers stay in float for ``--max-drop`` (``sensitivity``: their error alone),
    ``slow`` ones because int8 measured slower there (their int8 speedup alone).
    """
    slow = slow or {}
    for node in graph.nodes:
        if node.op not in quant.OPS:
            continue
        skip = _check(graph, node, config)
        if skip is None and node.name in slow:
            skip = pb.Skip(node.name, node.op, pb.SkipReason.NO_LATENCY_WIN,
                           f"left in float: int8 measured {slow[node.name]:.2f}x of float for "
                           f"this layer alone on {config.provider} (--no-per-layer-speed "
                           f"quantizes it anyway)")
        elif skip is None and node.name in budget:
            alone = (sensitivity or {}).get(node.name)
            skip = pb.Skip(node.name, node.op, pb.SkipReason.ERROR_TOO_HIGH,
                           f"left in float for --float-budget {config.float_budget}"
                           + (f": output error {alone:.3g} with this layer alone quantized"
                              if alone is not None else ""))
        elif skip is None and node.name in excluded:
            skip = pb.Skip(node.name, node.op, pb.SkipReason.ERROR_TOO_HIGH,
                           f"left in float for --max-drop {config.max_drop}: output error "
                           f"{(sensitivity or {}).get(node.name, float('nan')):.3g} with this "
                           "layer alone quantized")
        if skip is not None:
            report.add_skip(skip)
            continue
        w = graph.const_value(graph.input(node, 1))
        assert w is not None
        yield node, w, quant.out_axis(node)


def _check(graph: Graph, node: Any, config: QuantizeConfig) -> pb.Skip | None:
    def skip(reason: pb.SkipReason, detail: str) -> pb.Skip:
        return pb.Skip(node.name, node.op, reason, detail)

    w = own_float_weight(graph, node, config.exclude)
    if isinstance(w, pb.Skip):
        return w
    if w.size < config.min_params and config.mode != "static":  # static: speed, not size
        return skip(pb.SkipReason.TOO_SMALL, f"{w.size} weights < --min-params {config.min_params}")
    if node.op in ("Gemm", "MatMul") and w.ndim != 2:
        return skip(pb.SkipReason.UNSUPPORTED_ATTRIBUTE, f"{w.ndim}-D weight")
    return None


