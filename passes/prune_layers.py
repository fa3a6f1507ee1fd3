"""Whole-layer pruning: drop residual branches and identity-shaped convs (lossy).

Source: the "Compressing ConvNets Using Pruning Filters and Layers" thesis this project is
seeded with (layer importance, then removal of the least important layers); the refit of the
next layer is Zhang et al. 2016's asymmetric reconstruction (arXiv:1505.06798).

Removable units::

    residual branch:   y = x + f(x)          =>  y = x          (the Add becomes identity)
    identity-shaped:   x -> Conv(C->C, stride 1, same size) [-> BN -> activation] -> z
                                             =>  z = x          (the chain is dropped)

Each unit's importance is measured on the calibration data as the relative change of the
model's outputs when it alone is removed. The least important units go (``--layers N``, or
one at a time until ``--target-speedup`` is measured on the provider); then every Conv / Gemm
/ MatMul that reads a replaced tensor is refit by least squares, in graph order, on the pruned
network's activations with the original network's outputs as targets.

Skipped units (listed in the report): the ones not selected (with their importance), and
graph outputs or weights that are not constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxcomp import benchmark as bench
from onnxcomp import capture, cost, search, verify
from onnxcomp import passbase as pb
from onnxcomp.calibration import Calibration
from onnxcomp.chain import write_linear
from onnxcomp.graph import Graph, check_rewritten
from onnxcomp.linear import Layer, batch1_shapes, make_layer, static_shapes
from onnxcomp.model import copy_model
from onnxcomp.moments import collect_compressed, collect_original
from onnxcomp.ops import FOLLOWERS
from onnxcomp.refit import REFIT_ROWS_PER_UNKNOWN, shrunk_solve
from onnxcomp.stream import LayerStream
from onnxcomp.timing import Timer

# Up to this many candidates, importance is measured with the next layers refit (what the
# removal really costs); beyond, without (one model run per candidate).
REFIT_SCORING_UNITS = 24
# Refit the linear layers downstream of a removed unit, level by level (the first ones reached,
# the ones after them, ...): several layers share the work of standing in for what was
# removed. Three levels measured best on the Fashion-MNIST VGG (two: -1.30 %, three: -1.06 %,
# six: -1.20 % test accuracy for one conv removed); at most this many layers per level.
REFIT_DEPTH_FANOUT = 4
REFIT_LEVELS = 3


@dataclasses.dataclass(frozen=True)
class PruneLayersConfig(pb.TargetConfig):
    """Options of ``prune_layers``."""

    layers: int | None = pb.option(None, 'prune_layers: how many layers to remove '
                                         '(default 1 without --target-speedup).')
    # Sampled output positions per refit layer. Refits here stand in for a whole missing
    # layer, so they use many rows: on the Fashion-MNIST VGG every position of 256 images
    # (50 176) gave -0.96 % test accuracy for one conv removed, 16 384 gave -1.06 %.
    max_rows: int = 65536
    ridge: float = 1e-9
    seed: int = pb.seed_option()

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise pb.ConfigError(f"--layers must be >= 1, got {self.layers}")
        if self.layers is not None and self.target_speedup is not None:
            raise pb.ConfigError("give --layers or --target-speedup, not both")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise pb.ConfigError(f"--target-speedup must be > 1, got {self.target_speedup}")


@dataclasses.dataclass(frozen=True)
class Unit:
    """A removable piece of the graph: ``nodes`` go, readers of ``out`` read ``src`` instead."""

    kind: str  # "residual branch" | "identity-shaped conv"
    head: str  # the node named in the report (the Add or the Conv)
    op: str
    nodes: tuple[str, ...]
    src: str
    out: str


class PruneLayers(pb.PassBase[PruneLayersConfig], name="prune_layers", lossless=False,
                  calibration=True):
    """The ``prune_layers`` pass."""

    def call(self, model: onnx.ModelProto, config: PruneLayersConfig, calib: Calibration | None,
             ctx: pb.RunContext) -> pb.PassResult:
        """Remove the least important units of a copy of ``model``.

        Units (a residual branch, an identity-shaped conv chain) are ranked by how much
        removing each alone changes the outputs on the calibration data, then removed in that
        order up to ``--layers`` or ``--target-speedup``.
        """
        assert calib is not None  # PassBase gives synthetic inputs (and says so)
        report = pb.Report(self.name)
        units = find_units(Graph(model), config.exclude, report)
        if not units:
            report.note(pb.NOTHING_TO_DO, "no removable layer")
            return pb.PassResult(copy_model(model), report)
        names, ref = verify_outputs(model, calib)
        importance = {}
        with_refit = config.refit and len(units) <= REFIT_SCORING_UNITS
        for unit in units:
            alone = _finish(model, [unit], config, calib) if with_refit else remove(model, [unit])
            _, got = verify_outputs(alone, calib)
            importance[unit.head] = verify.compare_outputs(names, ref, got).rel_l2
        report.metrics["importance"] = "after refit" if with_refit else "without refit"
        before = cost.model_cost(model, batch1_shapes(model, calib)).by_name()

        def saved(u: Unit) -> int:
            return sum(before[n].macs for n in u.nodes if n in before)

        # Least important first; among equals (e.g. exact zeros), the one saving most.
        ranked = sorted(units, key=lambda u: (round(importance[u.head], 9), -saved(u)))
        if config.target_speedup is None:
            chosen = _disjoint(ranked, config.layers or 1)
            pruned = _finish(model, chosen, config, calib)
        else:
            chosen, pruned = _fewest_layers_for_speed(model, ranked, config, calib, report,
                                                      ctx.timer)
        for unit in ranked:
            if unit in chosen:
                report.apply(pb.Change(
                    node=unit.head, op_type=unit.op, what=f"removed {unit.kind}",
                    params_before=sum(before[n].params for n in unit.nodes if n in before),
                    params_after=0, macs_before=saved(unit),
                    macs_after=0, error=round(importance[unit.head], 6),
                    details={"nodes": list(unit.nodes), "importance": importance[unit.head],
                             "refit": "asymmetric" if config.refit else "none"}))
            else:
                report.skip(unit.head, unit.op, pb.SkipReason.NOT_SELECTED,
                            f"{unit.kind}; output change if removed {importance[unit.head]:.4g}")
        if not chosen:
            return pb.PassResult(copy_model(model), report)
        return pb.PassResult(pruned, report)


PASS = PruneLayers()


def verify_outputs(model: onnx.ModelProto, calib: Calibration
                   ) -> tuple[list[str], list[np.ndarray]]:
    """Output names and outputs on the calibration data."""
    return [o.name for o in model.graph.output], capture.run_model(model, calib)


# ====================================================================== finding units
def find_units(graph: Graph, exclude: Sequence[str], report: pb.Report) -> list[Unit]:
    """Residual branches and identity-shaped convs of ``graph``."""
    units: list[Unit] = []
    for node in graph.nodes:
        if node.name in exclude:
            report.skip(node.name, node.op, pb.SkipReason.USER_EXCLUDED, "--exclude")
            continue
        unit = None
        if node.op == "Add":
            unit = _residual(graph, node)
        elif node.op == "Conv":
            unit = _identity_conv(graph, node, report)
        if unit is not None:
            units.append(unit)
    return units


def _residual(graph: Graph, add: Any) -> Unit | None:
    if len(add.inputs) != 2 or any(graph.const_value(t) is not None for t in add.inputs):
        return None
    if graph.is_graph_output(add.outputs[0]):
        return None
    for skip_i in (0, 1):
        skip, branch_out = add.inputs[skip_i], add.inputs[1 - skip_i]
        if graph.shape(skip) != graph.shape(add.outputs[0]):
            continue
        nodes = _branch(graph, skip, branch_out, add)
        if nodes:
            return Unit("residual branch", add.name, "Add", (*nodes, add.name),
                        skip.name, add.outputs[0].name)
    return None


def _branch(graph: Graph, src: Any, out: Any, add: Any) -> list[str] | None:
    """Nodes computing ``out`` from ``src`` (and constants) only, used only inside; or None."""
    nodes: dict[str, Any] = {}
    stack = [out]
    while stack:
        t = stack.pop()
        if t is src or graph.const_value(t) is not None:
            continue
        prod = graph.producer(t)
        if prod is None or graph.is_graph_output(t):
            return None
        if prod.name in nodes:
            continue
        nodes[prod.name] = prod
        stack.extend(prod.inputs)
    if not nodes:
        return None
    inside = set(nodes) | {add.name}
    for node in nodes.values():
        for t in node.outputs:
            if graph.is_graph_output(t) or any(c.name not in inside for c in t.outputs):
                return None
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted(nodes, key=lambda n: order[n])


def _identity_conv(graph: Graph, conv: Any, report: pb.Report) -> Unit | None:
    w = graph.const_value(graph.input(conv, 1))
    x, y = conv.inputs[0], conv.outputs[0]
    if w is None or w.ndim != 4 or w.shape[0] != w.shape[1]:
        return None
    if int(conv.attrs.get("group", 1)) != 1 or graph.shape(x) != graph.shape(y):
        return None
    if any(int(s) != 1 for s in conv.attrs.get("strides", [1, 1])):
        return None
    nodes, t = [conv.name], y
    while (len(t.outputs) == 1 and not graph.is_graph_output(t)
           and t.outputs[0].op in FOLLOWERS and t.outputs[0].inputs[0] is t):
        nodes.append(t.outputs[0].name)
        t = t.outputs[0].outputs[0]
    if graph.is_graph_output(t):
        report.skip(conv.name, "Conv", pb.SkipReason.GRAPH_OUTPUT,
                    "its chain ends at a graph output")
        return None
    return Unit("identity-shaped conv", conv.name, "Conv", tuple(nodes), x.name, t.name)


def _disjoint(ranked: list[Unit], count: int) -> list[Unit]:
    """The first ``count`` units of ``ranked`` that share no node with an earlier pick."""
    chosen: list[Unit] = []
    used: set[str] = set()
    for unit in ranked:
        if len(chosen) == count:
            break
        if used.isdisjoint(unit.nodes) and all(u.src not in unit.nodes for u in chosen):
            chosen.append(unit)
            used.update(unit.nodes)
    return chosen


# ====================================================================== removing
def remove(model: onnx.ModelProto, units: Sequence[Unit]) -> onnx.ModelProto:
    """``model`` without ``units`` (no refit)."""
    graph = Graph(model)
    tensors = graph.gs.tensors()
    by_name = {n.name: n for n in graph.nodes}
    gone: dict[str, Any] = {}  # output of a removed unit -> the tensor that replaced it
    for unit in units:
        src, out = tensors[unit.src], tensors[unit.out]
        while src.name in gone:  # this unit reads what an earlier one removed
            src = gone[src.name]
        gone[out.name] = src
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = src
        graph.retire(by_name[n] for n in unit.nodes)
    return graph.export()


def _finish(model: onnx.ModelProto, units: Sequence[Unit], config: PruneLayersConfig,
            calib: Calibration) -> onnx.ModelProto:
    """Remove ``units`` and refit the layers that read what they replaced."""
    pruned = remove(model, units)
    if not config.refit or not units:
        return pruned
    graph = Graph(model)
    readers: list[str] = []
    for unit in units:
        level = _next_linear(graph, graph.gs.tensors()[unit.out])
        for _ in range(REFIT_LEVELS):
            readers += level
            nxt: list[str] = []
            for name in level[:REFIT_DEPTH_FANOUT]:  # and the layers after them
                node = next(n for n in graph.nodes if n.name == name)
                nxt += _next_linear(graph, node.outputs[0])
            level = nxt
    removed = {n for unit in units for n in unit.nodes}  # a later unit may read an earlier
    readers = [r for r in dict.fromkeys(readers) if r not in removed]
    if not readers:
        return pruned
    shapes = static_shapes(model, calib)
    made = [make_layer(graph, shapes, n) for n in graph.nodes
            if n.name in readers]
    layers = [layer for layer in made if isinstance(layer, Layer)]
    if not layers:
        return pruned
    _, targets = collect_original(model, layers, calib, config.max_rows, config.seed)
    with LayerStream(calib) as stream:
        return _refit_streamed(pruned, layers, targets, config, calib, stream)


def _refit_streamed(pruned: onnx.ModelProto, layers: list[Layer],
                    targets: list[list[np.ndarray]], config: PruneLayersConfig,
                    calib: Calibration, stream: LayerStream
                    ) -> onnx.ModelProto:
    current = pruned
    # Refits change weights, not shapes: one graph, shapes once, exports unchecked until the
    # end (the stream runs each from where the last one stopped).
    shapes = static_shapes(pruned, calib)
    g = Graph(pruned)
    for index, layer in enumerate(layers):
        node = next(n for n in g.nodes if n.name == layer.name)
        now = make_layer(g, shapes, node)
        if not isinstance(now, Layer):
            continue
        m = collect_compressed(stream, current, index, now, targets[index],
                               config.max_rows, config.seed)
        if m.rows < REFIT_ROWS_PER_UNKNOWN * (now.matrix_shape[1] + 1):
            continue
        xx, xy, _ = m.normalized()
        assert xy is not None
        d = now.matrix_shape[1]
        use_bias = now.op != "MatMul"
        sel = np.arange(d + 1) if use_bias else np.arange(d)
        start = np.hstack([now.matrix, now.bias_vector[:, None]]) if use_bias else now.matrix
        sol = shrunk_solve(xx[np.ix_(sel, sel)], xy[sel].T, start, config.ridge)
        write_linear(g, node.name, sol[:, :d], sol[:, d] if use_bias else None)
        current = g.export(check=False)
    if current is not pruned:
        check_rewritten(current)
    return current


def _next_linear(graph: Graph, tensor: Any) -> list[str]:
    """The Conv / Gemm / MatMul nodes first reached downstream of ``tensor``."""
    found: list[str] = []
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        for c in t.outputs:
            if c.name in seen:
                continue
            seen.add(c.name)
            if c.op in ("Conv", "Gemm", "MatMul"):
                found.append(c.name)
            else:
                stack.extend(c.outputs)
    return found


def _fewest_layers_for_speed(model: onnx.ModelProto, ranked: list[Unit],
                             config: PruneLayersConfig, calib: Calibration, report: pb.Report,
                             timer: Timer) -> tuple[list[Unit], onnx.ModelProto]:
    """The fewest units (least important first) whose removal measures fast enough.

    More units removed is faster, so the count is bisected (see onnxcomp/search.py): the
    most that can go is measured first, then about log2 of the count more.
    """
    target = float(config.target_speedup or 1.0)
    feeds = {k: v[:1] for k, v in calib.batches[0].items()}
    cfg = bench.BenchConfig(provider=config.provider, threads=config.threads, warmup=5,
                            runs=config.bench_runs)
    most = 0
    while most < len(ranked) and len(_disjoint(ranked, most + 1)) == most + 1:
        most += 1
    measured: dict[int, float] = {0: 1.0}

    def fast_enough(count: int) -> bool:
        if count not in measured:
            candidate = remove(model, _disjoint(ranked, count))
            res = timer.compare([model, candidate], cfg, feeds, around=target)
            measured[count] = float(res.speedups[0].median)
        return measured[count] >= target

    count = most
    if most and fast_enough(most):
        _, count = search.bracket(fast_enough, 0, most)
    report.metrics["measured_speedup_before_refit"] = round(measured[count], 3)
    report.metrics["layers_search"] = {str(k): round(v, 3) for k, v in sorted(measured.items())}
    if measured[count] < target:
        report.target_missed(f"target {target:.3g}x not reached: {measured[count]:.2f}x with every "
                             f"removable layer gone")
    chosen = _disjoint(ranked, count) if count else []
    pruned = _finish(model, chosen, config, calib) if chosen else model
    return chosen, pruned
