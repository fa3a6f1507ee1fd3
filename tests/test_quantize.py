from __future__ import annotations

import numpy as np
import pytest
from builders import calibration, conv_model, make_model, random_feeds, run, tensor
from onnx import TensorProto, helper

from onnxcomp.passbase import ConfigError, SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.quantize import QuantizeConfig, huffman_bits_of, kmeans_quantize

quantize = REGISTRY["quantize"]


def _on_grid(bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    qmax = 2 ** (bits - 1) - 1
    q = rng.integers(-qmax, qmax + 1, size=[16, 8, 3, 3])
    q[:, 0, 0, 0] = qmax  # every channel reaches the grid's end: its scale is exact
    scale = rng.uniform(0.01, 0.1, 16)
    return (q * scale[:, None, None, None]).astype(np.float32)


def _outputs_equal(a, b, tol=0.0):
    feeds = random_feeds(a, 0)
    ya, yb = run(a, feeds)[0], run(b, feeds)[0]
    np.testing.assert_allclose(yb, ya, rtol=tol or 1e-5, atol=tol or 1e-5)


def test_int8_on_grid_weights_survive_exactly():
    model = conv_model(_on_grid(8), pads=[1] * 4)
    result = quantize(model, QuantizeConfig(bits=8), calibration(model))
    change = result.report.applied[0]
    assert change.details["weight_rel_error"] < 1e-6
    assert change.details["bytes_after"] < change.details["bytes_before"] / 3.5
    types = {i.name: i.data_type for i in result.model.graph.initializer}
    assert TensorProto.INT8 in types.values()
    assert [n.op_type for n in result.model.graph.node] == ["DequantizeLinear", "Conv"]
    _outputs_equal(model, result.model)


def test_int4_is_packed_on_opset_21():
    w = _on_grid(4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1] * 4)]
    model = make_model(nodes, [tensor("x", [1, 8, 8, 8])], [tensor("y", [1, 16, 8, 8])],
                       {"W": w}, opset=21, ir_version=10)
    result = quantize(model, QuantizeConfig(bits=4), calibration(model))
    assert result.report.applied[0].details["storage"] == "int4"
    q = next(i for i in result.model.graph.initializer if i.data_type == TensorProto.INT4)
    assert len(q.raw_data) == w.size // 2  # two weights per byte
    assert result.model.ByteSize() < model.ByteSize() / 4
    _outputs_equal(model, result.model)


def test_int4_before_opset_21_is_stored_as_int8_and_said():
    model = conv_model(_on_grid(4), pads=[1] * 4)
    result = quantize(model, QuantizeConfig(bits=4), calibration(model))
    assert any("opset >= 21" in n for n in result.report.notes)
    assert result.report.applied[0].details["storage"] == "int8"
    _outputs_equal(model, result.model)


def test_kmeans_exact_when_few_distinct_values():
    rng = np.random.default_rng(2)
    values = rng.standard_normal(16)
    w = values[rng.integers(0, 16, size=[16, 8, 3, 3])].astype(np.float32)
    model = conv_model(w, pads=[1] * 4)
    result = quantize(model, QuantizeConfig(mode="kmeans", bits=4), calibration(model))
    d = result.report.applied[0].details
    assert d["weight_rel_error"] < 1e-6 and d["centroids"] == 16
    assert {n.op_type for n in result.model.graph.node} == {"Cast", "Gather", "Conv"}
    _outputs_equal(model, result.model)


def test_kmeans_error_falls_with_bits():
    w = np.random.default_rng(3).standard_normal([64, 64])
    errors = [kmeans_quantize(w, b, 20)[2] for b in (2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_huffman_bits():
    symbols = np.array([0] * 50 + [1] * 25 + [2] * 25)
    assert huffman_bits_of(symbols) == 50 * 1 + 25 * 2 + 25 * 2
    assert huffman_bits_of(np.zeros(10)) == 10


def test_second_run_leaves_quantized_weights_alone():
    model = conv_model(_on_grid(8), pads=[1] * 4)
    once = quantize(model, QuantizeConfig(), calibration(model))
    twice = quantize(once.model, QuantizeConfig(), calibration(model))
    assert not twice.report.applied
    assert [s.reason for s in twice.report.skipped] == [SkipReason.NOT_CONSTANT]


def test_tiny_weights_skipped():
    model = conv_model(np.ones([4, 4, 3, 3], np.float32), pads=[1] * 4)
    result = quantize(model, QuantizeConfig(), calibration(model))
    assert [s.reason for s in result.report.skipped] == [SkipReason.TOO_SMALL]


def _static_model():
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal([16, 8, 3, 3]).astype(np.float32) * 0.2
    w2 = rng.standard_normal([8, 16, 3, 3]).astype(np.float32) * 0.2
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", pads=[1] * 4)]
    return make_model(nodes, [tensor("x", ["N", 8, 8, 8])], [tensor("y", ["N", 8, 8, 8])],
                      {"W1": w1, "W2": w2})


@pytest.mark.parametrize("calibrator", ["minmax", "percentile"])
def test_static_qdq_runs_and_stays_close(calibrator):
    from builders import relative_error

    model = _static_model()
    calib = calibration(model, n=8, batch=2)
    result = quantize(model, QuantizeConfig(mode="static", calibrator=calibrator,
                                            min_params=0), calib)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("QuantizeLinear") == 3  # x, relu output, y (the graph output keeps its name)
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert relative_error(model, result.model, calib) < 0.05
    assert result.report.metrics["activations_quantized"] == 3


def test_static_percentile_needs_enough_samples():
    from onnxcomp.passbase import InputError

    model = _static_model()
    with pytest.raises(InputError, match="at least 8"):
        quantize(model, QuantizeConfig(mode="static", min_params=0),
                 calibration(model, n=2, batch=2))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"mode": "static", "bits": 4}, "8-bit"), ({"calibrator": "entropy"}, "--calibrator"),
    ({"bits": 3}, "4 or 8"),
    ({"mode": "kmeans", "bits": 9}, "1..8"), ({"mode": "binary"}, "--mode"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        QuantizeConfig(**kwargs)


def test_per_channel_before_opset_13_uses_a_mul():
    w = _on_grid(8)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1] * 4)]
    model = make_model(nodes, [tensor("x", [1, 8, 8, 8])], [tensor("y", [1, 16, 8, 8])],
                       {"W": w}, opset=12, ir_version=7)
    result = quantize(model, QuantizeConfig(bits=8), calibration(model))
    assert [n.op_type for n in result.model.graph.node] == ["DequantizeLinear", "Mul", "Conv"]
    assert result.report.applied[0].details["weight_rel_error"] < 1e-6
    _outputs_equal(model, result.model)


def test_static_before_opset_13_uses_per_tensor_weights():
    model = _static_model()
    model.opset_import[0].version = 12
    model.ir_version = 7
    result = quantize(model, QuantizeConfig(mode="static", calibrator="minmax", min_params=0),
                      calibration(model, n=4, batch=2))
    ops = [n.op_type for n in result.model.graph.node]
    assert "Mul" not in ops
    dqs = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(not any(a.name == "axis" for a in n.attribute) for n in dqs)
    assert any("per-tensor" in n for n in result.report.notes)
