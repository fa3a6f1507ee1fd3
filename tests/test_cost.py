from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.cost import ModelCost, file_size, model_cost
from onnxcomp.passbase import InputError

IR_VERSION = 8
OPSET = 17
RNG_SEED = 0

Dims = Sequence[int | str]


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Dims]],
    outputs: Sequence[str],
    weights: dict[str, np.ndarray],
    input_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A checked model; output types are taken from shape inference, nothing else is inferred."""
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info(name, input_type, list(dims)) for name, dims in inputs],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    for out in model.graph.output:
        out.type.CopyFrom(types[out.name])
    onnx.checker.check_model(model)
    return model


def weights(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(RNG_SEED).standard_normal(shape).astype(dtype)


def conv_model(
    in_shape: Sequence[int | str],
    w_shape: Sequence[int],
    bias: bool = False,
    **attrs: Any,
) -> onnx.ModelProto:
    inputs = ["x", "W", "B"] if bias else ["x", "W"]
    tensors = {"W": weights(*w_shape)}
    if bias:
        tensors["B"] = weights(w_shape[0])
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    return make_model([node], [("x", in_shape)], ["y"], tensors)


def only(cost: ModelCost, name: str) -> tuple[int, int]:
    node = cost.by_name()[name]
    return node.params, node.macs


# ---------------------------------------------------------------------------- Conv


@pytest.mark.parametrize(
    ("in_shape", "w_shape", "attrs", "out_spatial"),
    [
        # 1-D, 2-D, 3-D, no padding
        ((1, 3, 10), (4, 3, 3), {}, (8,)),
        ((1, 3, 10, 12), (4, 3, 3, 3), {}, (8, 10)),
        ((1, 3, 6, 7, 8), (4, 3, 3, 3, 3), {}, (4, 5, 6)),
        # padded, strided, dilated
        ((1, 3, 10, 10), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}, (10, 10)),
        ((1, 3, 11, 11), (4, 3, 3, 3), {"strides": [2, 2]}, (5, 5)),
        ((1, 3, 11, 11), (4, 3, 3, 3), {"dilations": [2, 2]}, (7, 7)),
        ((1, 3, 10, 10), (4, 3, 3, 3), {"pads": [1, 0, 2, 1], "strides": [2, 3]}, (6, 3)),
        # auto_pad
        ((1, 3, 11, 10), (4, 3, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (6, 5)),
        ((1, 3, 11, 10), (4, 3, 3, 3), {"auto_pad": "VALID", "strides": [2, 2]}, (5, 4)),
    ],
)
def test_conv_macs_and_params(
    in_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    attrs: dict[str, Any],
    out_spatial: tuple[int, ...],
) -> None:
    cost = model_cost(conv_model(in_shape, w_shape, **attrs))
    c_out, c_in_per_group, *kernel = w_shape
    expected_macs = (
        in_shape[0] * c_out * math.prod(out_spatial) * c_in_per_group * math.prod(kernel)
    )
    assert only(cost, "conv") == (math.prod(w_shape), expected_macs)
    assert cost.by_name()["conv"].output_shape == (in_shape[0], c_out, *out_spatial)
    assert cost.macs == expected_macs
    assert cost.params == math.prod(w_shape)
    assert cost.weight_bytes == 4 * math.prod(w_shape)


def test_grouped_conv() -> None:
    # 8 -> 12 channels in 4 groups: each output sees 2 input channels.
    cost = model_cost(conv_model((2, 8, 5, 5), (12, 2, 3, 3), bias=True, group=4))
    assert only(cost, "conv") == (12 * 2 * 9 + 12, 2 * 12 * 3 * 3 * 2 * 9)


def test_depthwise_conv() -> None:
    cost = model_cost(
        conv_model((1, 16, 8, 8), (16, 1, 3, 3), group=16, pads=[1, 1, 1, 1], strides=[2, 2])
    )
    assert only(cost, "conv") == (16 * 9, 16 * 4 * 4 * 9)


def conv_out(size: int, k: int, stride: int, dilation: int, pad: tuple[int, int], mode: str) -> int:
    if mode.startswith("SAME"):
        return -(-size // stride)
    effective = dilation * (k - 1) + 1
    if mode == "VALID":
        pad = (0, 0)
    return (size + pad[0] + pad[1] - effective) // stride + 1


@dataclasses.dataclass(frozen=True)
class ConvCase:
    batch: int
    groups: int
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    mode: str
    pads: tuple[int, ...]
    spatial: tuple[int, ...]
    bias: bool


@st.composite
def conv_cases(draw: st.DrawFn) -> ConvCase:
    ndim = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    mode = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    # SAME_* output sizes ignore dilation; keep it 1 there.
    dilations = tuple(
        1 if mode.startswith("SAME") else draw(st.integers(1, 2)) for _ in range(ndim)
    )
    spatial = tuple(
        d * (k - 1) + 1 + draw(st.integers(0, 4)) for k, d in zip(kernel, dilations, strict=True)
    )
    return ConvCase(
        batch=draw(st.integers(1, 3)),
        groups=groups,
        c_in=groups * draw(st.integers(1, 3)),
        c_out=groups * draw(st.integers(1, 3)),
        kernel=kernel,
        strides=tuple(draw(st.integers(1, 3)) for _ in range(ndim)),
        dilations=dilations,
        mode=mode,
        pads=tuple(draw(st.integers(0, 2)) for _ in range(2 * ndim)),
        spatial=spatial,
        bias=draw(st.booleans()),
    )


@settings(max_examples=50, deadline=None)
@given(conv_cases())
def test_conv_property(case: ConvCase) -> None:
    ndim = len(case.kernel)
    attrs: dict[str, Any] = {
        "group": case.groups,
        "strides": case.strides,
        "dilations": case.dilations,
        "auto_pad": case.mode,
    }
    if case.mode == "NOTSET":
        attrs["pads"] = case.pads
    c_in_per_group = case.c_in // case.groups
    model = conv_model(
        (case.batch, case.c_in, *case.spatial),
        (case.c_out, c_in_per_group, *case.kernel),
        bias=case.bias,
        **attrs,
    )
    out = [
        conv_out(size, k, s, d, (case.pads[i], case.pads[i + ndim]), case.mode)
        for i, (size, k, s, d) in enumerate(
            zip(case.spatial, case.kernel, case.strides, case.dilations, strict=True)
        )
    ]
    node = model_cost(model).by_name()["conv"]
    assert node.output_shape == (case.batch, case.c_out, *out)
    expected_macs = (
        case.batch * case.c_out * math.prod(out) * c_in_per_group * math.prod(case.kernel)
    )
    assert node.macs == expected_macs
    weight_count = case.c_out * c_in_per_group * math.prod(case.kernel)
    assert node.params == weight_count + (case.c_out if case.bias else 0)


# ---------------------------------------------------------------------------- other MAC ops


def test_conv_transpose_with_stride() -> None:
    node = helper.make_node(
        "ConvTranspose", ["x", "W", "B"], ["y"], name="deconv", strides=[2, 2], group=2
    )
    # C_in = 4, C_out = 2 * 3 = 6 in 2 groups, 3x3 kernel, 5x5 input -> 11x11 output.
    model = make_model(
        [node], [("x", (1, 4, 5, 5))], ["y"], {"W": weights(4, 3, 3, 3), "B": weights(6)}
    )
    cost = model_cost(model)
    assert only(cost, "deconv") == (4 * 3 * 9 + 6, 1 * 4 * 5 * 5 * 3 * 9)
    assert cost.by_name()["deconv"].output_shape == (1, 6, 11, 11)


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "a_shape", "b_shape"),
    [(0, 0, (2, 16), (16, 8)), (0, 1, (2, 16), (8, 16)), (1, 1, (16, 2), (8, 16))],
)
def test_gemm(
    trans_a: int, trans_b: int, a_shape: tuple[int, int], b_shape: tuple[int, int]
) -> None:
    node = helper.make_node(
        "Gemm", ["a", "B", "C"], ["y"], name="fc", transA=trans_a, transB=trans_b
    )
    model = make_model([node], [("a", a_shape)], ["y"], {"B": weights(*b_shape), "C": weights(8)})
    cost = model_cost(model)
    assert only(cost, "fc") == (16 * 8 + 8, 2 * 8 * 16)
    assert cost.by_name()["fc"].output_shape == (2, 8)


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "expected"),
    [
        ((4, 5), (5, 6), 4 * 6 * 5),
        ((2, 3, 4, 5), (5, 6), 2 * 3 * 4 * 6 * 5),
        ((3, 1, 4, 5), (2, 5, 6), 3 * 2 * 4 * 6 * 5),
        ((5,), (5, 6), 6 * 5),
        ((2, 4, 5), (5,), 2 * 4 * 5),
    ],
)
def test_batched_matmul(a_shape: tuple[int, ...], b_shape: tuple[int, ...], expected: int) -> None:
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    model = make_model([node], [("a", a_shape), ("b", b_shape)], ["y"], {})
    assert only(model_cost(model), "mm") == (0, expected)


def test_matmul_with_constant_weight_counts_params() -> None:
    node = helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")
    model = make_model([node], [("a", ("N", 7, 5))], ["y"], {"W": weights(5, 6)})
    assert only(model_cost(model), "mm") == (30, 7 * 6 * 5)


def test_qlinear_conv_counts_like_conv() -> None:
    scalars: dict[str, np.ndarray] = {
        "xs": np.array(0.1, np.float32),
        "xz": np.array(0, np.uint8),
        "ws": np.array(0.2, np.float32),
        "wz": np.array(0, np.int8),
        "ys": np.array(0.3, np.float32),
        "yz": np.array(0, np.uint8),
    }
    tensors: dict[str, np.ndarray] = {
        **scalars,
        "W": weights(4, 3, 3, 3, dtype=np.int8),
        "B": np.zeros(4, np.int32),
    }
    node = helper.make_node(
        "QLinearConv", ["x", "xs", "xz", "W", "ws", "wz", "ys", "yz", "B"], ["y"], name="qconv"
    )
    model = make_model([node], [("x", (1, 3, 6, 6))], ["y"], tensors, TensorProto.UINT8)
    cost = model_cost(model)
    # Weight and int32 bias are parameters; scales and zero points are not.
    assert only(cost, "qconv") == (108 + 4, 4 * 4 * 4 * 27)
    assert cost.params == 112
    assert cost.weight_bytes == 108 + 4 * 4 + 3 * 4 + 3


def test_matmul_integer_counts_like_matmul() -> None:
    node = helper.make_node("MatMulInteger", ["a", "W"], ["y"], name="mmi")
    tensors = {"W": weights(5, 6, dtype=np.int8)}
    model = make_model([node], [("a", (2, 3, 5))], ["y"], tensors, TensorProto.INT8)
    assert only(model_cost(model), "mmi") == (30, 2 * 3 * 6 * 5)


# ---------------------------------------------------------------------------- shapes


def test_symbolic_batch_resolved_from_input_shapes() -> None:
    model = conv_model(("N", 3, 8, 8), (4, 3, 3, 3))
    default = model_cost(model)
    assert default.by_name()["conv"].output_shape == (1, 4, 6, 6)
    batch4 = model_cost(model, {"x": (4, 3, 8, 8)})
    assert batch4.macs == 4 * default.macs > 0
    assert batch4.by_name()["conv"].output_shape == (4, 4, 6, 6)


def test_already_inferred_model_with_symbolic_batch() -> None:
    model = onnx.shape_inference.infer_shapes(conv_model(("N", 3, 8, 8), (4, 3, 3, 3)))
    assert any(v.name == "y" for v in model.graph.output)
    before = model.SerializeToString()
    assert model_cost(model, {"x": [4, 3, 8, 8]}).macs == 4 * 4 * 36 * 27
    assert model_cost(model).macs == 4 * 36 * 27
    assert model.SerializeToString() == before


def test_unknown_spatial_dims_give_zero_macs_and_name_the_layers() -> None:
    model = conv_model(("N", 3, "H", "W"), (4, 3, 3, 3))
    cost = model_cost(model)
    assert only(cost, "conv") == (108, 0)
    assert cost.by_name()["conv"].output_shape is not None
    assert cost.unknown_shapes == ("conv",)
    # Given the spatial dims it is counted.
    known = model_cost(model, {"x": (2, 3, 5, 5)})
    assert known.macs == 2 * 4 * 9 * 27 and known.unknown_shapes == ()


def test_bad_input_shapes_raise() -> None:
    model = conv_model(("N", 3, 8, 8), (4, 3, 3, 3))
    with pytest.raises(InputError, match="not a graph input"):
        model_cost(model, {"nope": (1, 3, 8, 8)})
    with pytest.raises(InputError, match="rank"):
        model_cost(model, {"x": (1, 3, 8)})
    with pytest.raises(InputError, match="fixed to 3"):
        model_cost(model, {"x": (1, 4, 8, 8)})


# ---------------------------------------------------------------------------- params rule


def test_shared_initializer_counted_once() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y1", "W"], ["y2"], name="c2", pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, [("x", (1, 4, 5, 5))], ["y2"], {"W": weights(4, 4, 3, 3)})
    cost = model_cost(model)
    assert only(cost, "c1") == only(cost, "c2") == (144, 4 * 25 * 36)
    assert cost.params == 144
    assert cost.weight_bytes == 144 * 4
    assert cost.macs == 2 * 4 * 25 * 36


def test_constant_node_weights_are_params() -> None:
    w = weights(4, 3, 1, 1)
    nodes = [
        helper.make_node("Constant", [], ["W"], name="w", value=numpy_helper.from_array(w, "W")),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
    ]
    model = make_model(nodes, [("x", (1, 3, 4, 4))], ["y"], {})
    cost = model_cost(model)
    assert only(cost, "conv") == (12, 4 * 16 * 3)
    assert cost.params == 12
    assert cost.weight_bytes == 48


def test_shape_constants_are_not_params() -> None:
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["m"], name="mul"),
        helper.make_node("Reshape", ["m", "shape"], ["y"], name="reshape"),
    ]
    tensors = {"scale": weights(1, 3, 1, 1), "shape": np.array([1, -1], np.int64)}
    model = make_model(nodes, [("x", (1, 3, 2, 2))], ["y"], tensors)
    cost = model_cost(model)
    assert only(cost, "mul") == (3, 0)
    assert only(cost, "reshape") == (0, 0)
    assert cost.by_name()["reshape"].weight_bytes == 16
    assert cost.params == 3
    assert cost.weight_bytes == 12 + 16
    assert cost.by_name()["reshape"].output_shape == (1, 12)


def test_unnamed_nodes_get_graph_style_names_and_dict_is_json() -> None:
    node = helper.make_node("Conv", ["x", "W"], ["y"])
    model = make_model([node], [("x", (1, 3, 4, 4))], ["y"], {"W": weights(2, 3, 3, 3)})
    cost = model_cost(model)
    assert [n.name for n in cost.nodes] == ["Conv_0"]
    data = json.loads(json.dumps(cost.to_dict()))
    assert data["macs"] == cost.macs
    assert data["nodes"][0]["output_shape"] == [1, 2, 2, 2]


# ---------------------------------------------------------------------------- file_size


def test_file_size_plain(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_model((1, 3, 8, 8), (4, 3, 3, 3)), str(path))
    assert file_size(path) == path.stat().st_size


def test_file_size_with_external_data(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(
        conv_model((1, 3, 8, 8), (16, 3, 3, 3), bias=True),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    data = tmp_path / "m.onnx.data"
    assert data.stat().st_size >= 16 * 27 * 4
    assert file_size(path) == path.stat().st_size + data.stat().st_size


def test_file_size_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        file_size(tmp_path / "absent.onnx")
