"""Structured channel pruning with coupled groups and least-squares refits (lossy).

Papers: H. Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, arXiv:1608.08710
(filter norms); Z. Liu et al., "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017 (BN scales); Y. He, X. Zhang, J. Sun, "Channel Pruning for Accelerating
Very Deep Neural Networks", ICCV 2017, arXiv:1707.06168 (least-squares reconstruction of the
next layer); G. Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (coupling).

Before / after (one group: the channels of a Conv's output, coupled through BN, activations,
depthwise convs, residual Adds, Concats and Flatten->Gemm)::

    ... -> Conv (O) -> BN -> Relu -> Conv (C=O) -> ...
    ... -> Conv (k of O) -> BN (k) -> Relu -> Conv (C=k, refit) -> ...

Every group of coupled channels (:mod:`onnxcomp.depgraph`) is pruned as a whole or skipped
with the reason it is blocked (graph outputs, unknown ops, grouped convs, channel-axis
reshapes). Importance, per channel, summed over the group's producers (each normalized by
its mean): ``l1`` / ``l2`` of the producer's filter, ``bn_scale`` (|gamma| / sqrt(var + eps)
of a BatchNormalization right after the producer; l2 where there is none), ``activation``
(mean |activation| on calibration data, after the producer's BN/activation chain).
``--ratio r`` removes the least important ``r`` of every group's channels, keeping a multiple
of ``--round-to``; ``--target-speedup X`` searches the ratio (bisection) until the whole model
is measured X times faster on the provider.

Each consumer whose input channels were removed (Conv, Gemm, MatMul) is refit by least
squares on calibration activations so its outputs match the original's (AIMET calls this
"reconstruction"); when the calibration data are too few for the refit (10 sampled rows per
unknown), the removed channels' mean contribution is folded into the bias instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxcomp import bench, calibrate, cost, decompose, depgraph
from onnxcomp.calibrate import Calibration
from onnxcomp.decompose import Layer, LowRankConfig
from onnxcomp.depgraph import DepGraph, Group
from onnxcomp.graph import Graph
from onnxcomp.model import copy_model
from onnxcomp.passbase import (
    Change,
    ConfigError,
    PassConfig,
    PassResult,
    Report,
    Skip,
    SkipReason,
)

CRITERIA = ("l1", "l2", "bn_scale", "activation")
FOLLOWERS = frozenset({"BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSwish",
                       "Sigmoid", "PRelu", "Identity"})


@dataclasses.dataclass(frozen=True)
class PruneConfig(PassConfig):
    """Options of ``prune_channels``."""

    ratio: float | None = None
    criterion: str = "l2"
    round_to: int = 8
    target_speedup: float | None = None
    refit: bool = True
    exclude: tuple[str, ...] = ()
    provider: str = "cpu"
    threads: int = 1
    bench_runs: int = 30
    max_rows: int = 16384
    ridge: float = 1e-9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio is None and self.target_speedup is None:
            object.__setattr__(self, "ratio", 0.3)
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ConfigError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.ratio is not None and self.target_speedup is not None and self.ratio != 0.3:
            raise ConfigError("give --ratio or --target-speedup, not both")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise ConfigError(f"--target-speedup must be > 1, got {self.target_speedup}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"--criterion must be one of {', '.join(CRITERIA)}, "
                              f"got '{self.criterion}'")
        if self.round_to < 1:
            raise ConfigError("--round-to must be >= 1")


@dataclasses.dataclass
class _Prepared:
    """Everything that does not depend on the ratio: groups, scores, refit moments."""

    groups: list[Group]
    scores: dict[int, np.ndarray]
    layers: dict[str, Layer]
    moments: dict[str, decompose.Moments]


class PruneChannels:
    """The ``prune_channels`` pass."""

    name: ClassVar[str] = "prune_channels"
    lossless: ClassVar[bool] = False
    config_cls: ClassVar[type[PassConfig]] = PruneConfig

    def __call__(self, model: onnx.ModelProto, config: PassConfig,
                 calib: Calibration | None = None) -> PassResult:
        """Prune a copy of ``model``; see the module docstring."""
        if not isinstance(config, PruneConfig):
            raise ConfigError("prune_channels needs a PruneConfig")
        report = Report(self.name)
        if calib is None:
            calib = calibrate.synthetic_calibration(model, num_samples=8)
        if calib.synthetic:
            report.notes.append("synthetic calibration: refits and activation scores come "
                                "from random inputs; give --calib")
        prep = _prepare(model, config, calib, report)
        if not prep.scores:
            report.notes.append("no prunable channel group")
            return PassResult(copy_model(model), report)
        if config.target_speedup is None:
            ratio = float(config.ratio or 0.0)
        else:
            ratio = _search_ratio(model, prep, config, calib, report)
        if ratio <= 0:
            return PassResult(copy_model(model), report)
        pruned, changes = _build(model, prep, ratio, config, calib)
        for change in changes:
            report.apply(change)
        report.metrics["ratio"] = round(ratio, 4)
        if not changes:
            return PassResult(copy_model(model), report)
        return PassResult(pruned, report)


PASS = PruneChannels()


# ====================================================================== preparation
def _prepare(model: onnx.ModelProto, config: PruneConfig, calib: Calibration,
             report: Report) -> _Prepared:
    graph = Graph(model)
    dep = DepGraph(graph, ignore=config.exclude)
    scores: dict[int, np.ndarray] = {}
    for group in dep.groups:
        if not group.producers:
            continue  # channels of graph inputs or opaque ops: nothing to remove
        node = group.producers[0]
        op = next(n.op for n in graph.nodes if n.name == node)
        if group.blocked:
            report.add_skip(Skip(node, op, SkipReason.BLOCKED, "; ".join(group.blocked[:3])))
        elif group.size <= config.round_to:
            report.add_skip(Skip(node, op, SkipReason.TOO_SMALL,
                                 f"{group.size} channels <= --round-to {config.round_to}"))
        else:
            scores[group.id] = np.zeros(group.size)
    if scores:
        _score(graph, dep, scores, config, calib, report)
    layers, moments = _refit_moments(model, graph, dep, scores, config, calib)
    return _Prepared(dep.groups, scores, layers, moments)


def _score(graph: Graph, dep: DepGraph, scores: dict[int, np.ndarray], config: PruneConfig,
           calib: Calibration, report: Report) -> None:
    nodes = {n.name: n for n in graph.nodes}
    watch: dict[str, tuple[int, str]] = {}
    fallback = 0
    for group in dep.groups:
        if group.id not in scores:
            continue
        for name in group.producers:
            node = nodes[name]
            if config.criterion == "activation":
                watch[_after_followers(graph, node.outputs[0])] = (group.id, name)
                continue
            s = None
            if config.criterion == "bn_scale":
                s = _bn_scale(graph, node)
                fallback += s is None
            if s is None:
                s = _filter_norms(graph, node, 1 if config.criterion == "l1" else 2)
            scores[group.id] += s / max(float(np.mean(s)), 1e-30)
    if fallback:
        report.notes.append(f"bn_scale: {fallback} producer(s) have no BatchNormalization "
                            f"after them (folded?): scored by l2 instead")
    if watch:
        sums = {t: np.zeros(0) for t in watch}
        for batch in calibrate.iter_capture(graph.source, list(watch), calib):
            for t, x in batch.items():
                axes = tuple(i for i in range(x.ndim) if i != 1)
                m = np.abs(x).astype(np.float64).sum(axis=axes)
                sums[t] = m if sums[t].size == 0 else sums[t] + m
        for t, (gid, _) in watch.items():
            s = sums[t]
            scores[gid] += s / max(float(np.mean(s)), 1e-30)


def _after_followers(graph: Graph, tensor: Any) -> str:
    """The last tensor of a single-consumer BN/activation chain starting at ``tensor``."""
    while len(tensor.outputs) == 1 and not graph.is_graph_output(tensor):
        nxt = tensor.outputs[0]
        if nxt.op not in FOLLOWERS or nxt.inputs[0] is not tensor:
            break
        tensor = nxt.outputs[0]
    return str(tensor.name)


def _filter_norms(graph: Graph, node: Any, order: int) -> np.ndarray:
    w = graph.const_value(graph.input(node, 1))
    assert w is not None
    if node.op == "ConvTranspose":
        w = np.moveaxis(w, 1, 0)
    elif node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        w = w.T
    flat = np.abs(w.reshape(w.shape[0], -1).astype(np.float64))
    return flat.sum(axis=1) if order == 1 else np.sqrt((flat * flat).sum(axis=1))


def _bn_scale(graph: Graph, node: Any) -> np.ndarray | None:
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "BatchNormalization":
        return None
    bn = out.outputs[0]
    gamma, var = graph.const_value(graph.input(bn, 1)), graph.const_value(graph.input(bn, 4))
    if gamma is None or var is None:
        return None
    eps = float(bn.attrs.get("epsilon", 1e-5))
    return np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)


def _consumers_to_refit(graph: Graph, dep: DepGraph, group_ids: Sequence[int]) -> list[Any]:
    """Group-1 Conv / Gemm / MatMul nodes reading channels of the given groups."""
    probe = {gid: np.zeros(1, np.int64) for gid in group_ids}
    out = []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or not node.inputs:
            continue
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            continue
        if dep.keep_indices(node.inputs[0].name, probe) is not None:
            out.append(node)
    return out


def _refit_moments(model: onnx.ModelProto, graph: Graph, dep: DepGraph,
                   scores: dict[int, np.ndarray], config: PruneConfig, calib: Calibration
                   ) -> tuple[dict[str, Layer], dict[str, decompose.Moments]]:
    if not config.refit or not scores:
        return {}, {}
    shapes = decompose.static_shapes(model, calib)
    lr = LowRankConfig(rank=1, min_macs=0, max_rows=config.max_rows, seed=config.seed)
    layers = []
    for node in _consumers_to_refit(graph, dep, list(scores)):
        layer = decompose.make_layer(graph, shapes, node, lr)
        if isinstance(layer, Layer):
            layers.append(layer)
    if not layers:
        return {}, {}
    moments, _ = decompose.collect_original(model, layers, calib, lr)
    return ({layer.name: layer for layer in layers},
            {layer.name: m for layer, m in zip(layers, moments, strict=True)})


# ====================================================================== building
def keep_count(size: int, ratio: float, round_to: int) -> int:
    """Channels kept in a group of ``size`` at ``ratio``: a multiple of ``round_to`` (>= it)."""
    want = size * (1.0 - ratio)
    k = int(np.floor(want / round_to + 0.5)) * round_to  # the nearest multiple
    return int(min(size, max(round_to, k)))


def _build(model: onnx.ModelProto, prep: _Prepared, ratio: float, config: PruneConfig,
           calib: Calibration) -> tuple[onnx.ModelProto, list[Change]]:
    graph = Graph(model)
    dep = DepGraph(graph, ignore=config.exclude)
    keep: dict[int, np.ndarray] = {}
    sizes: dict[int, int] = {}
    for gid, s in prep.scores.items():
        count = keep_count(len(s), ratio, config.round_to)
        if count < len(s):
            keep[gid] = np.sort(np.argsort(-s, kind="stable")[:count])
            sizes[gid] = len(s)
    if not keep:
        return model, []
    before = cost.model_cost(model, decompose.batch1_shapes(model, calib)).by_name()
    owner = _owners(graph, dep, keep)
    refits = _refits(graph, dep, keep, prep, config)
    depgraph.apply(dep, keep)
    for name, (w_new, b_new, _) in refits.items():
        _write_refit(graph, name, w_new, b_new)
    pruned = graph.export()
    after = cost.model_cost(pruned, decompose.batch1_shapes(pruned, calib)).by_name()
    changes = []
    for gid, k in keep.items():
        group = next(gr for gr in prep.groups if gr.id == gid)
        names = [n for n, o in owner.items() if o == gid]
        first = group.producers[0]
        op = next(n.op for n in graph.nodes if n.name == first) if any(
            n.name == first for n in graph.nodes) else "Conv"
        changes.append(Change(
            node=first, op_type=op,
            what=f"kept {len(k)} of {sizes[gid]} channels",
            params_before=sum(before[n].params for n in names if n in before),
            params_after=sum(after[n].params for n in names if n in after),
            macs_before=sum(before[n].macs for n in names if n in before),
            macs_after=sum(after[n].macs for n in names if n in after),
            details={"producers": group.producers, "nodes": names,
                     "criterion": config.criterion,
                     "removed": sorted(set(range(sizes[gid])) - set(k.tolist()))[:64],
                     **{f"refit:{n}": refits[n][2] for n in names if n in refits}},
        ))
    return pruned, changes


def _owners(graph: Graph, dep: DepGraph, keep: dict[int, np.ndarray]) -> dict[str, int]:
    """Attribute each touched node to one group: its output's, else its input's."""
    out: dict[str, int] = {}
    for node in graph.nodes:
        for tensors in (node.outputs, node.inputs[:1]):
            gid = _first_pruned_group(dep, [t.name for t in tensors], keep)
            if gid is not None:
                out[node.name] = gid
                break
    return out


def _first_pruned_group(dep: DepGraph, tensors: list[str], keep: dict[int, np.ndarray]
                        ) -> int | None:
    for t in tensors:
        lay = dep.layouts.get(t)
        if lay is None:
            continue
        for s, _ in lay.segments:
            gid = dep.find(s)
            if gid in keep:
                return gid
    return None


def _refits(graph: Graph, dep: DepGraph, keep: dict[int, np.ndarray], prep: _Prepared,
            config: PruneConfig) -> dict[str, tuple[np.ndarray, np.ndarray | None, str]]:
    """New (weight, bias) of every consumer whose inputs lose channels (original layout)."""
    out: dict[str, tuple[np.ndarray, np.ndarray | None, str]] = {}
    for name, layer in prep.layers.items():
        node = layer.node
        in_keep = dep.keep_indices(node.inputs[0].name, keep)
        if in_keep is None:
            continue
        out_keep = dep.keep_indices(node.outputs[0].name, keep)
        m = prep.moments[name]
        xx, _, _ = m.normalized()
        d = layer.matrix.shape[1]
        if layer.is_conv:
            k = int(np.prod(layer.weight.shape[2:]))
            cols = (in_keep[:, None] * k + np.arange(k)[None, :]).reshape(-1)
        else:
            cols = in_keep
        target = np.hstack([layer.matrix, layer.bias_vector[:, None]])  # [Y, D+1]
        if out_keep is not None:
            target = target[out_keep]
        use_bias = layer.op != "MatMul"
        sel = np.append(cols, d) if use_bias else cols
        unknowns = len(sel)
        if m.rows >= decompose.REFIT_ROWS_PER_UNKNOWN * unknowns:
            gram = xx[np.ix_(sel, sel)]
            reg = config.ridge * float(np.trace(gram)) / max(len(sel), 1)
            gram = gram + reg * np.eye(len(sel))
            sol = np.linalg.solve(gram, xx[sel] @ target.T).T  # [Y, |sel|]
            how = "least squares"
        else:  # too few rows: keep the weights, fold the removed inputs' means into the bias
            removed = np.setdiff1d(np.arange(d), cols)
            mean = xx[d, :d]  # E[x] (x~ = [x; 1])
            bias = target[:, d] + target[:, removed] @ mean[removed]
            sol = np.hstack([target[:, cols], bias[:, None]]) if use_bias else target[:, cols]
            how = f"mean compensation ({m.rows} rows < {decompose.REFIT_ROWS_PER_UNKNOWN}x" \
                  f"{unknowns} for a refit)"
        w_cols = sol[:, :len(cols)]
        bias_new = sol[:, len(cols)] if use_bias else None
        out[name] = (w_cols, bias_new, how)
    return out


def _write_refit(graph: Graph, name: str, w_cols: np.ndarray, bias: np.ndarray | None,
                 *_: Any) -> None:
    """Write a refit (canonical [Y, X] columns) into the already sliced node."""
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
        node.inputs[2:] = [graph.constant(f"{name}_bias", b)]
    else:
        graph.set_input_constant(node, 2, b)


# ====================================================================== speed target
def _search_ratio(model: onnx.ModelProto, prep: _Prepared, config: PruneConfig,
                  calib: Calibration, report: Report) -> float:
    """The smallest ratio (bisection, whole-model timing) reaching ``target_speedup``."""
    target = float(config.target_speedup or 1.0)
    feeds = {k: v[:1] for k, v in calib.batches[0].items()}
    cfg = bench.BenchConfig(provider=config.provider, threads=config.threads, warmup=5,
                            runs=config.bench_runs)
    measured: dict[float, float] = {}

    def speed(r: float) -> float:
        if r not in measured:
            pruned, _ = _build(model, prep, r, config, calib)
            res = bench.benchmark([model, pruned], cfg, inputs=feeds)
            measured[r] = float(res.speedups[0].median)
        return measured[r]

    lo, hi = 0.0, 0.9
    if speed(hi) < target:
        report.metrics["target_met"] = False
        report.notes.append(f"target {target}x not reached: {speed(hi):.2f}x at ratio {hi}; "
                            f"using it")
        best = hi
    else:
        for _ in range(6):
            mid = round((lo + hi) / 2, 4)
            if speed(mid) >= target:
                hi = mid
            else:
                lo = mid
        best = hi
    report.metrics["ratio_search"] = {str(k): round(v, 3) for k, v in sorted(measured.items())}
    return best
