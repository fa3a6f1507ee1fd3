"""The shared driver of the decomposition passes: find layers, plan, choose ranks, refit, rewrite.

Every decomposition here replaces one linear layer ``y = W x + b`` (a Conv on its im2col
columns, or a Gemm/MatMul with a constant weight) by a chain of cheaper linear stages whose
last stage is a plain (group 1) Conv or MatMul. The chain up to the last stage is itself
linear in the layer's im2col input, ``z = P x``, so the whole chain computes ``A P x + b``.
That gives three things in closed form from second moments of calibration data:

* the **isolated error** of any plan, before and after a least-squares refit of ``A, b``
  (used to allocate ranks: ``E||A P x + b' - y||^2`` from ``E[x x^T]``);
* the **symmetric refit** (Ridge on the original network's layer inputs);
* the **asymmetric refit** (Zhang et al. 2016, arXiv:1505.06798): features from the already
  compressed upstream network ``x_c``, targets from the original ``y = W x_o + b``, so errors
  do not accumulate; only ``E[x_c x_c^T]`` and ``E[x_c y^T]`` are needed.

Moments are accumulated over a seeded sample of output positions (bounded rows per layer),
so memory is O(D^2) per layer whatever the calibration size.

Ranks: a fixed rank (absolute or fraction) for every layer, or ``auto``: each layer's rank
options are micro-benchmarked on the chosen ONNX Runtime provider (cached per shape), options
that are not measured faster than the original layer are dropped ("no latency win"), and a
Lagrangian allocation picks per-layer options that meet ``target_speedup`` / ``target_macs``
with the least isolated error, each layer's error weighted by its measured sensitivity (how
much of it reaches the model's outputs, :func:`layer_gains`); ``max_error`` bounds the
measured relative error of the model's outputs and ``min_agreement`` the share of calibration
samples whose decisions (argmax of a softmax or logits output) are unchanged (binary search
over the savings).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import bench, calibrate, cost, lowrank, runtime, verify
from onnxcomp.calibrate import Calibration
from onnxcomp.graph import Graph, Node
from onnxcomp.latency_cache import LatencyCache, structure_hash
from onnxcomp.model import copy_model
from onnxcomp.passbase import (
    Change,
    ConfigError,
    PassConfig,
    PassError,
    PassResult,
    Report,
    Skip,
    SkipReason,
)
from onnxcomp.stream import LayerStream

log = logging.getLogger(__name__)

FLOAT_TYPES = (np.float16, np.float32, np.float64)
# ``--rank auto`` with no target and no bound: the fastest ranks within this model error.
DEFAULT_MAX_ERROR = 0.03
# ``--rank auto`` on a model with decision outputs (a classifier's top-1, a recognizer's
# character per step): keep at least this share of the calibration samples' decisions, with
# or without a target.
DEFAULT_MIN_AGREEMENT = 0.97
# Sensitivity probes: calibration samples run (at least, at most: as many as fit the time
# budget in seconds), the isolated error of the option each layer is probed with, and the
# floor of a gain (errors far beyond the probe's stop washing out).
SENSITIVITY_SAMPLES = (8, 32)
SENSITIVITY_SECONDS = 6.0
SENSITIVITY_PROBE_ERROR = 0.05
MIN_GAIN = 0.3
# --rank auto leaves alone layers whose rewrite saves less than this share of the model's
# measured latency (see _drop_unseen_savings).
MIN_MODEL_SAVING = 0.01
# Closed-loop rounds that re-measure the whole model to reach ``target_speedup``.
TARGET_ROUNDS = 4
# Extra whole-model measurements spent looking for a milder pick that still meets the target.
MILDER_ROUNDS = 5
# Relative speed difference treated as measurement noise when comparing whole models.
NOISE = 0.03
# A refit needs this many sampled rows per unknown of each output (see refit_rows_needed).
REFIT_ROWS_PER_UNKNOWN = 10


# ============================================================================ configuration
@dataclasses.dataclass(frozen=True)
class LowRankConfig(PassConfig):
    """Options shared by the decomposition passes.

    ``rank``: ``"auto"``, an absolute rank (int >= 1) or a fraction of the layer's
    break-even rank (0 < f < 1; the rank at which the chain costs as many MACs as the layer).
    """

    rank: str | int | float = "auto"
    target_speedup: float | None = None
    target_macs: float | None = None
    max_error: float | None = None
    # --rank auto, models with decision outputs (verify.decision_outputs): keep at least this
    # share of the calibration samples' decisions (0: no such bound).
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    refit: bool = True
    refit_mode: str = "asymmetric"
    rank_multiple: int = 8
    latency_check: bool = True
    min_layer_speedup: float = 1.05
    # --rank auto uses only options whose micro-benchmarked speedup, in context (see
    # realized: the edge cost a one-layer model pays is taken off), is at least this share of
    # their MAC cut. Timed alone, CP chains on the small Fashion-MNIST VGG layers realize only
    # 0.7 here; in context 0.8-0.95.
    min_realized: float = 0.8
    # --rank auto: weight each layer's error by how much of it reaches the model's outputs
    # (one probe run per layer, see layer_gains).
    sensitivity: bool = True
    # A JSON file of measured latencies read before measuring and written after (see
    # onnxcomp/latency_cache.py): with it a second compile replays the first one's choices.
    latency_cache: str | None = None
    min_macs: int = 1_000_000
    # cp only: "separate" (kh x 1 then 1 x kw depthwise), "merged" (one kh x kw depthwise),
    # "auto" (merged for kernels of at most 9 taps, where it measured faster; see passes/cp.py).
    cp_depthwise: str = "auto"
    # svd of 1x1 convs and FC layers: "data" keeps the principal subspace of the layer's
    # outputs on the calibration data (reduced-rank regression), "weights" the top singular
    # vectors of W alone. Without calibration data both are the weights' SVD.
    basis: str = "data"
    max_rows: int = 16384
    ridge: float = 1e-7
    provider: str = "cpu"
    threads: int = 1
    bench_runs: int = 25
    seed: int = 0
    exclude: tuple[str, ...] = ()
    max_seconds_per_layer: float = 10.0

    def __post_init__(self) -> None:
        rank = self.rank
        if isinstance(rank, str) and rank != "auto":
            try:
                rank = float(rank) if "." in rank else int(rank)
            except ValueError:
                raise ConfigError(f"--rank must be 'auto', an integer or a fraction, "
                                  f"got '{self.rank}'") from None
            object.__setattr__(self, "rank", rank)
        if isinstance(rank, bool):
            raise ConfigError("--rank must be 'auto', an integer or a fraction")
        if isinstance(rank, float):
            if rank.is_integer() and rank >= 1:
                object.__setattr__(self, "rank", int(rank))
            elif not 0 < rank < 1:
                raise ConfigError(f"--rank fraction must be in (0, 1), got {rank}")
        if isinstance(rank, int) and rank < 1:
            raise ConfigError(f"--rank must be >= 1, got {rank}")
        if self.target_speedup is not None and self.target_speedup <= 1.0:
            raise ConfigError(f"--target-speedup must be > 1, got {self.target_speedup}")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ConfigError(f"--target-macs must be in (0, 1], got {self.target_macs}")
        if not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_error is not None and self.max_error <= 0:
            raise ConfigError(f"--max-error must be > 0, got {self.max_error}")
        if self.refit_mode not in ("asymmetric", "symmetric"):
            raise ConfigError(f"refit mode must be asymmetric or symmetric, got "
                              f"'{self.refit_mode}'")
        if self.cp_depthwise not in ("separate", "merged", "auto"):
            raise ConfigError(f"--cp-depthwise must be separate, merged or auto, got "
                              f"'{self.cp_depthwise}'")
        if self.basis not in ("data", "weights"):
            raise ConfigError(f"--basis must be data or weights, got '{self.basis}'")
        if self.rank_multiple < 1:
            raise ConfigError("--rank-multiple must be >= 1")
        if not 0 <= self.min_realized <= 1:
            raise ConfigError(f"--min-realized must be in [0, 1], got {self.min_realized}")
        if self.rank != "auto" and (self.target_speedup or self.target_macs):
            raise ConfigError("--target-speedup/--target-macs need --rank auto")

    @property
    def auto(self) -> bool:
        """True when ranks are chosen automatically."""
        return self.rank == "auto"


# ============================================================================ layers
@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """2-D convolution geometry with explicit pads (top, left, bottom, right)."""

    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    pads: tuple[int, int, int, int]


@dataclasses.dataclass
class Layer:
    """One linear layer a decomposition may replace: ``y = W x + b``."""

    node: Node
    op: str  # Conv | Gemm | MatMul
    weight: np.ndarray  # Conv [O, C, kh, kw]; FC canonical [N, K] (y = W x)
    bias: np.ndarray | None
    geom: ConvGeometry | None
    in_shape: tuple[int, ...]  # without batch: (C, H, W) or (..., K)
    out_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    # Covariance of the layer's input rows (im2col columns) on the calibration data, set
    # before planning; None without data or with fewer than 10 sampled rows per dimension.
    input_cov: np.ndarray | None = None
    # The same from the first and the second half of the calibration samples, to check that a
    # basis fitted on one half still helps on the other (see data_basis_generalizes).
    input_cov_halves: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def name(self) -> str:
        """The node's name."""
        return str(self.node.name)

    @property
    def is_conv(self) -> bool:
        """True for Conv layers."""
        return self.op == "Conv"

    @property
    def matrix(self) -> np.ndarray:
        """``W`` as a matrix [y_dim, x_dim] acting on im2col columns (c, a, b order)."""
        return self.weight.reshape(self.weight.shape[0], -1).astype(np.float64)

    @property
    def bias_vector(self) -> np.ndarray:
        """The bias (zeros when absent)."""
        n = self.weight.shape[0]
        return np.zeros(n) if self.bias is None else self.bias.astype(np.float64).reshape(n)

    @property
    def rows_per_sample(self) -> int:
        """Output positions per sample (pixels for Conv, leading rows for FC)."""
        return int(np.prod(self.out_shape[1:])) if self.is_conv else int(
            np.prod(self.out_shape[:-1]))

    @property
    def macs(self) -> int:
        """MACs per sample."""
        return int(self.rows_per_sample * self.matrix.size)

    @property
    def params(self) -> int:
        """Weights + bias."""
        return int(self.weight.size + (0 if self.bias is None else self.bias.size))


def _conv_geometry(node: Node, in_hw: Sequence[int], kernel: Sequence[int]) -> ConvGeometry:
    strides = [int(v) for v in node.attrs.get("strides", [1, 1])]
    dil = [int(v) for v in node.attrs.get("dilations", [1, 1])]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for ax in range(2):
            out = -(-in_hw[ax] // strides[ax])
            total = max(0, (out - 1) * strides[ax] + (kernel[ax] - 1) * dil[ax] + 1 - in_hw[ax])
            small, big = total // 2, total - total // 2
            pads[ax], pads[ax + 2] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = [int(v) for v in node.attrs.get("pads", [0, 0, 0, 0])]
    return ConvGeometry(int(kernel[0]), int(kernel[1]), strides[0], strides[1], dil[0], dil[1],
                        (pads[0], pads[1], pads[2], pads[3]))


def find_layers(
    graph: Graph,
    shapes: dict[str, tuple[int, ...]],
    ops: Sequence[str],
    config: LowRankConfig,
    report: Report,
) -> list[Layer]:
    """Candidate layers of the given op types; every other candidate is recorded as skipped."""
    layers: list[Layer] = []
    for node in graph.nodes_of(*ops):
        layer_or_skip = make_layer(graph, shapes, node, config)
        if isinstance(layer_or_skip, Skip):
            report.add_skip(layer_or_skip)
        else:
            layers.append(layer_or_skip)
    return layers


def own_float_weight(graph: Graph, node: Node, exclude: Sequence[str] = ()
                     ) -> np.ndarray | Skip:
    """``node``'s weight (input 1), or why it cannot be rewritten.

    The weight must be a constant float read by ``node`` alone, and the node not excluded.
    """
    def skip(reason: SkipReason, detail: str) -> Skip:
        return Skip(node.name, node.op, reason, detail)

    if node.name in exclude:
        return skip(SkipReason.USER_EXCLUDED, "--exclude")
    w_t = graph.input(node, 1)
    w = graph.const_value(w_t)
    if w is None or w_t is None:
        return skip(SkipReason.NOT_CONSTANT, "weight is not a constant (already quantized?)")
    if w.dtype.type not in FLOAT_TYPES:
        return skip(SkipReason.UNSUPPORTED_DTYPE, str(w.dtype))
    if graph.is_shared(w_t, [node]):
        return skip(SkipReason.SHARED_WEIGHT, f"{w_t.name} is read by another node")
    return w


def skip_pointwise(layer: Layer, detail: str = "1x1 kernel: use --pass svd") -> Skip | None:
    """A skip for 1x1 convs (methods that need a spatial kernel), else None."""
    g = layer.geom
    assert g is not None
    if g.kh * g.kw == 1:
        return Skip(layer.name, layer.op, SkipReason.UNSUPPORTED_ATTRIBUTE, detail)
    return None


def make_layer(graph: Graph, shapes: dict[str, tuple[int, ...]], node: Node,
               config: LowRankConfig) -> Layer | Skip:
    """``node`` as a :class:`Layer` (``y = W x + b``), or why it cannot be one."""

    def skip(reason: SkipReason, detail: str = "") -> Skip:
        return Skip(node.name, node.op, reason, detail)

    weight_skip = own_float_weight(graph, node, config.exclude)
    if isinstance(weight_skip, Skip):
        return weight_skip
    w = weight_skip
    b_t = graph.input(node, 2)
    b = graph.const_value(b_t) if b_t is not None else None
    if b_t is not None and b is None:
        return skip(SkipReason.NOT_CONSTANT, "bias is not constant")
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    if x_name not in shapes or y_name not in shapes:
        return skip(SkipReason.UNKNOWN_SHAPE, "static shapes unknown (give --calib)")
    in_shape, out_shape = shapes[x_name][1:], shapes[y_name][1:]
    if node.op == "Conv":
        if w.ndim != 4:
            return skip(SkipReason.UNSUPPORTED_ATTRIBUTE, f"{w.ndim - 2}-D conv (2-D only)")
        if int(node.attrs.get("group", 1)) != 1:
            return skip(SkipReason.GROUPED, f"group={node.attrs.get('group')}")
        geom = _conv_geometry(node, in_shape[1:], w.shape[2:])
        layer = Layer(node, "Conv", w, b, geom, in_shape, out_shape, w.dtype)
    else:
        fc = _fc_weight(node, w, b)
        if isinstance(fc, str):
            return skip(SkipReason.UNSUPPORTED_ATTRIBUTE, fc)
        wm, bias = fc
        layer = Layer(node, node.op, wm, bias, None, in_shape, out_shape, w.dtype)
    if layer.macs < config.min_macs:
        return skip(SkipReason.TOO_SMALL, f"{layer.macs} MACs < {config.min_macs}")
    return layer


def _fc_weight(node: Node, w: np.ndarray, b: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray | None] | str:
    """Canonical [N, K] weight and [N] bias of a Gemm/MatMul, or why it is unsupported."""
    if w.ndim != 2:
        return f"{w.ndim}-D weight"
    if node.op == "MatMul":
        return w.T.copy(), None
    if int(node.attrs.get("transA", 0)):
        return "transA=1"
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    wm = (w if int(node.attrs.get("transB", 0)) else w.T) * alpha
    if b is not None:
        if b.size not in (1, wm.shape[0]):
            return f"bias shape {b.shape} is not per output"
        b = np.broadcast_to(b.reshape(-1) * beta, (wm.shape[0],)).copy()
    return wm.astype(w.dtype), b


# ============================================================================ plans
@dataclasses.dataclass
class Stage:
    """One linear stage of a replacement chain."""

    kind: str  # "conv" or "matmul"
    weight: np.ndarray  # conv [o, i/g, kh, kw]; matmul canonical [N, K]
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    suffix: str = ""


@dataclasses.dataclass
class Plan:
    """A replacement chain for one layer: ``y ~ A (P x) + b`` with stages computing ``P x``.

    ``prefix`` is ``P`` [F, x_dim]; ``last`` is ``A`` [y_dim, F] laid out as the last stage's
    weight; ``last_shape`` is that stage's weight shape (conv) so ``A`` can be written back.
    """

    method: str
    ranks: tuple[int, ...]
    stages: list[Stage]  # the prefix stages; the last stage is built from ``last``
    last_attrs: dict[str, Any]
    last_shape: tuple[int, ...]
    prefix: np.ndarray
    last: np.ndarray
    weight_error: float
    macs: int
    params: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Method(Protocol):
    """A decomposition method (cp, tucker, svd, ...)."""

    name: str
    ops: tuple[str, ...]

    def check(self, layer: Layer) -> Skip | None:
        """Why this method cannot decompose ``layer``, or None."""
        ...

    def rank_options(self, layer: Layer, config: LowRankConfig) -> list[tuple[int, ...]]:
        """Candidate ranks in increasing order of cost, all cheaper than the layer in MACs."""
        ...

    def fixed_rank(self, layer: Layer, config: LowRankConfig) -> tuple[int, ...]:
        """The rank for ``--rank N`` / ``--rank f``."""
        ...

    def plan(self, layer: Layer, ranks: tuple[int, ...], config: LowRankConfig) -> Plan:
        """The factorization at ``ranks``."""
        ...


def round_up(value: float, multiple: int) -> int:
    """``value`` rounded to the nearest multiple (at least one multiple)."""
    return max(multiple, int(round(value / multiple)) * multiple)


# ============================================================================ statistics
@dataclasses.dataclass
class Moments:
    """Second moments of ``x~ = [x; 1]`` (and optionally ``E[x~ y^T]``) over sampled rows."""

    xx: np.ndarray
    xy: np.ndarray | None
    yy: float
    rows: int
    second: Moments | None = None  # the second half of the samples' share (collect_original)

    def normalized(self) -> tuple[np.ndarray, np.ndarray | None, float]:
        """Means instead of sums."""
        n = max(self.rows, 1)
        return self.xx / n, None if self.xy is None else self.xy / n, self.yy / n


class _Sampler:
    """Seeded output positions per (layer, sample), identical across model runs."""

    def __init__(self, layer_index: int, layer: Layer, per_sample: int, seed: int) -> None:
        self.layer_index = layer_index
        self.total = layer.rows_per_sample
        self.count = min(per_sample, self.total)
        self.seed = seed

    def positions(self, sample: int) -> np.ndarray:
        if self.count == self.total:
            return np.arange(self.total)
        rng = np.random.default_rng([self.seed, self.layer_index, sample])
        return np.sort(rng.choice(self.total, self.count, replace=False))


def im2col_rows(x: np.ndarray, layer: Layer, positions: np.ndarray) -> np.ndarray:
    """Rows [P, x_dim] of the layer's im2col input at flat output ``positions`` of one sample."""
    if not layer.is_conv:
        return x.reshape(-1, x.shape[-1])[positions].astype(np.float64)
    g = layer.geom
    assert g is not None
    _, ho, wo = layer.out_shape
    c = x.shape[0]
    xp = np.pad(x, ((0, 0), (g.pads[0], g.pads[2]), (g.pads[1], g.pads[3])))
    oi, oj = np.divmod(positions, wo)
    rows = oi[:, None] * g.sh + np.arange(g.kh)[None, :] * g.dh  # [P, kh]
    cols = oj[:, None] * g.sw + np.arange(g.kw)[None, :] * g.dw  # [P, kw]
    patches = xp[:, rows[:, :, None], cols[:, None, :]]  # [C, P, kh, kw]
    return patches.transpose(1, 0, 2, 3).reshape(len(positions), c * g.kh * g.kw).astype(
        np.float64)


def output_rows(y: np.ndarray, layer: Layer, positions: np.ndarray) -> np.ndarray:
    """Rows [P, y_dim] of the layer's output at flat ``positions`` of one sample."""
    if layer.is_conv:
        return y.reshape(y.shape[0], -1)[:, positions].T.astype(np.float64)
    return y.reshape(-1, y.shape[-1])[positions].astype(np.float64)


def _augment(rows: np.ndarray) -> np.ndarray:
    return np.hstack([rows, np.ones((rows.shape[0], 1))])


def collect_original(
    model: onnx.ModelProto, layers: Sequence[Layer], calib: Calibration, config: LowRankConfig,
    halves: bool = False,
) -> tuple[list[Moments], list[list[np.ndarray]]]:
    """One run of the original model: per layer ``E[x~ x~^T]`` and the sampled target rows."""
    names = []
    for layer in layers:
        names += [layer.node.inputs[0].name, layer.node.outputs[0].name]
    per_sample = max(1, config.max_rows // max(calib.num_samples, 1))
    samplers = [_Sampler(i, layer, per_sample, config.seed) for i, layer in enumerate(layers)]
    moments = [Moments(np.zeros((_xdim(layer) + 1,) * 2), None, 0.0, 0) for layer in layers]
    second = [Moments(np.zeros((_xdim(layer) + 1,) * 2), None, 0.0, 0) for layer in layers]
    # Halves are contiguous, not alternate samples: calibration sets come in runs of related
    # samples (crops of one photo, files of one folder), and a basis that only holds within
    # such a run must fail the check, not pass it on both sides of every run.
    middle = calib.num_samples // 2
    targets: list[list[np.ndarray]] = [[] for _ in layers]
    sample = 0
    for batch in calibrate.iter_capture(model, list(dict.fromkeys(names)), calib):
        n = next(iter(batch.values())).shape[0]
        for li, layer in enumerate(layers):
            x = batch[layer.node.inputs[0].name]
            y = batch[layer.node.outputs[0].name]
            for s in range(n):
                pos = samplers[li].positions(sample + s)
                xr = _augment(im2col_rows(x[s], layer, pos))
                yr = output_rows(y[s], layer, pos)
                m = moments[li]
                gram = xr.T @ xr
                m.xx += gram
                m.yy += float(np.sum(yr * yr))
                m.rows += len(pos)
                if halves and sample + s >= middle:
                    second[li].xx += gram
                    second[li].rows += len(pos)
                targets[li].append(yr.astype(np.float32))
        sample += n
    if halves:
        for m, o in zip(moments, second, strict=True):
            m.second = o
    return moments, targets


def collect_compressed(
    stream: LayerStream, model: onnx.ModelProto, layer_index: int, layer: Layer,
    targets: list[np.ndarray], config: LowRankConfig,
) -> Moments:
    """``E[x_c~ x_c~^T]`` and ``E[x_c~ y^T]`` of a layer's input in the compressed model.

    The input comes from ``stream``: only what ``model`` has not computed yet runs.
    """
    per_sample = max(1, config.max_rows // max(stream.calib.num_samples, 1))
    sampler = _Sampler(layer_index, layer, per_sample, config.seed)
    d = _xdim(layer) + 1
    m = Moments(np.zeros((d, d)), np.zeros((d, layer.weight.shape[0])), 0.0, 0)
    sample = 0
    for x in stream.batches(model, layer.node.inputs[0].name):
        for s in range(x.shape[0]):
            pos = sampler.positions(sample + s)
            xr = _augment(im2col_rows(x[s], layer, pos))
            yr = targets[sample + s].astype(np.float64)
            m.xx += xr.T @ xr
            assert m.xy is not None
            m.xy += xr.T @ yr
            m.yy += float(np.sum(yr * yr))
            m.rows += len(pos)
        sample += x.shape[0]
    return m


def input_covariance(m: Moments) -> np.ndarray:
    """Covariance of ``x`` from the second moments of ``x~ = [x; 1]``."""
    xx, _, _ = m.normalized()
    mean = xx[-1, :-1] / max(xx[-1, -1], 1e-30)
    return np.asarray(xx[:-1, :-1] - np.outer(mean, mean) * xx[-1, -1])


class OutputBases:
    """Output bases (:func:`lowrank.output_basis`) of the layer being planned.

    Cached across its rank options: from the full calibration covariance (``half`` -1) or
    from one half of the samples (0, 1).
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def get(self, layer: Layer, half: int) -> np.ndarray:
        """The basis of ``layer`` for ``half`` (-1: all samples)."""
        key = (layer.name, half)
        if key not in self._cache:
            if not any(k[0] == layer.name for k in self._cache):
                self._cache = {}  # keep only the current layer's
            halves = layer.input_cov_halves
            cov = layer.input_cov if half < 0 or halves is None else halves[half]
            assert cov is not None
            self._cache[key] = lowrank.output_basis(layer.matrix, cov)
        return self._cache[key]


def data_basis_generalizes(matrix: np.ndarray, halves: tuple[np.ndarray, np.ndarray] | None,
                           fit: Callable[[np.ndarray | None, int], np.ndarray]) -> bool:
    """True when a data-fitted approximation beats the weights-only one on unseen data.

    Two-fold: fitted on one half of the calibration samples, measured (output error) on the
    other, summed over both ways. ``fit(cov, half)`` returns the approximated matrix fitted
    with input covariance ``cov`` (``None``: from the weights alone); ``half`` (0, 1; -1 for
    ``None``) lets it cache. A basis chosen from a few dozen images can describe those images
    rather than the data: on
    MobileNetV2 one such layer measured 0.086 output error on the calibration photos and 0.31
    on held-out ones. Without halves (too little data) the answer is False.
    """
    if halves is None:
        return False

    def err(approx: np.ndarray, cov: np.ndarray) -> float:
        d = matrix - approx
        return float(np.sum((d @ cov) * d))

    weights = fit(None, -1)
    data = sum(err(fit(halves[i], i), halves[1 - i]) for i in (0, 1))
    return data < sum(err(weights, h) for h in halves)


def _xdim(layer: Layer) -> int:
    return int(layer.matrix.shape[1])


# ============================================================================ refit math
def _aug_prefix(p: np.ndarray) -> np.ndarray:
    f, d = p.shape
    out = np.zeros((f + 1, d + 1))
    out[:f, :d] = p
    out[f, d] = 1.0
    return out


def _target_matrix(layer: Layer) -> np.ndarray:
    return np.hstack([layer.matrix, layer.bias_vector[:, None]])


def refit_solution(
    layer: Layer, plan: Plan, xx: np.ndarray, xy: np.ndarray | None, ridge: float
) -> np.ndarray:
    """Least-squares ``[A, b]`` [y_dim, F+1] minimizing ``E||A z + b - y||^2``.

    ``xx`` is ``E[x~ x~^T]`` of the layer input the chain will see; ``xy`` is ``E[x~ y^T]``
    (None: symmetric, ``y = W x + b`` on the same inputs).
    """
    pa = _aug_prefix(plan.prefix)
    gram = pa @ xx @ pa.T
    cross = pa @ (xx @ _target_matrix(layer).T if xy is None else xy)  # [F+1, y_dim]
    reg = ridge * float(np.trace(gram[:-1, :-1])) / max(gram.shape[0] - 1, 1)
    eye = np.eye(gram.shape[0])
    eye[-1, -1] = 0.0  # the bias is not regularized
    gram = gram + reg * eye
    try:
        sol = np.linalg.solve(gram, cross)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(gram, cross, rcond=None)[0]
    return np.asarray(sol.T)


def refit_rows_needed(plan: Plan) -> int:
    """Sampled rows a refit of ``plan`` needs: :data:`REFIT_ROWS_PER_UNKNOWN` per unknown.

    Each output's refit has ``F + 1`` unknowns (``F`` = the chain's width before its last
    stage). With fewer rows the least squares interpolates the calibration data and
    generalizes badly (a 1280-wide FC layer refit on 32 samples matched them to 4e-5 and
    lost every held-out prediction), so the raw decomposition is kept instead.
    """
    return REFIT_ROWS_PER_UNKNOWN * (int(plan.prefix.shape[0]) + 1)


def optimism(plan: Plan, rows: int) -> float:
    """Factor from in-sample to expected out-of-sample RMS error of a least-squares refit.

    For ordinary least squares with ``p`` unknowns and ``n`` rows, the expected residual is
    ``s^2 (1 - p/n)`` on the fitted rows and ``s^2 (1 + p/n)`` on new ones.
    """
    ratio = (int(plan.prefix.shape[0]) + 1) / max(rows, 1)
    if ratio >= 1:
        return float("inf")
    return float(np.sqrt((1 + ratio) / (1 - ratio)))


def plan_error(layer: Layer, plan: Plan, ab: np.ndarray, xx: np.ndarray,
               xy: np.ndarray | None, yy: float) -> float:
    """Relative RMS error ``sqrt(E||A z + b - y||^2 / E||y||^2)`` from moments."""
    pa = _aug_prefix(plan.prefix)
    m = ab @ pa  # [y_dim, D+1]: the chain as a map of x~
    quad = float(np.sum((m @ xx) * m))
    cross = float(np.sum(m * (xx @ _target_matrix(layer).T).T)) if xy is None else float(
        np.sum(m.T * xy))
    if xy is None:
        t = _target_matrix(layer)
        yy = float(np.sum((t @ xx) * t))
    err = max(quad - 2 * cross + yy, 0.0)
    return float(np.sqrt(err / yy)) if yy > 0 else float(np.sqrt(err))


def plan_ab(layer: Layer, plan: Plan) -> np.ndarray:
    """The plan's own ``[A, b]`` (no refit)."""
    return np.hstack([plan.last, layer.bias_vector[:, None]])


# ============================================================================ ONNX building
def _np_dtype(layer: Layer) -> np.dtype[Any]:
    return np.dtype(layer.dtype)


def build_chain(graph: Graph, layer: Layer, plan: Plan, ab: np.ndarray, pass_name: str) -> None:
    """Replace ``layer`` in ``graph`` by the plan's stages and a last stage ``ab``."""
    node = layer.node
    x, y = node.inputs[0], node.outputs[0]
    graph.retire([node])
    _write_chain(graph, layer, plan, ab, x, y, pass_name)


def _write_chain(graph: Graph, layer: Layer, plan: Plan, ab: np.ndarray, x: Any, y: Any,
                 pass_name: str) -> None:
    """Add the plan's stages and a last stage ``ab`` computing ``y`` from ``x``."""
    dtype = _np_dtype(layer)
    props = {"method": plan.method, "rank": "x".join(str(r) for r in plan.ranks)}
    current = x
    for i, st in enumerate(plan.stages):
        out = graph.variable(f"{layer.node.name}_{st.suffix or i}", dtype=dtype)
        _add_stage(graph, layer, st, current, out, None, pass_name, props)
        current = out
    last_w = ab[:, :-1].reshape(plan.last_shape)
    last = Stage("conv" if layer.is_conv else "matmul", last_w, plan.last_attrs, "last")
    _add_stage(graph, layer, last, current, y, ab[:, -1], pass_name, props)


def _add_stage(graph: Graph, layer: Layer, st: Stage, x: Any, y: Any, bias: np.ndarray | None,
               pass_name: str, props: dict[str, Any]) -> None:
    dtype = _np_dtype(layer)
    origin = layer.name
    if st.kind == "conv":
        inputs = [x, graph.constant(f"{origin}_{st.suffix}_W", st.weight.astype(dtype))]
        if bias is not None:
            inputs.append(graph.constant(f"{origin}_{st.suffix}_B", bias.astype(dtype)))
        attrs = dict(st.attrs)
        attrs.setdefault("kernel_shape", list(st.weight.shape[2:]))
        graph.add_node("Conv", inputs, [y], pass_name=pass_name, origin=origin, attrs=attrs,
                       props=props, suffix=st.suffix)
        return
    w = graph.constant(f"{origin}_{st.suffix}_W", st.weight.T.astype(dtype))  # [K, N]
    if bias is None:
        graph.add_node("MatMul", [x, w], [y], pass_name=pass_name, origin=origin, props=props,
                       suffix=st.suffix)
        return
    b = graph.constant(f"{origin}_{st.suffix}_B", bias.astype(dtype))
    if layer.op == "Gemm":
        graph.add_node("Gemm", [x, w, b], [y], pass_name=pass_name, origin=origin, props=props,
                       suffix=st.suffix)
        return
    mid = graph.variable(f"{origin}_{st.suffix}_mm", dtype=dtype)
    graph.add_node("MatMul", [x, w], [mid], pass_name=pass_name, origin=origin, props=props,
                   suffix=st.suffix)
    graph.add_node("Add", [mid, b], [y], pass_name=pass_name, origin=origin, props=props,
                   suffix=f"{st.suffix}_bias")


def standalone(layer: Layer, plan: Plan | None, ir_version: int, opsets: Sequence[Any],
               copies: int = 1) -> onnx.ModelProto:
    """A one-layer model (the original layer, or the plan's chain) for micro-benchmarks.

    ``copies`` > 1 (the original layer only, when its output has its input's shape) chains
    that many copies of it.
    """
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
    x = helper.make_tensor_value_info("x", elem, [1, *layer.in_shape])
    y = helper.make_tensor_value_info("y", elem, [1, *layer.out_shape])
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, shape: Sequence[int]) -> str:
        inits.append(numpy_helper.from_array(
            rng.standard_normal(shape).astype(np.float32) * 0.1, name))
        return name

    def add(kind: str, wshape: Sequence[int], attrs: dict[str, Any], src: str, dst: str,
            bias: bool, i: int) -> None:
        if kind == "conv":
            ins = [src, init(f"w{i}", wshape)] + ([init(f"b{i}", [wshape[0]])] if bias else [])
            nodes.append(helper.make_node("Conv", ins, [dst], **attrs))
        elif layer.op == "Gemm" and bias:
            nodes.append(helper.make_node("Gemm", [src, init(f"w{i}", wshape[::-1]),
                                                   init(f"b{i}", [wshape[0]])], [dst]))
        else:
            mid = dst if not bias else f"mm{i}"
            nodes.append(helper.make_node("MatMul", [src, init(f"w{i}", wshape[::-1])], [mid]))
            if bias:
                nodes.append(helper.make_node("Add", [mid, init(f"b{i}", [wshape[0]])], [dst]))

    if plan is None:
        attrs = _layer_attrs(layer)
        for i in range(copies):
            add("conv" if layer.is_conv else "matmul", layer.weight.shape, attrs,
                "x" if i == 0 else f"c{i - 1}", "y" if i == copies - 1 else f"c{i}", True, i)
    else:
        src = "x"
        for i, st in enumerate(plan.stages):
            dst = f"t{i}"
            attrs = dict(st.attrs)
            if st.kind == "conv":
                attrs.setdefault("kernel_shape", list(st.weight.shape[2:]))
            add(st.kind, st.weight.shape, attrs, src, dst, False, i)
            src = dst
        attrs = dict(plan.last_attrs)
        if layer.is_conv:
            attrs.setdefault("kernel_shape", list(plan.last_shape[2:]))
        add("conv" if layer.is_conv else "matmul", plan.last_shape, attrs, src, "y", True, 99)
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=list(opsets))
    model.ir_version = ir_version
    return model


def _layer_attrs(layer: Layer) -> dict[str, Any]:
    if not layer.is_conv:
        return {}
    g = layer.geom
    assert g is not None
    return {"kernel_shape": [g.kh, g.kw], "strides": [g.sh, g.sw], "dilations": [g.dh, g.dw],
            "pads": list(g.pads)}


_LATENCY_CACHE: dict[tuple[Any, ...], tuple[float, float]] = {}


def measure_plan(layer: Layer, plan: Plan, model: onnx.ModelProto, config: LowRankConfig,
                 cache: LatencyCache | None = None) -> tuple[float, float]:
    """(original ms, plan ms) of the layer alone on the provider; cached per shape."""
    key = (plan.method, layer.op, layer.weight.shape, layer.in_shape, layer.out_shape,
           layer.geom, plan.ranks, plan.last_shape, config.provider, config.threads,
           tuple((st.weight.shape, repr(sorted(st.attrs.items()))) for st in plan.stages))
    file_key = f"layer {key!r}"
    if cache is not None and (hit := cache.get(file_key)) is not None:
        _LATENCY_CACHE[key] = (float(hit[0]), float(hit[1]))
        return _LATENCY_CACHE[key]
    if key not in _LATENCY_CACHE:
        a = standalone(layer, None, model.ir_version, model.opset_import)
        b = standalone(layer, plan, model.ir_version, model.opset_import)
        cfg = bench.BenchConfig(provider=config.provider, threads=config.threads, warmup=3,
                                runs=config.bench_runs)
        res = bench.benchmark([a, b], cfg)
        _LATENCY_CACHE[key] = (res.models[0].median_ms,
                               res.models[0].median_ms / res.speedups[0].median)
    if cache is not None:
        cache.put(file_key, list(_LATENCY_CACHE[key]))
    return _LATENCY_CACHE[key]


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


_EDGE_CACHE: dict[tuple[Any, ...], float] = {}


def _edges_from_copies(key: tuple[Any, ...], build: Callable[[int], onnx.ModelProto],
                       config: LowRankConfig, cache: LatencyCache | None) -> float:
    """Edge cost (ms) from timing 1 and 3 chained copies: t(1) - (t(3) - t(1)) / 2; cached."""
    full_key = (*key, config.provider, config.threads)
    file_key = f"edge {full_key!r}"
    if cache is not None and (hit := cache.get(file_key)) is not None:
        _EDGE_CACHE[full_key] = float(hit[0])
        return _EDGE_CACHE[full_key]
    if full_key not in _EDGE_CACHE:
        cfg = bench.BenchConfig(provider=config.provider, threads=config.threads, warmup=3,
                                runs=config.bench_runs)
        res = bench.benchmark([build(1), build(3)], cfg)
        t1, t3 = res.models[0].median_ms, res.models[1].median_ms
        _EDGE_CACHE[full_key] = min(max(t1 - max(t3 - t1, 0.0) / 2, 0.0), t1)
    if cache is not None:
        cache.put(file_key, [_EDGE_CACHE[full_key]])
    return _EDGE_CACHE[full_key]


def edge_ms(shape: Sequence[int], model: onnx.ModelProto, config: LowRankConfig,
            cache: LatencyCache | None = None) -> float:
    """What a one-layer model on a tensor of ``shape`` pays at its edges, in ms.

    A layer timed alone pays costs a layer inside a network does not: the conversion into and
    out of the provider's blocked layout (ONNX Runtime CPU), per-run overhead. Timing 1 and 3
    copies of a cheap layer separates them.
    """
    return _edges_from_copies(
        (tuple(shape),),
        lambda n: _edge_model(shape, n, model.ir_version, model.opset_import), config, cache)


def layer_edges_ms(layer: Layer, model: onnx.ModelProto, config: LowRankConfig,
                   cache: LatencyCache | None = None) -> float:
    """Edge cost of a one-layer model of ``layer``.

    When the layer keeps its input's shape, from 1 and 3 chained copies of the layer itself;
    otherwise from cheap stand-in layers, half the input's edges and half the output's.
    """
    if tuple(layer.in_shape) != tuple(layer.out_shape):
        return 0.5 * (edge_ms(layer.in_shape, model, config, cache)
                      + edge_ms(layer.out_shape, model, config, cache))
    return _edges_from_copies(
        ("layer", layer.op, layer.weight.shape, tuple(layer.in_shape), layer.geom),
        lambda n: standalone(layer, None, model.ir_version, model.opset_import, copies=n),
        config, cache)


# ============================================================================ the driver
@dataclasses.dataclass
class Option:
    """One rank option of one layer, with its measured costs and isolated errors."""

    plan: Plan
    error: float  # isolated relative error after symmetric refit (or raw without refit)
    raw_error: float
    base_ms: float
    ms: float
    edges_ms: float = 0.0  # what the one-layer models pay at their edges (both alike)

    @property
    def saved_ms(self) -> float:
        """Latency saved on this layer (ms)."""
        return self.base_ms - self.ms


@dataclasses.dataclass
class LayerChoice:
    """Per-layer options for the allocation."""

    layer: Layer
    index: int
    options: list[Option]
    gain: float = 1.0  # model output error per unit of this layer's isolated error


def _option(layer: Layer, plan: Plan, m: Moments, model: onnx.ModelProto,
            config: LowRankConfig, measure: bool) -> Option:
    xx, _, _ = m.normalized()
    raw = plan_error(layer, plan, plan_ab(layer, plan), xx, None, 0.0)
    err = raw
    if config.refit and m.rows >= refit_rows_needed(plan):
        ab = refit_solution(layer, plan, xx, None, config.ridge)
        err = min(raw, plan_error(layer, plan, ab, xx, None, 0.0) * optimism(plan, m.rows))
    base_ms, ms = measure_plan(layer, plan, model, config) if measure else (0.0, 0.0)
    return Option(plan, err, raw, base_ms, ms)


def _measure_options(layer: Layer, options: list[Option], model: onnx.ModelProto,
                     config: LowRankConfig, cache: LatencyCache | None = None) -> None:
    """Time the options cheapest first; once one is not faster, costlier ones are not timed.

    A chain's latency grows with its rank, so an option that loses to the original layer
    means every costlier option would too: they are marked not faster without measuring.
    """
    lost, base = False, 0.0
    edges = layer_edges_ms(layer, model, config, cache) if options else 0.0
    for opt in sorted(options, key=lambda o: o.plan.macs):
        opt.edges_ms = edges
        if lost:
            opt.base_ms, opt.ms = base, float("inf")
            continue
        opt.base_ms, opt.ms = measure_plan(layer, opt.plan, model, config, cache)
        base = opt.base_ms
        lost = opt.base_ms < config.min_layer_speedup * opt.ms


def run_decomposition(
    method: Method,
    model: onnx.ModelProto,
    config: LowRankConfig,
    calib: Calibration | None,
    pass_name: str,
    progress: Callable[[str], None] | None = None,
) -> PassResult:
    """Decompose ``model``'s layers with ``method`` per ``config``; see the module docstring."""
    start = time.perf_counter()
    report = Report(pass_name)
    if calib is None:
        calib = calibrate.synthetic_calibration(model, num_samples=8)
    if calib.synthetic:
        report.notes.append("synthetic calibration: ranks and refits come from random inputs "
                            "(weights alone); give --calib for meaningful results")
    shapes = static_shapes(model, calib)
    graph = Graph(model)
    layers = find_layers(graph, shapes, method.ops, config, report)
    kept: list[Layer] = []
    for layer in layers:
        skip = method.check(layer)
        if skip is not None:
            report.add_skip(skip)
        else:
            kept.append(layer)
    if not kept:
        report.notes.append(f"no layer to decompose with {method.name}")
        return PassResult(copy_model(model), report)
    cache = (LatencyCache(Path(config.latency_cache), config.provider, config.threads)
             if config.latency_cache else None)
    data_basis = (getattr(method, "data_basis", False) and config.basis == "data"
                  and not calib.synthetic)
    moments, targets = collect_original(model, kept, calib, config, halves=data_basis)
    if data_basis:
        for layer, m in zip(kept, moments, strict=True):
            # A covariance from fewer rows than REFIT_ROWS_PER_UNKNOWN per dimension (an FC
            # layer gets one row per sample) describes the calibration samples, not the data:
            # such layers keep the weights' own basis.
            if m.rows >= REFIT_ROWS_PER_UNKNOWN * _xdim(layer):
                layer.input_cov = input_covariance(m)
                o = m.second
                if o is not None and 0 < o.rows < m.rows:
                    first = Moments(m.xx - o.xx, None, 0.0, m.rows - o.rows)
                    layer.input_cov_halves = (input_covariance(first), input_covariance(o))

    choices: list[LayerChoice] = []
    for i, layer in enumerate(kept):
        if progress:
            progress(f"{pass_name}: planning {layer.name}")
        if config.auto:
            ranks_list = method.rank_options(layer, config)
        else:
            ranks_list = [method.fixed_rank(layer, config)]
        options = []
        for ranks in ranks_list:
            plan = method.plan(layer, ranks, config)
            if plan.extra.get("degenerate"):
                continue
            options.append(_option(layer, plan, moments[i], model, config, measure=False))
        if config.latency_check:
            _measure_options(layer, options, model, config, cache)
        choices.append(LayerChoice(layer, i, options))

    probes = _Probes(model, kept, moments, targets, calib, config, cache)
    chosen = _allocate(choices, probes, config, report)
    final_model, changes = _build(model, chosen, kept, moments, targets, calib, config,
                                  pass_name, progress)
    if changes and config.latency_check:
        if progress:
            progress(f"{pass_name}: timing the whole model")
        # The same structure as a measured probe (only refit weights differ): reuse its time.
        speedup = probes.measured(chosen)
        if speedup is None:
            speedup = probes.speedup_of(final_model)
        report.metrics["measured_speedup"] = round(speedup, 3)
        if speedup < 1.0:
            report.notes.append(
                f"the rewritten model measured {speedup:.2f}x (slower) as a whole on "
                f"{config.provider}: nothing applied")
            for change in changes:
                report.skip(change.node, change.op_type, SkipReason.NO_LATENCY_WIN,
                            f"whole model measured {speedup:.2f}x")
            changes = []
    for change in changes:
        report.apply(change)
    if cache is not None:
        cache.save()
        report.metrics["latency_cache"] = cache.stats()
    report.metrics["seconds"] = round(time.perf_counter() - start, 2)
    if not changes:
        return PassResult(copy_model(model), report)
    return PassResult(final_model, report)


class _Probes:
    """Candidate models built during the allocation, with measured speedups and errors.

    Probes use the symmetric refit (closed form, no activation capture); results are cached
    per choice of options.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], moments: list[Moments],
                 targets: list[list[np.ndarray]], calib: Calibration,
                 config: LowRankConfig, cache: LatencyCache | None = None) -> None:
        self.model, self.layers, self.moments, self.targets = model, layers, moments, targets
        self.cache = cache
        self._structure = structure_hash(model) if cache is not None else ""
        self.calib = calib
        self.config = dataclasses.replace(config, refit_mode="symmetric")
        self.feeds = {k: v[:1] for k, v in calib.batches[0].items()}
        self._built: dict[tuple[Any, ...], onnx.ModelProto] = {}
        self._speedup: dict[tuple[Any, ...], float] = {}
        self._fidelity: dict[tuple[Any, ...], tuple[float, float | None]] = {}
        self._ref: tuple[list[str], list[np.ndarray]] | None = None
        self._model_ms: float | None = None
        self.decisions = verify.calibrated_decisions(model, calib)

    def model_ms(self) -> float:
        """The model's measured latency (ms), once per compile (and per latency cache)."""
        if self._model_ms is None:
            self._model_ms = self.cached("model_ms", lambda: bench.time_model(
                self.model, self.feeds, self.config.provider, self.config.threads,
                runs=self.config.bench_runs))
        return self._model_ms

    @staticmethod
    def key(chosen: dict[int, Option]) -> tuple[Any, ...]:
        return tuple(sorted((i, o.plan.method, o.plan.ranks) for i, o in chosen.items()))

    def build(self, chosen: dict[int, Option]) -> onnx.ModelProto:
        k = self.key(chosen)
        if k not in self._built:
            self._built[k], _ = _build(self.model, chosen, self.layers, self.moments,
                                       self.targets, self.calib, self.config, "probe", None)
        return self._built[k]

    def speedup_of(self, candidate: onnx.ModelProto) -> float:
        key = ""
        if self.cache is not None:
            key = f"speedup {self._structure} {structure_hash(candidate)}"
            if (hit := self.cache.get(key)) is not None:
                return float(hit)
        cfg = bench.BenchConfig(provider=self.config.provider, threads=self.config.threads,
                                warmup=5, runs=max(self.config.bench_runs, 30))
        res = bench.benchmark([self.model, candidate], cfg, inputs=self.feeds)
        value = float(res.speedups[0].median)
        if self.cache is not None:
            self.cache.put(key, value)
        return value

    def cached(self, what: str, measure: Callable[[], float]) -> float:
        """``measure()``, or its value recorded for this model in the latency cache."""
        if self.cache is None:
            return measure()
        key = f"{what} {self._structure}"
        if (hit := self.cache.get(key)) is not None:
            return float(hit)
        value = measure()
        self.cache.put(key, value)
        return value

    def measured(self, chosen: dict[int, Option]) -> float | None:
        """The whole-model speedup already measured for ``chosen``, if any."""
        return self._speedup.get(self.key(chosen))

    def speedup(self, chosen: dict[int, Option]) -> float:
        k = self.key(chosen)
        if k not in self._speedup:
            self._speedup[k] = 1.0 if not chosen else self.speedup_of(self.build(chosen))
        return self._speedup[k]

    def fidelity(self, chosen: dict[int, Option]) -> tuple[float, float | None]:
        """(relative output error, decision agreement or None) of ``chosen``.

        Both on the calibration data; the agreement is None without decision outputs.
        """
        k = self.key(chosen)
        if k not in self._fidelity:
            if not chosen:
                self._fidelity[k] = (0.0, 1.0 if self.decisions else None)
            else:
                if self._ref is None:
                    self._ref = _outputs(self.model, self.calib)
                names, ref = self._ref
                _, got = _outputs(self.build(chosen), self.calib)
                self._fidelity[k] = (verify.compare_outputs(names, ref, got).rel_l2,
                                     verify.decision_agreement(self.decisions, ref, got))
        return self._fidelity[k]


def batch1_shapes(model: onnx.ModelProto, calib: Calibration) -> dict[str, tuple[int, ...]]:
    """Calibration input shapes with symbolic batch dims set to 1."""
    out = {}
    for inp in model.graph.input:
        if inp.name not in calib.batches[0]:
            continue
        shape = tuple(calib.batches[0][inp.name].shape)
        dims = inp.type.tensor_type.shape.dim
        if shape and dims and not dims[0].HasField("dim_value"):
            shape = (1, *shape[1:])
        out[inp.name] = shape
    return out


def static_shapes(model: onnx.ModelProto, calib: Calibration) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor at batch 1 (input dims from the calibration data)."""
    shaped = cost.shaped_copy(model, batch1_shapes(model, calib))
    out: dict[str, tuple[int, ...]] = {}
    for v in [*shaped.graph.value_info, *shaped.graph.input, *shaped.graph.output]:
        tt = v.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[v.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    # Shape inference gives up on some exporters' dynamic reshapes: observe the rest by running
    # one calibration sample.
    missing = [t for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
               for t in (n.input[0], n.output[0]) if t and t not in out]
    if missing:
        first = {k: v[:1] for k, v in calib.batches[0].items()}
        one = Calibration([first], calib.synthetic, calib.source)
        try:
            for batch in calibrate.iter_capture(model, missing, one):
                out.update({k: tuple(int(d) for d in v.shape) for k, v in batch.items()})
        except Exception as exc:  # unknown shapes stay unknown (skipped)
            log.info("could not observe shapes by running the model: %s", exc)
    return out


def _allocate(
    choices: list[LayerChoice], probes: _Probes, config: LowRankConfig, report: Report,
) -> dict[int, Option]:
    """Pick at most one option per layer; record skips for layers left alone."""
    usable: list[LayerChoice] = []
    for ch in choices:
        layer = ch.layer
        if not ch.options:
            report.skip(layer.name, layer.op, SkipReason.DEGENERATE,
                        "no usable factorization at the requested rank")
            continue
        wins = [o for o in ch.options if o.plan.macs < layer.macs]
        if not wins:
            report.skip(layer.name, layer.op, SkipReason.NO_MAC_WIN,
                        f"rank {ch.options[0].plan.ranks} costs {ch.options[0].plan.macs} MACs "
                        f">= {layer.macs}")
            continue
        if config.latency_check:
            fast = [o for o in wins if o.base_ms >= config.min_layer_speedup * o.ms]
            if not fast:
                best = max(wins, key=lambda o: o.base_ms / max(o.ms, 1e-9))
                report.skip(layer.name, layer.op, SkipReason.NO_LATENCY_WIN,
                            f"best measured {best.base_ms / max(best.ms, 1e-9):.2f}x at rank "
                            f"{best.plan.ranks} ({best.base_ms:.3f} -> {best.ms:.3f} ms)")
                continue
            # --rank auto: only options whose MAC cut shows as time (a fixed rank is the
            # user's choice).
            honest = [o for o in fast if not config.auto
                      or realized(o, layer) >= config.min_realized]
            if not honest:
                best = max(fast, key=lambda o: realized(o, layer))
                report.skip(layer.name, layer.op, SkipReason.NO_LATENCY_WIN,
                            f"the chains realize at most {realized(best, layer):.2f} of their "
                            f"MAC cut (< --min-realized {config.min_realized}; rank "
                            f"{best.plan.ranks}, {best.base_ms:.3f} -> {best.ms:.3f} ms)")
                continue
            wins = honest
        usable.append(LayerChoice(layer, ch.index, wins))
    if not config.auto:
        return {ch.index: ch.options[0] for ch in usable}
    if config.latency_check and usable:
        usable = _drop_unseen_savings(usable, probes.model_ms(), report)
    if config.sensitivity and not probes.calib.synthetic and len(usable) > 1:
        gains = layer_gains(probes, usable)
        for ch in usable:
            ch.gain = max(gains.get(ch.index, 1.0), MIN_GAIN)
        report.metrics["sensitivity"] = {ch.layer.name: round(gains.get(ch.index, 1.0), 3)
                                         for ch in usable}
    chosen = _auto_allocate(usable, probes, config, report)
    for ch in usable:
        if ch.index not in chosen:
            mild = min(ch.options, key=lambda o: o.error)
            report.skip(ch.layer.name, ch.layer.op, SkipReason.NOT_SELECTED,
                        f"least-error option: rank {mild.plan.ranks}, isolated error "
                        f"{mild.error:.3g}")
    return chosen


def layer_gains(probes: _Probes, usable: list[LayerChoice]) -> dict[int, float]:
    """Each layer's sensitivity: model output error per unit of its isolated error.

    One probe model holds every usable layer twice, the original and one rewritten option (the
    one whose isolated error is nearest :data:`SENSITIVITY_PROBE_ERROR`, symmetric refit),
    blended by a switch input per layer: ``y = y_orig + s * (y_chain - y_orig)``. Running it
    on 8 to 32 calibration samples (as many as fit :data:`SENSITIVITY_SECONDS`; whole batches
    spread over the set, see :func:`spread_batches`) with
    one switch on at a time gives the relative error of the model's outputs with that layer
    alone rewritten; divided by the option's isolated error, that is the layer's gain (about 1
    when its errors pass through, far below 1 when later layers wash them out, above 1 when
    they grow).
    """
    config = probes.config
    graph = Graph(probes.model, infer=False)  # chains are written from the layers' own shapes
    switches: dict[int, tuple[str, np.dtype[Any]]] = {}
    probed: dict[int, Option] = {}
    for ch in usable:
        opt = min(ch.options, key=lambda o: abs(np.log(max(o.error, 1e-6)
                                                        / SENSITIVITY_PROBE_ERROR)))
        if opt.error <= 0:
            continue
        node = next(n for n in graph.nodes if n.name == ch.layer.name)
        layer = dataclasses.replace(ch.layer, node=node)
        m = probes.moments[ch.index]
        xx, _, _ = m.normalized()
        ab = (refit_solution(layer, opt.plan, xx, None, config.ridge)
              if config.refit and m.rows >= refit_rows_needed(opt.plan)
              else plan_ab(layer, opt.plan))
        dtype = _np_dtype(layer)
        x, y = node.inputs[0], node.outputs[0]
        y_orig = graph.variable(f"{node.name}_orig", dtype=dtype)
        node.outputs[0] = y_orig
        y_chain = graph.variable(f"{node.name}_chain", dtype=dtype)
        _write_chain(graph, layer, opt.plan, ab, x, y_chain, "sensitivity")
        switch = graph.add_input(f"sensitivity_switch_{ch.index}", dtype=dtype, shape=[1])
        delta = graph.variable(f"{node.name}_delta", dtype=dtype)
        scaled = graph.variable(f"{node.name}_scaled", dtype=dtype)
        kw: dict[str, Any] = {"pass_name": "sensitivity", "origin": layer.name}
        graph.add_node("Sub", [y_chain, y_orig], [delta], suffix="delta", **kw)
        graph.add_node("Mul", [delta, switch], [scaled], suffix="scale", **kw)
        graph.add_node("Add", [y_orig, scaled], [y], suffix="blend", **kw)
        switches[ch.index] = (switch.name, dtype)
        probed[ch.index] = opt
    if not switches:
        return {}
    blended = graph.export(check=False)
    # Compile-time work, not a latency measurement: every core, graph optimizations on.
    session = runtime.make_session(blended, config.provider, max(config.threads, os.cpu_count()
                                                                 or 1), optimize=True)
    names = runtime.output_names(session)
    sizes = probes.calib.batch_sizes()
    pairs = list(zip(probes.calib.batches, sizes, strict=True))

    def flags(on: int | None) -> dict[str, np.ndarray]:
        return {name: np.array([1.0 if i == on else 0.0], dtype=dt)
                for i, (name, dt) in switches.items()}

    # As many samples as fit the time budget (whole batches: a model may have a fixed batch).
    def fitting() -> float:
        start = time.perf_counter()
        session.run(names, {**pairs[0][0], **flags(None)})
        per_sample = (time.perf_counter() - start) / max(pairs[0][1], 1)
        want = int(SENSITIVITY_SECONDS / ((len(switches) + 1) * max(per_sample, 1e-6)))
        return float(min(max(want, SENSITIVITY_SAMPLES[0]), SENSITIVITY_SAMPLES[1]))

    want = int(probes.cached(f"sensitivity_samples {len(switches)}", fitting))
    batches = [pairs[i][0] for i in spread_batches([size for _, size in pairs], want)]

    def outputs(on: int | None) -> list[np.ndarray]:
        runs = [session.run(names, {**b, **flags(on)}) for b in batches]
        return [np.concatenate([r[k] for r in runs]) for k in range(len(names))]

    ref = outputs(None)
    gains = {}
    for index, opt in probed.items():
        err = verify.compare_outputs(names, ref, outputs(index)).rel_l2
        gains[index] = float(err / opt.error)
    return gains


def spread_batches(sizes: Sequence[int], want: int) -> list[int]:
    """Indices of whole batches holding about ``want`` samples, spread evenly over the set.

    Calibration sets come in runs of related samples (crops of one page or photo, files of one
    folder); the first batches alone would see only the first run.
    """
    total = sum(sizes)
    if want >= total:
        return list(range(len(sizes)))
    mean = total / max(len(sizes), 1)
    count = min(len(sizes), max(1, int(np.ceil(want / mean))))
    return sorted({int(round(i)) for i in np.linspace(0, len(sizes) - 1, count)})


def realized(opt: Option, layer: Layer, in_context: bool = True) -> float:
    """Measured layer speedup over its MAC reduction (1.0: every MAC cut shows as time).

    In context (the default), the edge cost both one-layer models pay (layout conversions,
    per-run overhead; none of it exists between layers of a network) is taken off both
    timings, at most half of either.
    """
    if opt.ms <= 0 or opt.plan.macs <= 0 or not np.isfinite(opt.ms):
        return 1.0
    edges = min(opt.edges_ms, 0.5 * opt.ms, 0.5 * opt.base_ms) if in_context else 0.0
    return ((opt.base_ms - edges) / (opt.ms - edges)) / (layer.macs / opt.plan.macs)


def _savings(opt: Option, config: LowRankConfig, layer: Layer) -> float:
    """What an option saves: measured ms, or MACs for a MAC target or without timings."""
    if not config.latency_check or (config.target_macs is not None
                                    and config.target_speedup is None):
        return float(layer.macs - opt.plan.macs)
    return opt.saved_ms


def _hull_steps(ch: LayerChoice, config: LowRankConfig) -> list[tuple[float, Option]]:
    """One layer's moves along its lower convex hull of (saving, weighted error^2).

    Starting from "leave it alone" (0, 0), each move goes to the option that adds saving at the
    least cost per unit saved (ties: the larger saving); the slopes rise move by move. These are
    the options the Lagrangian ``min error^2 - lam * saving`` picks as ``lam`` grows.
    """
    points = [(_savings(o, config, ch.layer), (ch.gain * o.error) ** 2, o) for o in ch.options]
    points = [pt for pt in points if pt[0] > 0]
    steps: list[tuple[float, Option]] = []
    at_s, at_c = 0.0, 0.0
    while True:
        ahead = [pt for pt in points if pt[0] > at_s]
        if not ahead:
            return steps
        slope, _, i = min(((c - at_c) / (sv - at_s), -sv, i)
                              for i, (sv, c, _) in enumerate(ahead))
        at_s, at_c, opt = ahead[i]
        steps.append((slope, opt))


def _lagrangian_path(usable: list[LayerChoice], config: LowRankConfig
                     ) -> list[dict[int, Option]]:
    """Allocations from nothing to the most aggressive, one layer's move at a time.

    Every layer's hull moves are merged in order of their cost per unit saved, so each
    allocation is the least-error one for its saving (the Lagrangian solutions) and the next
    differs from it in one layer. A sweep of ``lam`` would jump several layers at once where
    layers of one shape move at nearly the same ``lam`` (measured on PP-OCRv4 rec: four
    240-channel 1x1 convs took the whole-model speedup from 1.13x to 1.35x in one step).
    """
    moves = [(slope, order, ch.index, opt)
             for order, ch in enumerate(usable) for slope, opt in _hull_steps(ch, config)]
    moves.sort(key=lambda m: (m[0], m[1]))
    path: list[dict[int, Option]] = [{}]
    for _, _, index, opt in moves:
        path.append({**path[-1], index: opt})
    return path


def _auto_allocate(
    usable: list[LayerChoice], probes: _Probes, config: LowRankConfig, report: Report,
) -> dict[int, Option]:
    """Choose per-layer options: predicted savings first, then whole-model measurements.

    Candidates are the Lagrangian allocations, one layer's move apart (least isolated error
    for a given saving). ``target_speedup``: the least aggressive pick predicted to reach it, then
    re-measured as a whole model and moved up while the measured speedup falls short (per-layer
    micro-benchmarks over- or under-predict what a whole model realizes). ``max_error`` (or
    :data:`DEFAULT_MAX_ERROR` when no target is given): the most aggressive pick, no more
    aggressive than that, whose measured output error stays within the bound.
    """
    if not usable:
        if config.target_speedup is not None or config.target_macs is not None:
            report.target_missed("target cannot be met: no layer can be rewritten "
                                 "(see the skip reasons)")
        return {}
    model, calib = probes.model, probes.calib
    layer_of = {c.index: c.layer for c in usable}
    picks = _lagrangian_path(usable, config)
    report.metrics["allocations"] = len(picks)

    def saving(p: dict[int, Option]) -> float:
        return sum(_savings(o, config, layer_of[i]) for i, o in p.items())

    savings = [saving(p) for p in picks]
    index = len(picks) - 1
    max_error = config.max_error
    target_macs = config.target_macs
    if config.target_speedup is not None and not config.latency_check:
        target_macs = 1 / config.target_speedup
        report.notes.append(f"no latency measurements (--no-latency-check): the speed target "
                            f"is read as keeping {target_macs:.1%} of the MACs")
    if config.target_speedup is not None and config.latency_check:
        base = probes.model_ms()
        report.metrics["model_ms"] = round(base, 4)
        index = _reach_speedup(picks, savings, base, probes, config, report, usable)
    elif target_macs is not None:
        total_macs = cost.model_cost(model, batch1_shapes(model, calib)).macs
        needed = total_macs * (1 - target_macs)
        feasible = [i for i, v in enumerate(savings) if v >= needed]
        if feasible:
            index = feasible[0]
        else:
            report.target_missed(
                f"target cannot be met: at most {savings[-1] / total_macs:.1%} of the MACs can "
                f"be saved, {1 - target_macs:.1%} asked; using the most aggressive ranks")
    elif max_error is None:
        max_error = DEFAULT_MAX_ERROR
        report.notes.append(f"no target given: the fastest ranks within a model output error "
                            f"of {DEFAULT_MAX_ERROR} (the default --max-error)")
    min_agreement = config.min_agreement if config.min_agreement > 0 else None
    if probes.decisions:
        report.metrics["decision_outputs"] = [model.graph.output[i].name
                                              for i, _ in probes.decisions]
    else:
        min_agreement = None
    if max_error is not None or min_agreement is not None:
        target_index = index
        index = _bound_fidelity(picks, index, max_error, min_agreement, probes, report,
                                explicit=config.max_error is not None)
        has_target = config.target_speedup is not None or target_macs is not None
        if has_target and index < target_index and report.metrics.get("target_met") is not False:
            bounds = [f"{b} {v:g}" for b, v in (("--max-error", max_error),
                                                ("--min-agreement", min_agreement))
                      if v is not None]
            report.target_missed(f"target not met: {' and '.join(bounds)} "
                                 f"allow{'s' if len(bounds) == 1 else ''} only milder ranks")
    return picks[index]


def _drop_unseen_savings(usable: list[LayerChoice], model_ms: float, report: Report
                         ) -> list[LayerChoice]:
    """Keep the options that save at least :data:`MIN_MODEL_SAVING` of the model's latency.

    A rewrite saving less cannot be seen in any whole-model measurement here (run-to-run noise
    is several percent), yet it costs fidelity: on PP-OCRv4's recognizer a neck conv saving
    0.3 % of the time flipped 6 % of the strings.
    """
    kept = []
    floor = MIN_MODEL_SAVING * model_ms
    for ch in usable:
        options = [o for o in ch.options if o.saved_ms >= floor]
        if options:
            kept.append(dataclasses.replace(ch, options=options))
            continue
        best = max(o.saved_ms for o in ch.options)
        report.skip(ch.layer.name, ch.layer.op, SkipReason.TOO_SMALL,
                    f"saves at most {best:.3f} ms, under {MIN_MODEL_SAVING:.0%} of the model's "
                    f"{model_ms:.2f} ms")
    return kept


def _reach_speedup(picks: list[dict[int, Option]], savings: list[float], base_ms: float,
                   probes: _Probes, config: LowRankConfig, report: Report,
                   usable: Sequence[LayerChoice] = ()) -> int:
    """Index of a mild pick measured (as a whole model) to reach ``config.target_speedup``.

    Start at the mildest pick the micro-benchmarks predict to be enough; while the measured
    speedup falls short, move up by the realized share of the predicted saving; once one
    meets the target, bisect toward milder picks (a few more measurements). Out of reach:
    the mildest pick within noise of the fastest measured, or nothing.
    """
    target = float(config.target_speedup or 1.0)
    needed = base_ms * (1 - 1 / target)
    feasible = [i for i, v in enumerate(savings) if v >= needed]
    index = feasible[0] if feasible else len(picks) - 1
    measured: dict[int, float] = {0: 1.0}  # picks[0] changes nothing
    rounds = 0
    for _ in range(TARGET_ROUNDS):
        measured[index] = probes.speedup(picks[index])
        rounds += 1
        if measured[index] >= target:
            break
        # Scale what the micro-benchmarks promise by what the whole model realized.
        predicted = savings[index]
        realized = base_ms * (1 - 1 / measured[index])
        efficiency = min(max(realized / predicted, 0.2), 1.0) if predicted > 0 else 1.0
        want = needed / efficiency
        later = [i for i in range(index + 1, len(picks)) if savings[i] >= want]
        nxt = later[0] if later else len(picks) - 1
        if nxt == index or nxt in measured:
            if index + 1 < len(picks) and index + 1 not in measured:
                nxt = index + 1
            else:
                break
        index = nxt
    met = [i for i, v in measured.items() if v >= target]
    if met:
        hi = min(met)
        lo = max(i for i, v in measured.items() if v < target and i < hi)
        lo, hi, rounds = _bisect_milder(picks, lo, hi, measured, target, probes, rounds)
        best = hi
        if hi - lo == 1:
            best, rounds = _refine_step(picks, lo, hi, measured, target, probes, config, usable,
                                        rounds)
    else:
        # Out of reach: measure a few milder picks too and take the mildest one within
        # noise of the fastest, so error is not spent on speed that does not show.
        top = max(measured, key=lambda i: measured[i])
        for frac in (0.5, 0.25):
            i = int(round(top * frac))
            if 0 < i < len(picks) and i not in measured:
                measured[i] = probes.speedup(picks[i])
                rounds += 1
        # The mildest pick beyond noise of the original (1.0) and within noise of the
        # fastest; nothing when no pick is beyond noise of the original.
        fastest = max(measured.values())
        gains = [i for i, v in measured.items() if v >= 1 + NOISE]
        best = min((i for i in gains if measured[i] >= fastest - NOISE * fastest), default=0)
    report.metrics["target_rounds"] = rounds
    report.metrics["probe_speedups"] = {str(i): round(v, 3) for i, v in sorted(measured.items())
                                        if i}
    if not met:
        if best == 0:
            report.target_missed(f"target {target}x not reached: no choice of ranks measured "
                                 f"faster than the original beyond noise; nothing applied")
        else:
            report.target_missed(f"target {target}x not reached: best measured "
                                 f"{measured[best]:.2f}x, using it")
    return best


def _bisect_milder(picks: list[dict[int, Option]], lo: int, hi: int,
                   measured: dict[int, float], target: float, probes: _Probes,
                   rounds: int) -> tuple[int, int, int]:
    """Narrow ``lo`` (short of ``target``) and ``hi`` (meets it) by bisection.

    Up to :data:`MILDER_ROUNDS` whole-model measurements; returns (lo, hi, rounds).
    """
    for _ in range(MILDER_ROUNDS):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        measured[mid] = probes.speedup(picks[mid])
        rounds += 1
        if measured[mid] >= target:
            hi = mid
        else:
            lo = mid
    return lo, hi, rounds


def _refine_step(picks: list[dict[int, Option]], lo: int, hi: int, measured: dict[int, float],
                 target: float, probes: _Probes, config: LowRankConfig,
                 usable: Sequence[LayerChoice], rounds: int) -> tuple[int, int]:
    """Look between two neighbouring picks for a milder one that still meets the target.

    Neighbours differ in one layer, which moves between two points of its convex frontier;
    the options it skips (off the frontier: more error per millisecond saved) can land much
    nearer the target (Fashion-MNIST CP: one layer's move took the model from 1.85x to 2.70x
    with 2x asked). They are inserted into ``picks`` between the two, in order of saving, and
    bisected with up to :data:`MILDER_ROUNDS` more measurements. Returns (index, rounds).
    """
    changed = [i for i in picks[hi] if picks[lo].get(i) is not picks[hi][i]]
    choice = next((ch for ch in usable if changed and ch.index == changed[0]), None)
    if len(changed) != 1 or choice is None:
        return hi, rounds
    layer = changed[0]

    def saved(o: Option | None) -> float:
        return 0.0 if o is None else _savings(o, config, choice.layer)

    low, high = saved(picks[lo].get(layer)), saved(picks[hi][layer])
    between = sorted((o for o in choice.options if low < saved(o) < high), key=saved)
    if not between:
        return hi, rounds
    picks[hi:hi] = [{**picks[lo], layer: o} for o in between]
    shift = len(between)
    for key in sorted((k for k in measured if k >= hi), reverse=True):
        measured[key + shift] = measured.pop(key)
    _, hi, rounds = _bisect_milder(picks, lo, hi + shift, measured, target, probes, rounds)
    return hi, rounds


def _bound_fidelity(picks: list[dict[int, Option]], limit: int, max_error: float | None,
                    min_agreement: float | None, probes: _Probes, report: Report,
                    explicit: bool) -> int:
    """Index of the most aggressive pick up to ``limit`` within both fidelity bounds.

    The model error must be at most ``max_error``, the decision agreement at least
    ``min_agreement`` (either may be None: no such bound). Both are measured on the
    calibration data with probe builds (symmetric refit, which errs high: the final
    asymmetric refit is at least as good on average).
    """
    tried: dict[int, tuple[float, float | None]] = {}

    def within(i: int) -> bool:
        tried[i] = probes.fidelity(picks[i])
        err, agree = tried[i]
        return ((max_error is None or err <= max_error)
                and (min_agreement is None or agree is None or agree >= min_agreement))

    lo, hi = 0, limit  # picks[0] is "nothing" (lam 0): error 0
    if within(limit):
        lo = hi = limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    report.metrics["error_probes"] = {f"{i} ({len(picks[i])} layers)": round(e, 4)
                                      for i, (e, _) in sorted(tried.items())}
    if any(a is not None for _, a in tried.values()):
        report.metrics["agreement_probes"] = {
            f"{i} ({len(picks[i])} layers)": round(a, 4)
            for i, (_, a) in sorted(tried.items()) if a is not None}
    if lo == limit:
        return limit
    err, agree = tried[hi]
    if max_error is not None and err > max_error and explicit:
        report.metrics["max_error_bound_active"] = True
        report.notes.append(f"--max-error {max_error} limits the ranks (measured model error "
                            f"{probes.fidelity(picks[lo])[0]:.4g})")
    if min_agreement is not None and agree is not None and agree < min_agreement:
        report.metrics["min_agreement_bound_active"] = True
        kept = probes.fidelity(picks[lo])[1]
        report.notes.append(
            f"--min-agreement {min_agreement} limits the ranks: the next faster choice keeps "
            f"{agree:.1%} of the calibration samples' decisions"
            + (f" (this one {kept:.1%})" if kept is not None else ""))
    return lo


def _outputs(model: onnx.ModelProto, calib: Calibration) -> tuple[list[str], list[np.ndarray]]:
    """Outputs for error probes: compile-time work, so every core and graph optimizations."""
    names = [o.name for o in model.graph.output]
    return names, calibrate.run_model(model, calib, threads=os.cpu_count() or 1, optimize=True)


def _build(
    model: onnx.ModelProto, chosen: dict[int, Option], layers: Sequence[Layer],
    moments: list[Moments],
    targets: list[list[np.ndarray]], calib: Calibration, config: LowRankConfig,
    pass_name: str, progress: Callable[[str], None] | None,
) -> tuple[onnx.ModelProto, list[Change]]:
    """Rewrite the chosen layers in graph order, refitting each on the compressed upstream."""
    with LayerStream(calib) as stream:
        return _build_streamed(model, chosen, layers, moments, targets, config, pass_name,
                               progress, stream)


def _build_streamed(
    model: onnx.ModelProto, chosen: dict[int, Option], layers: Sequence[Layer],
    moments: list[Moments], targets: list[list[np.ndarray]], config: LowRankConfig,
    pass_name: str, progress: Callable[[str], None] | None, stream: LayerStream,
) -> tuple[onnx.ModelProto, list[Change]]:
    current = model
    changes: list[Change] = []
    for index in sorted(chosen):  # layers are in graph order
        name = layers[index].name
        opt = chosen[index]
        plan = opt.plan
        graph = Graph(current)
        node = next(n for n in graph.nodes if n.name == name)
        layer = dataclasses.replace(layers[index], node=node)
        if progress:
            progress(f"{pass_name}: rewriting {layer.name}")
        m0 = moments[index]
        xx0, _, yy0 = m0.normalized()
        raw_ab = plan_ab(layer, plan)
        refit_note = config.refit_mode if config.refit else "none"
        if config.refit and m0.rows < refit_rows_needed(plan):
            refit_note = (f"none: {m0.rows} sampled rows, a refit at this rank needs "
                          f"{refit_rows_needed(plan)} (more --calib samples help, up to "
                          f"{config.max_rows} rows per layer)")
        if refit_note != config.refit_mode:
            ab = raw_ab
            err_before = err_after = plan_error(layer, plan, ab, xx0, None, yy0)
        elif config.refit_mode == "symmetric" or current is model:
            ab = refit_solution(layer, plan, xx0, None, config.ridge)
            err_before = plan_error(layer, plan, raw_ab, xx0, None, yy0)
            err_after = plan_error(layer, plan, ab, xx0, None, yy0)
        else:
            mc = collect_compressed(stream, current, index, layer, targets[index], config)
            xx, xy, yy = mc.normalized()
            ab = refit_solution(layer, plan, xx, xy, config.ridge)
            err_before = plan_error(layer, plan, raw_ab, xx, xy, yy)
            err_after = plan_error(layer, plan, ab, xx, xy, yy)
        if not np.all(np.isfinite(ab)):
            raise PassError(f"refit of {layer.name} produced non-finite weights")
        expected = err_after
        if ab is not raw_ab:
            expected = err_after * optimism(plan, m0.rows)
            if expected > err_before:  # the refit is not expected to help: keep the raw plan
                ab, err_after, expected = raw_ab, err_before, err_before
                refit_note = "none: not expected to beat the raw decomposition"
        build_chain(graph, layer, plan, ab, pass_name)
        current = graph.export()
        details: dict[str, Any] = {
            "method": plan.method,
            "ranks": list(plan.ranks),
            "weight_error": round(plan.weight_error, 6),
            "calib_error_before_refit": round(err_before, 6),
            "calib_error_after_refit": round(err_after, 6),
            "expected_heldout_error": round(expected, 6),
            "refit": refit_note,
        }
        if opt.base_ms:
            details.update(latency_before_ms=round(opt.base_ms, 4),
                           latency_after_ms=round(opt.ms, 4),
                           edges_ms=round(opt.edges_ms, 4),
                           realized=round(realized(opt, layer), 3),
                           realized_alone=round(realized(opt, layer, in_context=False), 3))
        details.update({k: v for k, v in plan.extra.items() if k != "degenerate"})
        changes.append(Change(
            node=layer.name, op_type=layer.op,
            what=f"{plan.method} rank {'x'.join(str(r) for r in plan.ranks)}",
            params_before=layer.params, params_after=plan.params,
            macs_before=layer.macs, macs_after=plan.macs, error=round(err_after, 6),
            details=details,
        ))
    return current, changes



# ============================================================================ pass wrapper
class DecompositionPass:
    """A pass object around a :class:`Method` (subclasses set name and method)."""

    name: str = ""
    lossless: bool = False
    config_cls: type[PassConfig] = LowRankConfig
    method_cls: Callable[[], Any]  # a Method class

    def __call__(self, model: onnx.ModelProto, config: PassConfig,
                 calib: Calibration | None = None) -> PassResult:
        """Decompose ``model``'s layers; see :func:`run_decomposition`.

        A fresh method object per call: caches (e.g. CP warm starts) never outlive a run, so
        the same inputs give the same bytes.
        """
        if not isinstance(config, LowRankConfig):
            raise ConfigError(f"{self.name} needs a LowRankConfig")
        return run_decomposition(self.method_for(config), model, config, calib, self.name)

    def method_for(self, config: LowRankConfig) -> Any:
        """The :class:`Method` object for one run."""
        return self.method_cls()


def rank_ladder(maximum: int, multiple: int, count: int = 10) -> list[int]:
    """Up to ``count`` ranks, multiples of ``multiple``, spread geometrically up to ``maximum``."""
    if maximum < multiple:
        return [maximum] if maximum >= 1 else []
    steps = sorted({max(multiple, int(round(v / multiple)) * multiple)
                    for v in np.geomspace(multiple, maximum, count)})
    return [s for s in steps if s <= maximum]


def conv_hw(layer: Layer) -> tuple[tuple[int, int], tuple[int, int]]:
    """((H_in, W_in), (H_out, W_out)) of a conv layer."""
    return (layer.in_shape[1], layer.in_shape[2]), (layer.out_shape[1], layer.out_shape[2])


def vertical_attrs(g: ConvGeometry) -> dict[str, Any]:
    """Attributes of a ``kh x 1`` stage taking the vertical geometry."""
    return {"strides": [g.sh, 1], "dilations": [g.dh, 1], "pads": [g.pads[0], 0, g.pads[2], 0]}


def horizontal_attrs(g: ConvGeometry) -> dict[str, Any]:
    """Attributes of a ``1 x kw`` stage taking the horizontal geometry."""
    return {"strides": [1, g.sw], "dilations": [1, g.dw], "pads": [0, g.pads[1], 0, g.pads[3]]}


def full_attrs(g: ConvGeometry) -> dict[str, Any]:
    """Attributes of a stage taking the whole original geometry."""
    return {"strides": [g.sh, g.sw], "dilations": [g.dh, g.dw], "pads": list(g.pads)}


# ============================================================================ refit helpers
def shrunk_solve(gram: np.ndarray, cross: np.ndarray, start: np.ndarray, ridge: float
                 ) -> np.ndarray:
    """Least squares shrunk toward ``start``: ``argmin_A E||A x - y||^2 + lam ||A - start||^2``.

    ``gram = E[x x^T]``, ``cross = E[y x^T]``, ``lam = ridge * mean(diag(gram))``.

    Shrinking toward the starting weights (not toward zero) keeps what calibration data
    cannot pin down as it was: a few dozen images leave many directions unseen, and a
    plain least squares fits them to noise.
    """
    lam = ridge * float(np.trace(gram)) / max(gram.shape[0], 1)
    lhs = gram + lam * np.eye(gram.shape[0])
    return np.asarray(np.linalg.solve(lhs, (cross + lam * start).T).T)


def write_linear(graph: Graph, name: str, w_cols: np.ndarray, bias: np.ndarray | None) -> None:
    """Write canonical ``[Y, X]`` weights (and a bias) into node ``name``'s own layout.

    Conv: ``[O, C, kh, kw]``; MatMul / Gemm: transposed as the node reads them, alpha and beta
    divided out. A bias is added as a new input when the node has none.
    """
    node = next(n for n in graph.nodes if n.name == name)
    w_t = graph.input(node, 1)
    w = graph.const_value(w_t)
    assert w is not None and w_t is not None
    dtype = w.dtype
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        new = w_cols.T.reshape(w.shape)
    else:
        new = w_cols.reshape(w.shape)
    graph.set_input_constant(node, 1, (new / alpha).astype(dtype))
    if bias is None:
        return
    b = (bias / (beta if beta else 1.0)).astype(dtype)
    if graph.input(node, 2) is None:
        const = graph.constant(f"{name}_bias", b)
        if len(node.inputs) > 2:  # an empty optional input
            node.inputs[2] = const
        else:
            node.inputs.append(const)
    else:
        graph.set_input_constant(node, 2, b)
