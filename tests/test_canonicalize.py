from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, make_model, op_count, tensor
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.passbase import SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.canonicalize import CanonicalizeConfig

canon = REGISTRY["canonicalize"]
LOSSLESS = {"rtol": 1e-4, "atol": 1e-5}
RNG = np.random.default_rng(7)
W = RNG.standard_normal([4, 3, 3, 3]).astype(np.float32)


def _const(name: str, value: np.ndarray):
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(value, name))


def _pad_conv(pads, mode="constant", value=None, opset=17, axes=None, conv_attrs=None):
    inits = {"W": W, "pads": np.asarray(pads, dtype=np.int64)}
    pad_inputs = ["x", "pads"]
    if value is not None or axes is not None:
        inits["value"] = np.asarray(0.0 if value is None else value, dtype=np.float32)
        pad_inputs.append("value")
    if axes is not None:
        inits["axes"] = np.asarray(axes, dtype=np.int64)
        pad_inputs.append("axes")
    nodes = [
        helper.make_node("Pad", pad_inputs, ["p"], name="pad", mode=mode),
        helper.make_node("Conv", ["p", "W"], ["y"], name="conv",
                         **(conv_attrs if conv_attrs is not None else {"pads": [1, 0, 0, 1]})),
    ]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, None, None])],
                      inits, opset=opset)


def test_constant_node_becomes_initializer():
    nodes = [_const("W", W), helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 6, 6])])
    result = canon(model, CanonicalizeConfig())
    assert op_count(result.model, "Constant") == 0
    assert "W" in {i.name for i in result.model.graph.initializer}
    assert result.report.applied[0].what == "Constant node -> initializer"
    assert_equivalent(model, result.model, **LOSSLESS)


def test_noops_removed():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"], name="id1"),
        helper.make_node("Dropout", ["a"], ["b"], name="drop"),
        helper.make_node("Cast", ["b"], ["c"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["c"], ["d"], name="tr", perm=[0, 1, 2, 3]),
        helper.make_node("Conv", ["d", "W"], ["e"], name="conv"),
        helper.make_node("Identity", ["e"], ["y"], name="id_out"),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 6, 6])],
                       {"W": W})
    result = canon(model, CanonicalizeConfig())
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert {c.node for c in result.report.applied} == {"id1", "drop", "cast", "tr", "id_out"}
    assert_equivalent(model, result.model, **LOSSLESS)


@pytest.mark.parametrize("opset", [13, 17])
def test_pad_folded_into_conv(opset):
    model = _pad_conv([0, 0, 1, 2, 0, 0, 2, 1], opset=opset)
    result = canon(model, CanonicalizeConfig())
    assert op_count(result.model, "Pad") == 0
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    pads = next(a for a in conv.attribute if a.name == "pads").ints
    assert list(pads) == [2, 2, 2, 2]
    assert_equivalent(model, result.model, **LOSSLESS)


def test_pad_with_axes_opset18():
    model = _pad_conv([1, 0, 2, 1], opset=18, axes=[2, 3])
    result = canon(model, CanonicalizeConfig())
    assert op_count(result.model, "Pad") == 0
    assert_equivalent(model, result.model, **LOSSLESS)


def test_zero_pad_removed():
    model = _pad_conv([0] * 8, conv_attrs={"auto_pad": "SAME_UPPER"})
    result = canon(model, CanonicalizeConfig())
    assert op_count(result.model, "Pad") == 0
    assert result.report.applied[0].what == "removed no-op"


def test_fold_pad_can_be_disabled():
    model = _pad_conv([0, 0, 1, 1, 0, 0, 1, 1])
    result = canon(model, CanonicalizeConfig(fold_pad=False))
    assert result.report.skipped[0].reason is SkipReason.USER_EXCLUDED
    assert result.model.SerializeToString() == model.SerializeToString()


def _two_readers():
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "W"], ["y"], name="conv"),
        helper.make_node("Conv", ["p", "W"], ["z"], name="conv2"),
    ]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])],
                      [tensor("y", [1, 4, 8, 8]), tensor("z", [1, 4, 8, 8])],
                      {"W": W, "pads": np.asarray([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)})


def _pool_reader():
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
        helper.make_node("MaxPool", ["p"], ["y"], name="pool", kernel_shape=[2, 2]),
    ]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 3, 9, 9])],
                      {"pads": np.asarray([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)})


def _constant_output():
    nodes = [_const("k", W)]
    return make_model(nodes, [], [tensor("k", [4, 3, 3, 3])])


def _identity_in_to_out():
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    return make_model(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 3])])


@pytest.mark.parametrize(("build", "reason"), [
    (lambda: _pad_conv([0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
     SkipReason.UNSUPPORTED_ATTRIBUTE),
    (lambda: _pad_conv([0, 0, 1, 1, 0, 0, 1, 1], value=1.0), SkipReason.UNSUPPORTED_ATTRIBUTE),
    (lambda: _pad_conv([0, 1, 1, 1, 0, 0, 1, 1]), SkipReason.UNSUPPORTED_ATTRIBUTE),
    (lambda: _pad_conv([0, 0, -1, 0, 0, 0, 0, 0]), SkipReason.UNSUPPORTED_ATTRIBUTE),
    (lambda: _pad_conv([0, 0, 1, 1, 0, 0, 1, 1], conv_attrs={"auto_pad": "VALID"}),
     SkipReason.UNSUPPORTED_ATTRIBUTE),
    (_two_readers, SkipReason.MULTIPLE_CONSUMERS),
    (_pool_reader, SkipReason.UNSUPPORTED_PRODUCER),
    (_constant_output, SkipReason.GRAPH_OUTPUT),
    (_identity_in_to_out, SkipReason.GRAPH_OUTPUT),
])
def test_must_not_fire(build, reason):
    model = build()
    before = model.SerializeToString()
    result = canon(model, CanonicalizeConfig())
    assert not result.report.applied
    assert [s.reason for s in result.report.skipped] == [reason]
    assert result.model.SerializeToString() == before
    assert model.SerializeToString() == before


def _hardswish_nodes(form: str, clip_attrs: bool) -> list:
    """x*relu6(x+3)/6 as exporters write it (several orders)."""
    clip = (helper.make_node("Clip", ["a"], ["c"], name="clip", min=0.0, max=6.0) if clip_attrs
            else helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"))
    nodes = [helper.make_node("Conv", ["x", "W"], ["v"], name="conv"),
             helper.make_node("Add", ["v", "three"], ["a"], name="add3"), clip]
    if form == "mul_then_div":
        nodes += [helper.make_node("Mul", ["v", "c"], ["m"], name="mul"),
                  helper.make_node("Div", ["m", "six"], ["y"], name="div6")]
    elif form == "mul_then_sixth":
        nodes += [helper.make_node("Mul", ["c", "v"], ["m"], name="mul"),
                  helper.make_node("Mul", ["m", "sixth"], ["y"], name="mul6")]
    else:  # div first
        nodes += [helper.make_node("Div", ["c", "six"], ["g"], name="div6"),
                  helper.make_node("Mul", ["v", "g"], ["y"], name="mul")]
    return nodes


@pytest.mark.parametrize(("form", "opset", "fused_op"), [
    ("mul_then_div", 13, "HardSigmoid"), ("mul_then_sixth", 13, "HardSigmoid"),
    ("div_then_mul", 13, "HardSigmoid"), ("mul_then_div", 14, "HardSwish"),
    ("mul_then_div", 10, "HardSigmoid"),
])
def test_elementwise_hardswish_becomes_one_op(form, opset, fused_op):
    rng = np.random.default_rng(2)
    inits = {"W": (3 * rng.standard_normal([4, 4, 1, 1])).astype(np.float32),
             "three": np.array(3.0, np.float32), "six": np.array(6.0, np.float32),
             "zero": np.array(0.0, np.float32), "sixth": np.array(1 / 6, np.float32)}
    model = make_model(_hardswish_nodes(form, clip_attrs=opset < 11),
                       [tensor("x", [1, 4, 5, 5])], [tensor("y", [1, 4, 5, 5])], inits,
                       opset=opset)
    result = canon(model, CanonicalizeConfig())
    fused = [c for c in result.report.applied if c.op_type == "HardSwish"]
    assert len(fused) == 1
    assert op_count(result.model, "Clip") == 0 and op_count(result.model, "Div") == 0
    assert op_count(result.model, fused_op) == 1
    assert_equivalent(model, result.model, rtol=1e-5, atol=1e-5)


def test_hardswish_lookalikes_are_left_alone():
    """relu6(x+3)*x/6 where the Clip output also feeds a graph output, or the Add adds 2."""
    rng = np.random.default_rng(3)
    inits = {"W": rng.standard_normal([4, 4, 1, 1]).astype(np.float32),
             "three": np.array(2.0, np.float32), "six": np.array(6.0, np.float32),
             "zero": np.array(0.0, np.float32)}
    model = make_model(_hardswish_nodes("mul_then_div", False), [tensor("x", [1, 4, 5, 5])],
                       [tensor("y", [1, 4, 5, 5])], inits)
    result = canon(model, CanonicalizeConfig())
    assert op_count(result.model, "Clip") == 1
    inits["three"] = np.array(3.0, np.float32)
    model = make_model(_hardswish_nodes("mul_then_div", False), [tensor("x", [1, 4, 5, 5])],
                       [tensor("y", [1, 4, 5, 5]), tensor("c", [1, 4, 5, 5])], inits)
    result = canon(model, CanonicalizeConfig())
    assert op_count(result.model, "Clip") == 1
