"""How important each channel of a pruning group is: one scorer per ``--criterion``.

A group (:mod:`onnxcomp.depgraph`) is a set of coupled channels pruned together. Its channels
are ranked by a scorer: the filters' L1 / L2 norms, the |gamma| of the BatchNormalization after
each producer, the mean |activation| on the calibration data, or how much the consumers'
outputs change without the channel (``reconstruction``, He et al., "Channel Pruning for
Accelerating Very Deep Neural Networks", ICCV 2017, without its LASSO search). A scorer
returns None where it cannot score a group; the caller falls back to L2 and says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from onnxcomp import capture, depgraph
from onnxcomp.calibration import Calibration
from onnxcomp.depgraph import DepGraph, Group
from onnxcomp.graph import Graph
from onnxcomp.linear import Layer
from onnxcomp.moments import Moments
from onnxcomp.ops import FOLLOWERS


@dataclasses.dataclass
class Scoring:
    """What the importance scorers read; activation sums are captured once, for all groups."""

    graph: Graph
    dep: DepGraph
    calib: Calibration
    layers: dict[str, Layer]
    moments: dict[str, Moments]
    groups: list[Group]
    _sums: dict[str, np.ndarray] | None = None

    def producers(self, group: Group) -> list[Any]:
        """The nodes that write the group's channels."""
        nodes = {n.name: n for n in self.graph.nodes}
        return [nodes[name] for name in group.producers]

    def activation_sums(self) -> dict[str, np.ndarray]:
        """Per watched tensor (after each producer's BN/activations): sum of |x| per channel."""
        if self._sums is None:
            watch = list(dict.fromkeys(_after_followers(self.graph, n.outputs[0])
                                       for g in self.groups for n in self.producers(g)))
            sums: dict[str, np.ndarray] = {}
            for batch in capture.iter_capture(self.graph.source, watch, self.calib):
                for t, x in batch.items():
                    axes = tuple(i for i in range(x.ndim) if i != 1)
                    m = np.abs(x).astype(np.float64).sum(axis=axes)
                    sums[t] = sums[t] + m if t in sums else m
            self._sums = sums
        return self._sums


def _normalized(s: np.ndarray) -> np.ndarray:
    return s / max(float(np.mean(s)), 1e-30)


def _by_norm(p: int) -> Callable[[Scoring, Group], np.ndarray | None]:
    def score(sc: Scoring, group: Group) -> np.ndarray:
        return sum((_normalized(_filter_norms(sc.graph, n, p)) for n in sc.producers(group)),
                   np.zeros(group.size))
    return score


def _by_bn_scale(sc: Scoring, group: Group) -> np.ndarray | None:
    """|gamma| of the BatchNormalization after each producer; None if one has none."""
    found = [_bn_scale(sc.graph, n) for n in sc.producers(group)]
    if any(s is None for s in found):
        return None
    return sum((_normalized(s) for s in found if s is not None), np.zeros(group.size))


def _by_activation(sc: Scoring, group: Group) -> np.ndarray:
    sums = sc.activation_sums()
    return sum((_normalized(sums[_after_followers(sc.graph, n.outputs[0])])
                for n in sc.producers(group)), np.zeros(group.size))


def _by_reconstruction(sc: Scoring, group: Group) -> np.ndarray | None:
    return _contributions(sc.dep, group.id, sc.layers, sc.moments)


# --criterion: how each group's channels are ranked. A scorer returns None when it cannot
# score a group (no BN to read, no refittable consumer): l2 is used there, and said.
SCORERS: dict[str, Callable[[Scoring, Group], np.ndarray | None]] = {
    "l1": _by_norm(1),
    "l2": _by_norm(2),
    "bn_scale": _by_bn_scale,
    "activation": _by_activation,
    "reconstruction": _by_reconstruction,
}


CRITERIA = tuple(SCORERS)


def _contributions(dep: DepGraph, group_id: int, layers: dict[str, Layer],
                   moments: dict[str, Moments]) -> np.ndarray | None:
    """Per channel: how much the consumers' outputs change if it alone is removed.

    ``E||W[:, c] (x_c - E x_c)||^2 / E||y||^2`` summed over the consumers (centered: the
    refit or the mean compensation puts the channel's mean back through the bias), after
    He et al. 2017's criterion without its LASSO search.
    """
    total: np.ndarray | None = None
    for name, layer in layers.items():
        feats = depgraph.channel_features(dep, layer.node.inputs[0].name, group_id)
        if feats is None:
            continue
        xx, _, _ = moments[name].normalized()
        d = layer.matrix_shape[1]
        mean = xx[d, :d]
        cov = xx[:d, :d] - np.outer(mean, mean)
        t = layer.matrix
        energy = float(np.sum((t @ xx[:d, :d]) * t)) + 1e-30
        if layer.is_conv:
            k = int(np.prod(layer.weight.shape[2:]))
            cols = (feats[:, :, None] * k + np.arange(k)[None, None, :]).reshape(len(feats), -1)
        else:
            cols = feats
        contrib = np.array([float(np.sum((t[:, c] @ cov[np.ix_(c, c)]) * t[:, c]))
                            for c in cols]) / energy
        total = contrib if total is None else total + contrib
    return total


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
