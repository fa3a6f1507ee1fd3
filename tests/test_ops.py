from __future__ import annotations

from onnxcomp import ops


def test_the_table_gives_the_sets_the_passes_use():
    assert {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze",
                                 "Unsqueeze", "Identity"} == ops.RANGE_KEEPING
    assert {"Identity", "Dropout", "Cast", "Transpose", "Pad"} == ops.NOOP_CANDIDATES
    assert {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool",
                             "GlobalMaxPool"} == ops.NCHWC_OPS
    assert {"Identity", "Reshape", "Flatten", "Squeeze",
                                         "Unsqueeze", "Cast"} == ops.DECISION_PASS_THROUGH
    assert ops.PER_CHANNEL_PARAMS == {"BatchNormalization": (1, 2, 3, 4),
                                      "InstanceNormalization": (1, 2)}


def test_rules_are_consistent():
    # An activation maps each channel to itself; so does whatever a pruned layer's channels
    # pass through (except PRelu, whose slope is per channel and pruned with it).
    assert ops.ACTIVATIONS <= ops.UNARY
    assert ops.FOLLOWERS - {"PRelu"} <= ops.UNARY | set(ops.PER_CHANNEL_PARAMS)
    # A range-keeping op never computes new values: no activation, no arithmetic.
    assert not ops.RANGE_KEEPING & (ops.ACTIVATIONS | ops.BINARY)
    assert not ops.UNARY & ops.BINARY
