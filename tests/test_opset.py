from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, make_model, tensor
from onnx import helper

from onnxcomp.errors import ConfigError
from onnxcomp.model import default_opset
from onnxcomp.passbase import SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.opset import OpsetConfig

opset = REGISTRY["opset"]


def _clip_model(version: int):
    """Conv -> Clip(0, 6): Clip's bounds are attributes before opset 11, inputs from 11 on."""
    w = np.random.default_rng(0).standard_normal([4, 3, 3, 3]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [tensor("x", [1, 3, 5, 5])], [tensor("y", [1, 4, 5, 5])],
                      {"W": w}, opset=version)


def test_upgrade_keeps_the_outputs():
    model = _clip_model(11)
    result = opset(model, OpsetConfig(target_opset=13))
    assert default_opset(result.model) == 13
    assert result.report.applied[0].details == {"from": 11, "to": 13}
    assert_equivalent(model, result.model, rtol=1e-5, atol=1e-6)
    assert opset.lossless


def test_nothing_to_do_at_or_past_the_target():
    model = _clip_model(17)
    result = opset(model, OpsetConfig(target_opset=13))
    assert not result.report.applied
    assert result.report.skipped[0].reason is SkipReason.NOT_NEEDED
    assert result.model.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("target", [9, 30])
def test_target_out_of_range(target):
    with pytest.raises(ConfigError, match="--target-opset"):
        OpsetConfig(target_opset=target)
