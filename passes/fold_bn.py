"""Fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm (lossless).

Reference: S. Ioffe, C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", 2015, arXiv:1502.03167 (inference-time BN is affine).

Before::

    x -> Conv(W, b) -> t -> BatchNormalization(gamma, beta, mean, var, eps) -> y

After::

    x -> Conv(W', b') -> y

with, per output channel o, ``s[o] = gamma[o] / sqrt(var[o] + eps)``,
``W'[o] = W[o] * s[o]`` and ``b'[o] = (b[o] - mean[o]) * s[o] + beta[o]`` (``b = 0`` when the
producer has no bias; one is created). ConvTranspose scales its weight along the output-channel
axis (axis 1, per group); Gemm scales the columns of ``op(B)`` and folds ``beta * C``.

Supported: float16/32/64 weights stored as constants, any groups/dilation/dimensionality,
BN in inference mode with a single output. Skipped, with a reason: a BN whose input is a graph
input or not produced by Conv/ConvTranspose/Gemm, a producer output read by another node or
exposed as a graph output, weights that are not constant or are shared with another node,
BN statistics that are not constant, BN in training mode or with its extra outputs used.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from onnxcomp import passbase as pb
from onnxcomp.graph import Graph, Node
from onnxcomp.graphpass import GraphPass, foldable_weights

PRODUCERS = ("Conv", "ConvTranspose", "Gemm")

if TYPE_CHECKING:
    from onnxcomp.calibration import Calibration


@dataclasses.dataclass(frozen=True)
class FoldBNConfig(pb.PassConfig):
    """fold_bn has no options."""


class FoldBN(GraphPass, name="fold_bn", lossless=True, config=FoldBNConfig):
    """Fold inference-mode BatchNormalization into its producer."""

    nothing = "no BatchNormalization folded"

    def rewrite(self, graph: Graph, config: pb.PassConfig, calib: Calibration | None,
                report: pb.Report) -> None:
        """Fold every foldable BatchNormalization of ``graph``."""
        for bn in graph.nodes_of("BatchNormalization"):
            skip = self.check(graph, bn)
            if skip is not None:
                report.add_skip(skip)
                continue
            report.apply(self.fold(graph, bn))

    def check(self, graph: Graph, bn: Node) -> pb.Skip | None:
        """A Skip with the reason this BN cannot be folded, or None."""
        x = bn.inputs[0]
        prod = graph.producer(x)
        if prod is None or prod.op not in PRODUCERS:
            found = "a graph input" if prod is None else prod.op
            return pb.Skip(bn.name, bn.op, pb.SkipReason.UNSUPPORTED_PRODUCER,
                        f"input comes from {found}")
        if int(bn.attrs.get("training_mode", 0)) != 0:
            return pb.Skip(bn.name, bn.op, pb.SkipReason.UNSUPPORTED_ATTRIBUTE, "training_mode=1")
        if any(t.outputs or graph.is_graph_output(t) for t in bn.outputs[1:]):
            return pb.Skip(bn.name, bn.op, pb.SkipReason.UNSUPPORTED_ATTRIBUTE,
                        "running-stat outputs used")
        if len(prod.outputs) != 1 or len(x.outputs) != 1:
            return pb.Skip(bn.name, bn.op, pb.SkipReason.MULTIPLE_CONSUMERS,
                        f"{prod.name} output is read by {len(x.outputs)} nodes")
        if graph.is_graph_output(x):
            return pb.Skip(bn.name, bn.op, pb.SkipReason.GRAPH_OUTPUT,
                           f"{x.name} is a graph output")
        stats = [graph.const_value(t) for t in bn.inputs[1:5]]
        if any(s is None for s in stats):
            return pb.Skip(bn.name, bn.op, pb.SkipReason.NOT_CONSTANT,
                           "BN parameters are not constant")
        if prod.op == "Gemm" and len(x.shape or ()) != 2:
            return pb.Skip(bn.name, bn.op, pb.SkipReason.UNKNOWN_SHAPE, "Gemm output rank unknown")
        return foldable_weights(graph, prod, [prod], bn)

    def fold(self, graph: Graph, bn: Node) -> pb.Change:
        """Fold ``bn`` into its producer; return the change record."""
        prod = graph.producer(bn.inputs[0])
        assert prod is not None  # guaranteed by check()
        gamma, beta, mean, var = (
            np.asarray(graph.const_value(t), dtype=np.float64) for t in bn.inputs[1:5]
        )
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        w_tensor = prod.inputs[1]
        w = graph.const_value(w_tensor)
        assert w is not None
        dtype = w.dtype
        b_tensor = graph.input(prod, 2)
        b_old = graph.const_value(b_tensor) if b_tensor is not None else None

        if prod.op == "Conv":
            w_new = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            b0 = np.zeros(w.shape[0]) if b_old is None else b_old.astype(np.float64)
            b_new = b0 * scale + shift
        elif prod.op == "ConvTranspose":
            groups = int(prod.attrs.get("group", 1))
            c_in, c_out_g = w.shape[0], w.shape[1]
            per_group = scale.reshape(groups, c_out_g)
            factor = np.repeat(per_group, c_in // groups, axis=0)  # [c_in, c_out_g]
            w_new = w.astype(np.float64) * factor.reshape(factor.shape + (1,) * (w.ndim - 2))
            b0 = np.zeros(groups * c_out_g) if b_old is None else b_old.astype(np.float64)
            b_new = b0 * scale + shift
        else:  # Gemm: y = alpha * op(A) op(B) + beta * C
            trans_b = int(prod.attrs.get("transB", 0))
            w_new = w.astype(np.float64) * (scale[:, None] if trans_b else scale[None, :])
            beta_c = float(prod.attrs.get("beta", 1.0))
            c0 = np.zeros(scale.shape) if b_old is None else beta_c * b_old.astype(np.float64)
            b_new = c0 * scale + shift
            prod.attrs["beta"] = 1.0

        params_before = w.size + (0 if b_old is None else b_old.size) + 4 * scale.size
        new_w = graph.constant(f"{w_tensor.name}_bnfold", w_new.astype(dtype))
        new_b = graph.constant(f"{prod.name}_bias_bnfold", b_new.astype(dtype))
        while len(prod.inputs) < 3:
            prod.inputs.append(new_b)
        prod.inputs[1] = new_w
        prod.inputs[2] = new_b
        # The producer now writes the BN's output tensor; BN is retired.
        prod.outputs[0] = bn.outputs[0]
        graph.retire([bn])
        return pb.Change(
            node=bn.name,
            op_type=bn.op,
            what=f"folded into {prod.op} {prod.name}",
            params_before=int(params_before),
            params_after=int(w_new.size + b_new.size),
            details={"into": prod.name, "bias_created": b_old is None},
        )


PASS = FoldBN()
