"""What onnxcomp knows about ONNX ops, as one table.

Every rule a pass or the engine applies to an op by its type lives here: how it carries
channels (pruning's dependency graph), whether its output holds only values of its input
(int8 ranges shared through it), whether it can be a no-op (canonicalize), whether it is an
elementwise activation (affine folding, the ops that follow a pruned layer), whether ONNX
Runtime's CPU provider runs it in its blocked layout, and whether a decision output may pass
through it (a classifier's argmax read through a Reshape).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

# Weight dtypes the rewrites handle.
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclasses.dataclass(frozen=True)
class OpRule:
    """What is known of one op type (see the module docstring)."""

    # How channels (axis 1) flow: "unary" (each output channel from the same input channel),
    # "binary" (elementwise over broadcast inputs), "per_channel" (unary, with per-channel
    # parameters at ``params``), "" (none of these: handled case by case or blocking).
    channels: str = ""
    params: tuple[int, ...] = ()
    keeps_range: bool = False  # every output value is one of the input's values
    maybe_noop: bool = False  # canonicalize checks whether this node changes anything
    activation: bool = False  # an elementwise activation
    follows_layer: bool = False  # a pruned layer's output channels may pass through it
    nchwc: bool = False  # ONNX Runtime's CPU provider runs it in its blocked layout
    decision_pass_through: bool = False  # a decision output may be read through it


_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh")
_OTHER_UNARY = ("Selu", "Elu", "Softplus", "Softsign", "Neg", "Abs", "Sqrt", "Exp", "Erf",
                "Gelu", "Mish", "Floor", "Ceil", "Round", "Sign", "Reciprocal",
                "ThresholdedRelu", "Celu", "Log", "LpPool")

RULES: dict[str, OpRule] = {
    **{op: OpRule(channels="unary", activation=True, follows_layer=op != "HardSigmoid"
                  and op != "Tanh")
       for op in _ACTIVATIONS},
    **{op: OpRule(channels="unary") for op in _OTHER_UNARY},
    "PRelu": OpRule(follows_layer=True),
    "Identity": OpRule(channels="unary", keeps_range=True, maybe_noop=True, follows_layer=True,
                       decision_pass_through=True),
    "Dropout": OpRule(channels="unary", maybe_noop=True, follows_layer=True),
    "Cast": OpRule(channels="unary", maybe_noop=True, decision_pass_through=True),
    "Pad": OpRule(maybe_noop=True),
    "Transpose": OpRule(keeps_range=True, maybe_noop=True),
    "MaxPool": OpRule(channels="unary", keeps_range=True, nchwc=True),
    "AveragePool": OpRule(channels="unary", nchwc=True),
    "GlobalAveragePool": OpRule(channels="unary", nchwc=True),
    "GlobalMaxPool": OpRule(channels="unary", nchwc=True),
    "Conv": OpRule(nchwc=True),
    "Reshape": OpRule(keeps_range=True, decision_pass_through=True),
    "Flatten": OpRule(keeps_range=True, decision_pass_through=True),
    "Squeeze": OpRule(keeps_range=True, decision_pass_through=True),
    "Unsqueeze": OpRule(keeps_range=True, decision_pass_through=True),
    **{op: OpRule(channels="binary") for op in ("Add", "Sub", "Mul", "Div", "Max", "Min",
                                                   "Pow", "Sum")},
    "BatchNormalization": OpRule(channels="per_channel", params=(1, 2, 3, 4),
                                 follows_layer=True),
    "InstanceNormalization": OpRule(channels="per_channel", params=(1, 2)),
}


def ops_where(test: Callable[[OpRule], bool]) -> frozenset[str]:
    """The op types whose rule passes ``test``."""
    return frozenset(op for op, rule in RULES.items() if test(rule))


UNARY = ops_where(lambda r: r.channels == "unary")
BINARY = ops_where(lambda r: r.channels == "binary")
PER_CHANNEL_PARAMS = {op: r.params for op, r in RULES.items() if r.channels == "per_channel"}
RANGE_KEEPING = ops_where(lambda r: r.keeps_range)
NOOP_CANDIDATES = ops_where(lambda r: r.maybe_noop)
ACTIVATIONS = ops_where(lambda r: r.activation)
FOLLOWERS = ops_where(lambda r: r.follows_layer)
NCHWC_OPS = ops_where(lambda r: r.nchwc)
DECISION_PASS_THROUGH = ops_where(lambda r: r.decision_pass_through)
