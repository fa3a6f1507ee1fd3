from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, conv_bn_model, make_model, op_count, tensor
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxcomp.passbase import SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.fold_bn import FoldBNConfig

fold_bn = REGISTRY["fold_bn"]
LOSSLESS = {"rtol": 1e-4, "atol": 1e-5}


def _bn_inits(rng: np.random.Generator, c: int, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        prefix + "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        prefix + "beta": rng.standard_normal(c).astype(np.float32),
        prefix + "mean": rng.standard_normal(c).astype(np.float32),
        prefix + "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def _bn(x: str, y: str, name: str = "bn", prefix: str = "", **attrs) -> object:
    return helper.make_node(
        "BatchNormalization",
        [x, prefix + "gamma", prefix + "beta", prefix + "mean", prefix + "var"], [y],
        name=name, **attrs)


@pytest.mark.parametrize("kw", [
    {}, {"bias": False}, {"groups": 4, "c_in": 8}, {"groups": 8, "c_in": 8},
    {"spatial": 1}, {"spatial": 3, "size": 4}, {"batch": "N"},
])
def test_conv_bn_folded_exactly(kw):
    model = conv_bn_model(**kw)
    result = fold_bn(model, FoldBNConfig())
    assert op_count(result.model, "BatchNormalization") == 0
    assert len(result.report.applied) == 1 and not result.report.skipped
    assert result.report.applied[0].details["bias_created"] == (kw.get("bias") is False)
    assert_equivalent(model, result.model, **LOSSLESS)


@pytest.mark.parametrize(("groups", "bias"), [(1, True), (2, False), (4, True)])
def test_conv_transpose_bn(groups, bias):
    rng = np.random.default_rng(3)
    c_in, c_out_g = 8, 3
    c_out = groups * c_out_g
    inits = {"W": rng.standard_normal([c_in, c_out_g, 3, 3]).astype(np.float32),
             **_bn_inits(rng, c_out)}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(c_out).astype(np.float32)
        inputs.append("B")
    nodes = [helper.make_node("ConvTranspose", inputs, ["c"], name="deconv", group=groups,
                              strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
             _bn("c", "y")]
    model = make_model(nodes, [tensor("x", [1, c_in, 5, 5])], [tensor("y", [1, c_out, 10, 10])],
                       inits)
    result = fold_bn(model, FoldBNConfig())
    assert op_count(result.model, "BatchNormalization") == 0
    assert_equivalent(model, result.model, **LOSSLESS)


@pytest.mark.parametrize(("trans_b", "with_c", "beta"), [(0, True, 1.0), (1, True, 0.5),
                                                          (1, False, 1.0)])
def test_gemm_bn(trans_b, with_c, beta):
    rng = np.random.default_rng(4)
    k, n = 6, 5
    w = rng.standard_normal([n, k] if trans_b else [k, n]).astype(np.float32)
    inits = {"W": w, **_bn_inits(rng, n)}
    inputs = ["x", "W"]
    if with_c:
        inits["C"] = rng.standard_normal(n).astype(np.float32)
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="fc", transB=trans_b, beta=beta,
                              alpha=0.7),
             _bn("g", "y")]
    model = make_model(nodes, [tensor("x", [3, k])], [tensor("y", [3, n])], inits)
    result = fold_bn(model, FoldBNConfig())
    assert op_count(result.model, "BatchNormalization") == 0
    assert_equivalent(model, result.model, **LOSSLESS)


def test_input_untouched_and_deterministic():
    model = conv_bn_model()
    before = model.SerializeToString()
    a = fold_bn(model, FoldBNConfig())
    b = fold_bn(model, FoldBNConfig())
    assert model.SerializeToString() == before
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.model.ir_version == model.ir_version
    assert list(a.model.opset_import) == list(model.opset_import)


def _skip_case(name: str):
    """Models on which fold_bn must not fire, with the reason it must report."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal([4, 4, 3, 3]).astype(np.float32)
    x, y = tensor("x", [1, 4, 6, 6]), tensor("y", [1, 4, 6, 6])
    bn_inits = _bn_inits(rng, 4)
    conv = helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1])
    if name == "UNSUPPORTED_PRODUCER":
        nodes = [conv, helper.make_node("Relu", ["c"], ["r"]), _bn("r", "y")]
        return make_model(nodes, [x], [y], {"W": w, **bn_inits})
    if name == "GRAPH_INPUT":
        return make_model([_bn("x", "y")], [x], [y], bn_inits)
    if name == "MULTIPLE_CONSUMERS":
        nodes = [conv, _bn("c", "b"), helper.make_node("Add", ["b", "c"], ["y"])]
        return make_model(nodes, [x], [y], {"W": w, **bn_inits})
    if name == "GRAPH_OUTPUT":
        nodes = [conv, _bn("c", "y")]
        return make_model(nodes, [x], [y, tensor("c", [1, 4, 6, 6])], {"W": w, **bn_inits})
    if name == "NOT_CONSTANT":
        nodes = [conv, _bn("c", "y")]
        return make_model(nodes, [x, tensor("W", [4, 4, 3, 3])], [y], bn_inits)
    if name == "SHARED_WEIGHT":
        conv2 = helper.make_node("Conv", ["c", "W"], ["d"], name="conv2", pads=[1, 1, 1, 1])
        nodes = [conv, conv2, _bn("d", "y")]
        return make_model(nodes, [x], [y], {"W": w, **bn_inits})
    if name == "UNSUPPORTED_ATTRIBUTE":
        bn = _bn("c", "y", training_mode=1)
        bn.output.extend(["run_mean", "run_var"])
        nodes = [conv, bn]
        return make_model(nodes, [x], [y], {"W": w, **bn_inits})
    raise AssertionError(name)


@pytest.mark.parametrize(("case", "reason"), [
    ("UNSUPPORTED_PRODUCER", SkipReason.UNSUPPORTED_PRODUCER),
    ("GRAPH_INPUT", SkipReason.UNSUPPORTED_PRODUCER),
    ("MULTIPLE_CONSUMERS", SkipReason.MULTIPLE_CONSUMERS),
    ("GRAPH_OUTPUT", SkipReason.GRAPH_OUTPUT),
    ("NOT_CONSTANT", SkipReason.NOT_CONSTANT),
    ("SHARED_WEIGHT", SkipReason.SHARED_WEIGHT),
    ("UNSUPPORTED_ATTRIBUTE", SkipReason.UNSUPPORTED_ATTRIBUTE),
])
def test_must_not_fire(case, reason):
    model = _skip_case(case)
    result = fold_bn(model, FoldBNConfig())
    assert not result.report.applied
    assert [s.reason for s in result.report.skipped] == [reason]
    assert result.model.SerializeToString() == model.SerializeToString()
    assert result.model is not model


@settings(max_examples=30, deadline=None)
@given(
    spatial=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    k=st.sampled_from([1, 3]),
    pad=st.integers(0, 1),
    auto_pad=st.sampled_from(["NOTSET", "SAME_UPPER", "VALID"]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_conv_configs(spatial, groups, stride, dilation, k, pad, auto_pad, bias, seed):
    assume(not (auto_pad.startswith("SAME") and dilation > 1))  # ORT refuses this combination
    rng = np.random.default_rng(seed)
    c_in, c_out, size = 4, 8, 7
    kshape = [k] * spatial
    inits = {"W": rng.standard_normal([c_out, c_in // groups, *kshape]).astype(np.float32),
             **_bn_inits(rng, c_out)}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(c_out).astype(np.float32)
        inputs.append("B")
    attrs = {"group": groups, "strides": [stride] * spatial, "dilations": [dilation] * spatial}
    if auto_pad == "NOTSET":
        attrs["pads"] = [pad] * (2 * spatial)
    else:
        attrs["auto_pad"] = auto_pad
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", **attrs), _bn("c", "y")]
    model = make_model(nodes, [tensor("x", [1, c_in, *[size] * spatial])],
                       [tensor("y", [1, c_out, *[None] * spatial])], inits)
    result = fold_bn(model, FoldBNConfig())
    assert op_count(result.model, "BatchNormalization") == 0
    assert_equivalent(model, result.model, **LOSSLESS)
