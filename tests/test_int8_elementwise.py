"""Static int8 quantizes the SiLU / Add / Concat / Split / MaxPool / Resize between int8 layers."""
from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnxruntime as ort
from builders import make_model, tensor
from onnx import helper
from test_quantize import quantize, static_config

from onnxcomp import fidelity
from onnxcomp.calibration import Calibration
from onnxcomp.passes.quantize import QuantizeConfig


def _silu(x: str, name: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Sigmoid", [x], [f"{name}_s"], name=f"{name}_sig"),
            helper.make_node("Mul", [x, f"{name}_s"], [f"{name}_m"], name=f"{name}_mul")]


def _c2f_like():
    """conv-SiLU, Split, conv-SiLU on a half, residual Add, Concat, MaxPool, Resize, conv.

    The output conv feeds a Mul by a constant and a Sigmoid that are the graph's outputs.
    """
    rng = np.random.default_rng(0)

    def w(o, i, k=3):
        return (rng.standard_normal([o, i, k, k]) / np.sqrt(i * k * k)).astype(np.float32)

    inits = {"W1": w(16, 4), "W2": w(8, 8), "W3": w(8, 24, 1), "S": np.float32(0.5),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             *_silu("a", "a"),
             helper.make_node("Split", ["a_m"], ["p", "q"], name="split", axis=1,
                              num_outputs=2),
             helper.make_node("Conv", ["q", "W2"], ["b"], name="c2", pads=[1] * 4),
             *_silu("b", "b"),
             helper.make_node("Add", ["q", "b_m"], ["r"], name="add"),
             helper.make_node("Concat", ["p", "q", "r"], ["cat"], name="cat", axis=1),
             helper.make_node("MaxPool", ["cat"], ["mp"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Resize", ["mp", "", "scales"], ["up"], name="up",
                              mode="nearest"),
             helper.make_node("Conv", ["up", "W3"], ["y"], name="c3"),
             helper.make_node("Mul", ["y", "S"], ["half"], name="by_const"),
             helper.make_node("Sigmoid", ["half"], ["score"], name="score")]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("score", [1, 8, 8, 8])],
                       inits, opset=18)
    x = rng.standard_normal([32, 4, 8, 8]).astype(np.float32)
    return model, Calibration([{"x": x[i:i + 1]} for i in range(32)], False, "test")


def _qdq_inputs(model: onnx.ModelProto) -> set[str]:
    """The tensors a QuantizeLinear reads."""
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _runs(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """Op counts of the graph ONNX Runtime runs (after its QDQ fusions)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath)
                               .graph.node)


def test_silu_add_concat_run_on_integers(tmp_path):
    model, calib = _c2f_like()
    config = static_config(calibrator="minmax", min_params=0, max_drop=math.inf,
                           rounding=False, bias_correction=False)
    result = quantize(model, config, calib)
    assert QuantizeConfig().elementwise  # on by default
    quantized = _qdq_inputs(result.model)
    # the SiLU's sigmoid, the Split parts, the Add and Concat outputs, MaxPool and Resize
    assert {"a_s", "b_s", "p", "r", "cat", "mp", "up"} <= quantized
    # a Mul by a constant and the graph output stay float
    assert not {"half", "score"} & quantized
    ops = _runs(result.model, tmp_path)
    assert ops["QLinearSigmoid"] == 2 and ops["QLinearMul"] == 2, ops
    assert ops["QLinearAdd"] == 1 and ops["QLinearConcat"] == 1, ops
    assert ops["Sigmoid"] == 1 and ops["Mul"] == 1, ops  # the float tail
    ref = fidelity.Reference.of(model, calib)
    assert ref.compare(result.model).rel_l2 < 0.05


def test_without_it_the_silu_stays_float(tmp_path):
    model, calib = _c2f_like()
    config = static_config(calibrator="minmax", min_params=0, max_drop=math.inf,
                           rounding=False, bias_correction=False, elementwise=False)
    result = quantize(model, config, calib)
    assert not {"a_s", "b_s", "p", "cat"} & _qdq_inputs(result.model)
    ops = _runs(result.model, tmp_path)
    assert ops["QLinearSigmoid"] == 0 and ops["Sigmoid"] == 3, ops


def test_split_maxpool_and_resize_keep_their_source_grid():
    model, calib = _c2f_like()
    result = quantize(model, static_config(calibrator="minmax", min_params=0,
                                           max_drop=math.inf, rounding=False,
                                           bias_correction=False), calib)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    q = {n.input[0]: n for n in result.model.graph.node if n.op_type == "QuantizeLinear"}

    def grid(name):
        node = q[name]
        return float(inits[node.input[1]]), int(inits[node.input[2]])

    assert grid("p") == grid("a_m")  # Split parts: the source's grid
    assert grid("up") == grid("mp") == grid("cat")  # Resize and MaxPool pass it on


def _split_then(op: str, **attrs):
    """conv -> Split -> (op on one part) -> conv, the other part -> conv; Concat of both."""
    rng = np.random.default_rng(1)
    w = {k: (rng.standard_normal(s) / 6).astype(np.float32)
         for k, s in (("W1", [8, 4, 3, 3]), ("W2", [4, 4, 1, 1]), ("W3", [4, 4, 1, 1]))}
    extra = {"scales": np.array([1, 1, 2, 2], np.float32)} if op == "Resize" else {}
    inputs = ["p", "", "scales"] if op == "Resize" else ["p"]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Split", ["a"], ["p", "q"], name="split", axis=1, num_outputs=2),
             helper.make_node(op, inputs, ["t"], name="op", **attrs),
             helper.make_node("Conv", ["t", "W2"], ["y1"], name="c2"),
             helper.make_node("Conv", ["q", "W3"], ["y2"], name="c3")]
    out_hw = 16 if op == "Resize" else 8
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])],
                       [tensor("y1", [1, 4, out_hw, out_hw]), tensor("y2", [1, 4, 8, 8])],
                       {**w, **extra}, opset=18)
    x = rng.standard_normal([16, 4, 8, 8]).astype(np.float32)
    return model, Calibration([{"x": x[i:i + 1]} for i in range(16)], False, "test")


def _grid(model: onnx.ModelProto, name: str) -> tuple[float, int]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name]
    return float(inits[q.input[1]]), int(inits[q.input[2]])


def test_a_transpose_after_a_split_keeps_the_source_grid():
    model, calib = _split_then("Transpose", perm=[0, 1, 3, 2])
    result = quantize(model, static_config(calibrator="minmax", min_params=0,
                                           max_drop=math.inf, rounding=False,
                                           bias_correction=False), calib)
    assert _grid(result.model, "t") == _grid(result.model, "p") == _grid(result.model, "a")


def test_a_cubic_resize_gets_its_own_range():
    grids = {}
    for mode in ("nearest", "cubic"):
        model, calib = _split_then("Resize", mode=mode)
        result = quantize(model, static_config(calibrator="minmax", min_params=0,
                                               max_drop=math.inf, rounding=False,
                                               bias_correction=False), calib)
        grids[mode] = (_grid(result.model, "t"), _grid(result.model, "p"))
    assert grids["nearest"][0] == grids["nearest"][1]
    assert grids["cubic"][0] != grids["cubic"][1]  # it overshoots: calibrated on its own
