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
from typing import Any

import numpy as np
import onnx

from onnxcomp import benchmark as bench
from onnxcomp import cost, depgraph, runtime, search
from onnxcomp import passbase as pb
from onnxcomp.calibration import Calibration
from onnxcomp.chain import write_linear
from onnxcomp.depgraph import DepGraph, Group
from onnxcomp.graph import Graph, check_rewritten
from onnxcomp.importance import CRITERIA, SCORERS, Scoring
from onnxcomp.linear import Layer, batch1_shapes, make_layer, static_shapes
from onnxcomp.model import copy_model
from onnxcomp.moments import Moments, collect_compressed, collect_original
from onnxcomp.refit import REFIT_ROWS_PER_UNKNOWN, shrunk_solve
from onnxcomp.stream import LayerStream
from onnxcomp.timing import Timer

DEFAULT_RATIO = 0.3
# Global allocation never removes more than this share of one group's channels: per-channel
# importances ignore redundancy between channels, which removing many at once exposes.
MAX_GROUP_RATIO = 0.5
# --target-speedup: the most of the prunable MACs ever removed, and the bisection steps spent
# on the least fraction that is fast enough (each one a whole-model measurement).
MAX_MACS_FRACTION = 0.9
SPEED_STEPS = 7


@dataclasses.dataclass(frozen=True)
class PruneConfig(pb.TargetConfig):
    """Options of ``prune_channels``."""

    ratio: float | None = pb.option(
        None,
        "prune_channels: share of every group's channels to remove (default 0.3 without "
        '--target-speedup).')
    criterion: str = pb.option(
        'reconstruction',
        'prune_channels: channel importance.',
        choices=('reconstruction', 'l1', 'l2', 'bn_scale', 'activation'))
    round_to: int = pb.option(0, "prune_channels: keep channel counts a multiple of this (0: the "
                              "provider's channel block, 16 on AVX-512 CPUs, else 8).")
    refit_mode: str = pb.refit_mode_option()
    max_rows: int = 16384
    ridge: float = 1e-3
    seed: int = pb.seed_option()

    def __post_init__(self) -> None:
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise pb.ConfigError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.ratio is not None and self.target_speedup is not None:
            raise pb.ConfigError("give --ratio or --target-speedup, not both")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise pb.ConfigError(f"--target-speedup must be > 1, got {self.target_speedup}")
        if self.criterion not in CRITERIA:
            raise pb.ConfigError(f"--criterion must be one of {', '.join(CRITERIA)}, "
                              f"got '{self.criterion}'")
        if self.round_to < 0:
            raise pb.ConfigError("--round-to must be >= 0 (0: the provider's channel block)")
        if self.refit_mode not in ("asymmetric", "symmetric"):
            raise pb.ConfigError(f"refit mode must be asymmetric or symmetric, got "
                              f"'{self.refit_mode}'")


@dataclasses.dataclass
class _Prepared:
    """Everything that does not depend on the ratio: groups, scores, refit moments."""

    groups: list[Group]
    scores: dict[int, np.ndarray]
    macs_per_channel: dict[int, float]  # MACs one channel of the group costs (batch 1)
    layers: dict[str, Layer]  # consumers of prunable groups, in graph order
    moments: dict[str, Moments]
    targets: dict[str, list[np.ndarray]]  # sampled original output rows per consumer


class PruneChannels(pb.PassBase[PruneConfig], name="prune_channels", lossless=False,
                    calibration=True):
    """The ``prune_channels`` pass."""

    def call(self, model: onnx.ModelProto, config: PruneConfig, calib: Calibration | None,
             ctx: pb.RunContext) -> pb.PassResult:
        """Prune a copy of ``model``; see the module docstring."""
        assert calib is not None  # PassBase gives synthetic inputs (and says so)
        report = pb.Report(self.name)
        if not config.round_to:
            config = dataclasses.replace(config, round_to=runtime.channel_block(config.provider))
        report.metrics["round_to"] = config.round_to
        prep = _prepare(model, config, calib, report)
        if not prep.scores:
            report.note(pb.NOTHING_TO_DO, "no prunable channel group")
            return pb.PassResult(copy_model(model), report)
        if config.target_speedup is None:
            ratio = DEFAULT_RATIO if config.ratio is None else config.ratio
            keep = uniform_keep(prep.scores, ratio, config.round_to)
        else:
            keep = _least_pruning_for_speed(model, prep, config, calib, report, ctx.timer)
        pruned, changes = _build(model, prep, keep, config, calib)
        for change in changes:
            report.apply(change)
        kept = sum(len(k) for k in keep.values())
        total = sum(len(prep.scores[g]) for g in keep)
        if total:
            report.metrics["channels_removed"] = f"{total - kept} of {total}"
        if not changes:
            return pb.PassResult(copy_model(model), report)
        return pb.PassResult(pruned, report)


PASS = PruneChannels()


# ====================================================================== preparation
def _prepare(model: onnx.ModelProto, config: PruneConfig, calib: Calibration,
             report: pb.Report) -> _Prepared:
    graph = Graph(model)
    dep = DepGraph(graph, ignore=config.exclude)
    scores: dict[int, np.ndarray] = {}
    for group in dep.groups:
        if not group.producers:
            continue  # channels of graph inputs or opaque ops: nothing to remove
        node = group.producers[0]
        op = next(n.op for n in graph.nodes if n.name == node)
        if group.blocked:
            report.add_skip(pb.Skip(node, op, pb.SkipReason.BLOCKED, "; ".join(group.blocked[:3])))
        elif group.size <= config.round_to:
            report.add_skip(pb.Skip(node, op, pb.SkipReason.TOO_SMALL,
                                 f"{group.size} channels <= --round-to {config.round_to}"))
        else:
            scores[group.id] = np.zeros(group.size)
    layers, moments, targets = _consumer_moments(model, graph, dep, scores, config, calib)
    if scores:
        _score(graph, dep, scores, config, calib, report, layers, moments)
    per_channel = _macs_per_channel(model, graph, dep, list(scores), calib)
    return _Prepared(dep.groups, scores, per_channel, layers, moments, targets)


def _macs_per_channel(model: onnx.ModelProto, graph: Graph, dep: DepGraph,
                      group_ids: list[int], calib: Calibration) -> dict[int, float]:
    """MACs attributable to one channel of each group (batch 1).

    Every node reading or writing the group's channels counts, pro rata of the group's share
    of that tensor's channels.
    """
    if not group_ids:
        return {}
    costs = cost.model_cost(model, batch1_shapes(model, calib)).by_name()
    out = dict.fromkeys(group_ids, 0.0)
    sizes = {g.id: g.size for g in dep.groups}
    for node in graph.nodes:
        macs = costs[node.name].macs if node.name in costs else 0
        if not macs:
            continue
        for gid in group_ids:
            share = 0.0
            for t in (*node.inputs[:1], *node.outputs[:1]):
                lay = dep.layouts.get(t.name)
                if lay is None or not lay.channels:
                    continue
                mine = sum(n for sp, n in lay.segments if dep.find(sp) == gid)
                share = max(share, mine / lay.channels)
            if share:
                out[gid] += macs * share / max(sizes[gid], 1)
    return out


def _score(graph: Graph, dep: DepGraph, scores: dict[int, np.ndarray], config: PruneConfig,
           calib: Calibration, report: pb.Report, layers: dict[str, Layer],
           moments: dict[str, Moments]) -> None:
    groups = [g for g in dep.groups if g.id in scores]
    sc = Scoring(graph, dep, calib, layers, moments, groups)
    scorer = SCORERS[config.criterion]
    fallback = 0
    for group in groups:
        s = scorer(sc, group)
        if s is None:
            fallback += 1
            s = SCORERS["l2"](sc, group)
            assert s is not None
        scores[group.id] += s
    if fallback:
        report.note("criterion_fallback",
                    f"{config.criterion}: {fallback} group(s) could not be scored that way (no "
                    f"BatchNormalization after a producer, or no refittable consumer): scored "
                    f"by l2 instead")


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


def _consumer_moments(model: onnx.ModelProto, graph: Graph, dep: DepGraph,
                      scores: dict[int, np.ndarray], config: PruneConfig, calib: Calibration
                      ) -> tuple[dict[str, Layer], dict[str, Moments],
                                 dict[str, list[np.ndarray]]]:
    """Input moments and sampled output rows (original model) of every affected consumer."""
    if not scores:
        return {}, {}, {}
    shapes = static_shapes(model, calib)
    layers = []
    for node in _consumers_to_refit(graph, dep, list(scores)):
        layer = make_layer(graph, shapes, node)
        if isinstance(layer, Layer):
            layers.append(layer)
    if not layers:
        return {}, {}, {}
    moments, targets = collect_original(model, layers, calib, config.max_rows, config.seed)
    return ({layer.name: layer for layer in layers},
            {layer.name: m for layer, m in zip(layers, moments, strict=True)},
            {layer.name: t for layer, t in zip(layers, targets, strict=True)})


# ====================================================================== building
def keep_count(size: int, ratio: float, round_to: int) -> int:
    """Channels kept in a group of ``size`` at ``ratio``: a multiple of ``round_to`` (>= it)."""
    want = size * (1.0 - ratio)
    k = int(np.floor(want / round_to + 0.5)) * round_to  # the nearest multiple
    return int(min(size, max(round_to, k)))


def uniform_keep(scores: dict[int, np.ndarray], ratio: float, round_to: int
                 ) -> dict[int, np.ndarray]:
    """The most important channels of every group, ``ratio`` of them removed (rounded)."""
    keep = {}
    for gid, s in scores.items():
        count = keep_count(len(s), ratio, round_to)
        if count < len(s):
            keep[gid] = np.sort(np.argsort(-s, kind="stable")[:count])
    return keep


def global_keep(scores: dict[int, np.ndarray], macs_per_channel: dict[int, float],
                fraction: float, round_to: int) -> dict[int, np.ndarray]:
    """Channels to keep when ``fraction`` of the groups' MACs are removed.

    Blocks of ``round_to`` channels go, least importance per MAC saved first, so per-group
    ratios follow from sensitivity and cost.
    """
    order = {gid: np.argsort(s, kind="stable") for gid, s in scores.items()}  # least first
    removed = dict.fromkeys(scores, 0)
    budget = fraction * sum(len(s) * macs_per_channel.get(g, 0.0) for g, s in scores.items())
    saved = 0.0
    while saved < budget:
        best, best_ratio = None, np.inf
        for gid, s in scores.items():
            n = removed[gid]
            if len(s) - n - round_to < max(round_to, (1 - MAX_GROUP_RATIO) * len(s)):
                continue
            block = order[gid][n:n + round_to]
            gain = round_to * macs_per_channel.get(gid, 0.0)
            if gain <= 0:
                continue
            ratio = float(np.sum(s[block])) / gain
            if ratio < best_ratio:
                best, best_ratio = gid, ratio
        if best is None:
            break
        removed[best] += round_to
        saved += round_to * macs_per_channel[best]
    return {gid: np.sort(order[gid][n:]) for gid, n in removed.items() if n}


def _build(model: onnx.ModelProto, prep: _Prepared, keep: dict[int, np.ndarray],
           config: PruneConfig, calib: Calibration) -> tuple[onnx.ModelProto, list[pb.Change]]:
    if not keep:
        return model, []
    graph = Graph(model)
    dep = DepGraph(graph, ignore=config.exclude)
    sizes = {gid: len(prep.scores[gid]) for gid in keep}
    before = cost.model_cost(model, batch1_shapes(model, calib)).by_name()
    owner = _owners(graph, dep, keep)
    refits = _refits(graph, dep, keep, prep, config)
    out_keeps = {name: dep.keep_indices(prep.layers[name].node.outputs[0].name, keep)
                 for name in refits}
    depgraph.apply(dep, keep)
    for name, (w_new, b_new, _) in refits.items():
        write_linear(graph, name, w_new, b_new)
    pruned = graph.export()
    if config.refit and config.refit_mode == "asymmetric":
        pruned = _asymmetric(pruned, prep, refits, out_keeps, config, calib)
    after = cost.model_cost(pruned, batch1_shapes(pruned, calib)).by_name()
    changes = []
    for gid, k in keep.items():
        group = next(gr for gr in prep.groups if gr.id == gid)
        names = [n for n, o in owner.items() if o == gid]
        first = group.producers[0]
        op = next(n.op for n in graph.nodes if n.name == first) if any(
            n.name == first for n in graph.nodes) else "Conv"
        changes.append(pb.Change(
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
        d = layer.matrix_shape[1]
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
        # Start: the kept weights, with the removed inputs' means folded into the bias.
        removed = np.setdiff1d(np.arange(d), cols)
        mean = xx[d, :d]  # E[x] (x~ = [x; 1])
        bias = target[:, d] + target[:, removed] @ mean[removed]
        sol = np.hstack([target[:, cols], bias[:, None]]) if use_bias else target[:, cols]
        how = "mean compensation"
        if not config.refit:
            pass
        elif m.rows >= REFIT_ROWS_PER_UNKNOWN * unknowns:
            sol = shrunk_solve(xx[np.ix_(sel, sel)], target @ xx[:, sel], sol,
                                         config.ridge)
            how = "least squares"
        else:
            how = (f"mean compensation ({m.rows} rows < {REFIT_ROWS_PER_UNKNOWN}x"
                   f"{unknowns} for a refit)")
        w_cols = sol[:, :len(cols)]
        bias_new = sol[:, len(cols)] if use_bias else None
        out[name] = (w_cols, bias_new, how)
    return out


def _asymmetric(model: onnx.ModelProto, prep: _Prepared,
                refits: dict[str, tuple[np.ndarray, np.ndarray | None, str]],
                out_keeps: dict[str, np.ndarray | None], config: PruneConfig,
                calib: Calibration) -> onnx.ModelProto:
    """Refit consumers again, in graph order, on the pruned network's own activations.

    Targets are the original network's outputs, so errors of earlier layers are corrected
    instead of accumulated (Zhang et al. 2016's asymmetric reconstruction). Consumers whose
    symmetric refit was replaced by mean compensation (too few rows) are left as they are.
    """
    order = list(prep.layers)
    with LayerStream(calib) as stream:
        return _refit_streamed(model, prep, refits, out_keeps, config, calib, order,
                               stream)


def _refit_streamed(model: onnx.ModelProto, prep: _Prepared,
                    refits: dict[str, tuple[np.ndarray, np.ndarray | None, str]],
                    out_keeps: dict[str, np.ndarray | None], config: PruneConfig,
                    calib: Calibration, order: list[str],
                    stream: LayerStream) -> onnx.ModelProto:
    current = model
    # Refits change weights, not shapes: one graph, shapes once, exports unchecked until the
    # end (the stream runs each from where the last one stopped).
    shapes = static_shapes(model, calib)
    graph = Graph(model)
    for name in order:
        if name not in refits or not refits[name][2].startswith("least squares"):
            continue
        node = next((n for n in graph.nodes if n.name == name), None)
        if node is None:  # dead code (its output reaches no graph output): export removed it
            continue
        layer = make_layer(graph, shapes, node)
        if not isinstance(layer, Layer):
            continue
        keep_out = out_keeps[name]
        targets = [t if keep_out is None else t[:, keep_out] for t in prep.targets[name]]
        m = collect_compressed(stream, current, order.index(name), layer, targets,
                               config.max_rows, config.seed)
        xx, xy, _ = m.normalized()
        assert xy is not None
        use_bias = layer.op != "MatMul"
        d = layer.matrix_shape[1]
        sel = np.arange(d + 1) if use_bias else np.arange(d)
        w0, b0, _ = refits[name]
        start = np.hstack([w0, b0[:, None]]) if use_bias and b0 is not None else w0
        sol = shrunk_solve(xx[np.ix_(sel, sel)], xy[sel].T, start, config.ridge)
        write_linear(graph, name, sol[:, :d], sol[:, d] if use_bias else None)
        current = graph.export(check=False)
    if current is not model:
        check_rewritten(current)
    return current


# ====================================================================== speed target
def _least_pruning_for_speed(model: onnx.ModelProto, prep: _Prepared, config: PruneConfig,
                             calib: Calibration, report: pb.Report, timer: Timer
                             ) -> dict[int, np.ndarray]:
    """The least pruning measured (whole model) to be ``target_speedup`` faster.

    Bisection on the fraction of MACs removed, allocated across groups by :func:`global_keep`.
    """
    target = float(config.target_speedup or 1.0)
    feeds = {k: v[:1] for k, v in calib.batches[0].items()}
    cfg = bench.BenchConfig(provider=config.provider, threads=config.threads, warmup=5,
                            runs=config.bench_runs)
    measured: dict[float, float] = {}

    def keep_at(f: float) -> dict[int, np.ndarray]:
        return global_keep(prep.scores, prep.macs_per_channel, f, config.round_to)

    def speed(f: float) -> float:
        if f not in measured:
            pruned, _ = _build(model, prep, keep_at(f), config, calib)
            res = timer.compare([model, pruned], cfg, feeds, around=target)
            measured[f] = float(res.speedups[0].median)
        return measured[f]

    hi = MAX_MACS_FRACTION
    if speed(hi) < target:
        report.target_missed(f"target {target:.3g}x not reached: {speed(hi):.2f}x with "
                             f"{hi:.0%} of the prunable MACs removed; using it")
    else:
        _, hi = search.bracket_float(lambda f: speed(f) >= target, 0.0, hi, SPEED_STEPS)
    report.metrics["macs_fraction_search"] = {str(k): round(v, 3)
                                              for k, v in sorted(measured.items())}
    report.metrics["macs_fraction"] = hi
    return keep_at(hi)
