from __future__ import annotations

import math

import numpy as np
import pytest
from builders import (
    calibration,
    conv_model,
    make_model,
    random_feeds,
    relative_error,
    run,
    tensor,
    uniform_calibration,
    vgg_bn_unet,
)
from onnx import TensorProto, helper

from onnxcomp.passbase import ConfigError, SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.quantize import QuantizeConfig
from onnxcomp.quant import huffman_bits_of, kmeans_quantize


def static_config(**options):
    """A QuantizeConfig with the per-layer speed choice off: these tests check what int8 does
    to each layer, and on layers this small whether ONNX Runtime's int8 kernel beats float is
    down to timing noise (tests/test_int8_speed.py tests the choice)."""
    return QuantizeConfig(**{"keep_fast": False, **options})


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
    result = quantize(model, QuantizeConfig(mode="weight", bits=8), calibration(model))
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
    result = quantize(model, QuantizeConfig(mode="weight", bits=4), calibration(model))
    assert result.report.applied[0].details["storage"] == "int4"
    q = next(i for i in result.model.graph.initializer if i.data_type == TensorProto.INT4)
    assert len(q.raw_data) == w.size // 2  # two weights per byte
    # the weights shrink over 4x (the model also carries the run's provenance now)
    weights = [sum(i.ByteSize() for i in m.graph.initializer) for m in (model, result.model)]
    assert weights[1] < weights[0] / 4
    _outputs_equal(model, result.model)


def test_int4_before_opset_21_is_stored_as_int8_and_said():
    model = conv_model(_on_grid(4), pads=[1] * 4)
    result = quantize(model, QuantizeConfig(mode="weight", bits=4), calibration(model))
    assert "int4_stored_as_int8" in result.report.codes
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
    once = quantize(model, QuantizeConfig(mode="weight"), calibration(model))
    twice = quantize(once.model, QuantizeConfig(mode="weight"), calibration(model))
    assert not twice.report.applied
    assert [s.reason for s in twice.report.skipped] == [SkipReason.NOT_CONSTANT]


def test_tiny_weights_skipped():
    model = conv_model(np.ones([4, 4, 3, 3], np.float32), pads=[1] * 4)
    result = quantize(model, QuantizeConfig(mode="weight"), calibration(model))
    assert [s.reason for s in result.report.skipped] == [SkipReason.TOO_SMALL]


def _conv_relu_conv(w1, w2, pool=False):
    """x -> Conv(W1) -> Relu [-> MaxPool 2x2] -> Conv(W2) -> y, 8x8 maps, 'same' 3x3 convs."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu")]
    mid, size = "r", 8
    if pool:
        nodes.append(helper.make_node("MaxPool", ["r"], ["p"], name="pool",
                                      kernel_shape=[2, 2], strides=[2, 2]))
        mid, size = "p", 4
    nodes.append(helper.make_node("Conv", [mid, "W2"], ["y"], name="c2", pads=[1] * 4))
    return make_model(nodes, [tensor("x", ["N", w1.shape[1], 8, 8])],
                      [tensor("y", ["N", w2.shape[0], size, size])], {"W1": w1, "W2": w2})


def _static_model(pool=False):
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal([16, 8, 3, 3]).astype(np.float32) * 0.2
    w2 = rng.standard_normal([8, 16, 3, 3]).astype(np.float32) * 0.2
    return _conv_relu_conv(w1, w2, pool)


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy"])
def test_static_qdq_runs_and_stays_close(calibrator):
    from builders import relative_error

    model = _static_model()
    calib = calibration(model, n=8, batch=2)
    result = quantize(model, static_config(mode="static", calibrator=calibrator,
                                            min_params=0), calib)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("QuantizeLinear") == 3  # x, relu output, y (the graph output keeps its name)
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert relative_error(model, result.model, calib) < 0.05
    assert result.report.metrics["activations_quantized"] == 3


@pytest.mark.parametrize("calibrator", ["percentile", "entropy"])
def test_static_tail_calibrators_need_enough_samples(calibrator):
    from onnxcomp.passbase import InputError

    model = _static_model()
    with pytest.raises(InputError, match=f"the {calibrator} calibrator needs at least 8"):
        quantize(model, static_config(mode="static", calibrator=calibrator),
                 calibration(model, n=2, batch=2))


def test_static_is_the_default_mode():
    assert QuantizeConfig().mode == "static"


def test_binary_weights_exact_when_already_binary():
    rng = np.random.default_rng(3)
    signs = np.where(rng.standard_normal([16, 8, 3, 3]) >= 0, 1.0, -1.0)
    w = (signs * rng.uniform(0.1, 1.0, 16)[:, None, None, None]).astype(np.float32)
    model = conv_model(w, pads=[1] * 4)
    result = quantize(model, QuantizeConfig(mode="binary"), calibration(model))
    change = result.report.applied[0]
    assert change.what == "binary 1-bit"
    assert change.details["weight_rel_error"] < 1e-6
    assert change.details["packed_bytes"] < change.details["bytes_after"]
    assert "experimental" in result.report.codes
    _outputs_equal(model, result.model)


def test_binary_scale_is_the_least_squares_one():
    from onnxcomp.quant import binarize

    w = np.random.default_rng(5).standard_normal([4, 3, 3, 3])
    q, scale, err = binarize(w, 0)
    for o in range(4):  # a * sign(W): ||W - a s||^2 is smallest at a = mean|W|
        s = q[o].astype(np.float64)
        errs = [np.linalg.norm(w[o] - a * s) for a in (scale[o] * 0.95, scale[o], scale[o] * 1.05)]
        assert errs[1] == min(errs)
    assert 0.3 < err < 1.0


def test_entropy_range_clips_outliers_but_keeps_the_bulk():
    from onnxcomp.quant import entropy_range

    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    x[:20] = 60.0  # a few huge outliers
    lo, hi = entropy_range(x, float(x.min()), float(x.max()))
    assert 2.5 < hi < 30 and -30 < lo < -2.5
    relu = np.abs(x)  # one-sided: the low end stays at the minimum
    lo, hi = entropy_range(relu, float(relu.min()), float(relu.max()))
    assert lo == float(relu.min()) and 2.5 < hi < 30


def test_mse_range_picks_the_grid_with_the_least_rounding_error():
    from onnxcomp.quant import activation_qparams, mse_range

    rng = np.random.default_rng(0)
    x = rng.laplace(size=200_000)  # a long tail: covering all of it costs the bulk resolution

    def err(lo, hi, signed=False):
        scale, zero = activation_qparams(lo, hi, signed)
        qmin, qmax = (-127, 127) if signed else (0, 255)
        back = (np.clip(np.rint(x / scale) + zero, qmin, qmax) - zero) * scale
        return float(np.mean((back - x) ** 2))

    lo, hi = mse_range(x)
    assert hi < x.max() and lo > x.min()
    assert err(lo, hi) < err(float(x.min()), float(x.max()))  # beats min/max
    assert err(lo, hi) <= err(float(np.quantile(x, 1e-4)), float(np.quantile(x, 1 - 1e-4)))
    slo, shi = mse_range(x, signed=True)
    amax = float(np.abs(x).max())
    assert slo == -shi and err(slo, shi, True) < err(-amax, amax, True)
    relu = np.abs(x)  # one-sided: the range starts at 0
    assert mse_range(relu)[0] == 0.0


def _sensitive_model():
    """c1 reads an input whose channel 0 is ~1000x the others: quantizing c1 is ruinous."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal([8, 4, 3, 3]).astype(np.float32) * 0.2
    w1[:, 0] *= 1e-4
    w2 = rng.standard_normal([8, 8, 3, 3]).astype(np.float32) * 0.2
    model = _conv_relu_conv(w1, w2)
    x = rng.standard_normal([16, 4, 8, 8]).astype(np.float32)
    x[:, 0] *= 1000
    from onnxcomp.calibration import Calibration

    return model, Calibration([{"x": x[:8]}, {"x": x[8:]}], False, "test")


def test_max_drop_leaves_the_sensitive_layer_in_float():
    from onnxcomp import fidelity

    model, calib = _sensitive_model()
    config = static_config(calibrator="minmax", min_params=0, max_drop=math.inf)
    everything = quantize(model, config, calib)
    assert not everything.report.warnings  # no bound, nothing to say
    ref = fidelity.Reference.of(model, calib)
    drop_all = fidelity.drop(ref.compare(everything.model))
    assert drop_all > 0.2  # all layers quantized: far off
    result = quantize(model, static_config(calibrator="minmax", min_params=0, max_drop=0.05),
                      calib)
    assert [c.node for c in result.report.applied] == ["c2"]
    assert [(s.node, s.reason) for s in result.report.skipped] == [
        ("c1", SkipReason.ERROR_TOO_HIGH)]
    assert result.report.metrics["layers_left_in_float"] == 1
    drop = fidelity.drop(ref.compare(result.model))
    assert drop <= 0.05
    assert result.report.metrics["drop"] == pytest.approx(drop, abs=1e-4)
    assert result.report.applied[0].details["sensitivity"] < 0.05


def test_a_large_drop_is_bounded_by_default_and_said_loudly():
    model, calib = _sensitive_model()
    result = quantize(model, static_config(calibrator="minmax", min_params=0), calib)
    assert QuantizeConfig().max_drop == 0.2
    assert [s.node for s in result.report.skipped] == ["c1"]  # left in float by default
    assert [w.code for w in result.report.warnings] == ["quantize.layers_in_float"]
    text = result.report.warnings[0].text
    assert "c1 (" in text and "--max-drop 0.2" in text
    assert result.report.metrics["drop_all_layers"] > 0.2 >= result.report.metrics["drop"]
    assert result.report.to_dict()["warnings"][0]["code"] == "quantize.layers_in_float"


def test_vgg_bn_unet_keeps_its_maps():
    """Regression: a VGG-BN U-Net (CRAFT-like) lost its maps to static int8.

    Its convs' outputs sit far from zero per channel and their BNs take that offset away
    again; int8 placed between a conv and its BN spent the uint8 grid on the offsets and the
    BN scaled the rounding up (held-out rel. error 0.54 here, 1.9 on the real detector).
    BN is folded first now, and no QDQ ever sits right before a BN.
    """
    model = vgg_bn_unet(offset=30.0)
    calib = uniform_calibration((4, 3, 32, 32), batches=4)
    held_out = uniform_calibration((4, 3, 32, 32), batches=2, seed=50)
    result = quantize(model, static_config(), calib)
    assert result.report.metrics["batchnorms_folded"] == 12
    assert not result.report.warnings
    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("QuantizeLinear") >= 15
    assert relative_error(model, result.model, held_out) < 0.1
    for calibrator in ("minmax", "percentile"):
        bounded = quantize(model, static_config(calibrator=calibrator, max_drop=math.inf),
                           calib)
        assert relative_error(model, bounded.model, held_out) < 0.1, calibrator


def test_no_qdq_right_before_a_batchnorm_that_cannot_fold():
    """A BN whose conv output has a second reader cannot fold: that output stays float."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"],
                              name="bn"),
             helper.make_node("Relu", ["c"], ["side"], name="side_relu"),
             helper.make_node("Add", ["n", "side"], ["y"], name="add")]
    model = make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("y", [1, 8, 8, 8])], {
        "W": rng.standard_normal([8, 4, 3, 3]).astype(np.float32),
        "B": (30 * rng.standard_normal(8)).astype(np.float32),
        "g": np.ones(8, np.float32), "b": np.zeros(8, np.float32),
        "m": np.zeros(8, np.float32), "v": np.ones(8, np.float32)})
    result = quantize(model, static_config(calibrator="minmax", max_drop=math.inf),
                      calibration(model))
    assert result.report.metrics["batchnorms_folded"] == 0
    bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers[bn.input[0]] == "Conv"


def test_max_drop_of_zero_leaves_everything_in_float():
    model, calib = _sensitive_model()
    result = quantize(model, static_config(calibrator="minmax", min_params=0, max_drop=0.0),
                      calib)
    assert not result.report.applied
    assert "max_drop" in result.report.codes
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu", "Conv"]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"mode": "static", "bits": 4}, "8-bit"), ({"calibrator": "kl"}, "--calibrator"),
    ({"mode": "weight", "bits": 3}, "4 or 8"),
    ({"mode": "kmeans", "bits": 9}, "1..8"), ({"mode": "ternary"}, "--mode"),
    ({"mode": "weight", "max_drop": 0.01}, "static"), ({"max_drop": -0.1}, ">= 0"),
    ({"max_drop": float("nan")}, ">= 0"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        QuantizeConfig(**kwargs)


def test_per_channel_before_opset_13_uses_a_mul():
    w = _on_grid(8)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1] * 4)]
    model = make_model(nodes, [tensor("x", [1, 8, 8, 8])], [tensor("y", [1, 16, 8, 8])],
                       {"W": w}, opset=12, ir_version=7)
    result = quantize(model, QuantizeConfig(mode="weight", bits=8), calibration(model))
    assert [n.op_type for n in result.model.graph.node] == ["DequantizeLinear", "Mul", "Conv"]
    assert result.report.applied[0].details["weight_rel_error"] < 1e-6
    _outputs_equal(model, result.model)


def _opset12_static_model():
    model = _static_model()
    model.opset_import[0].version = 12
    model.ir_version = 7
    return model


def test_static_upgrades_opset_12_for_per_channel_weights():
    model = _opset12_static_model()
    result = quantize(model, static_config(mode="static", calibrator="minmax", min_params=0),
                      calibration(model, n=4, batch=2))
    assert result.model.opset_import[0].version == 13
    dqs = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"
           and n.input[0] in ("W1_q", "W2_q")]
    assert len(dqs) == 2 and all(any(a.name == "axis" for a in n.attribute) for n in dqs)
    assert "opset_upgraded" in result.report.codes


def test_static_before_opset_13_falls_back_to_per_tensor_weights(monkeypatch):
    from onnxcomp.passes import quantize as qmod

    monkeypatch.setattr(qmod.opset_mod, "convert", lambda model, target: "no converter")
    model = _opset12_static_model()
    result = quantize(model, static_config(mode="static", calibrator="minmax", min_params=0),
                      calibration(model, n=4, batch=2))
    assert result.model.opset_import[0].version == 12
    ops = [n.op_type for n in result.model.graph.node]
    assert "Mul" not in ops
    dqs = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(not any(a.name == "axis" for a in n.attribute) for n in dqs)
    assert "per_tensor_weights" in result.report.codes


def test_maxpool_shares_its_source_range():
    model = _static_model(pool=True)
    calib = calibration(model, n=8, batch=4)
    # percentile: the pooled tensor's own range would differ from its source's
    result = quantize(model, static_config(calibrator="percentile", min_params=0), calib)
    assert result.report.metrics["ranges_shared"] == 1
    inits = {i.name: i for i in result.model.graph.initializer}
    q = {n.input[0]: n for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    before, after = q["a"], q["p"]  # the Relu is folded: c1's output is quantized
    from onnx import numpy_helper

    for i in (1, 2):
        assert numpy_helper.to_array(inits[before.input[i]]) == numpy_helper.to_array(
            inits[after.input[i]])
    from builders import relative_error

    assert relative_error(model, result.model, calib) < 0.05


@pytest.mark.parametrize(("kwargs", "signed"), [
    ({}, False), ({"provider": "cuda"}, True), ({"provider": "tensorrt"}, True),
    ({"activations": "int8"}, True), ({"provider": "cuda", "activations": "uint8"}, False),
])
def test_activation_type_per_provider(kwargs, signed):
    from onnxcomp.passes.quantize import signed_activations

    assert signed_activations(QuantizeConfig(**kwargs)) is signed


def test_int8_activations_are_symmetric_and_keep_the_relu():
    from builders import relative_error
    from onnx import numpy_helper

    model = _static_model()
    calib = calibration(model, n=8, batch=2)
    result = quantize(model, static_config(activations="int8", min_params=0), calib)
    assert result.report.metrics["activation_type"] == "int8"
    assert result.report.metrics["activations_folded"] == 0
    ops = [n.op_type for n in result.model.graph.node]
    assert "Relu" in ops and ops.count("QuantizeLinear") == 3
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    for n in result.model.graph.node:
        if n.op_type == "QuantizeLinear":
            zero = inits[n.input[2]]
            assert zero.dtype == np.int8 and int(zero) == 0
    assert relative_error(model, result.model, calib) < 0.05


@pytest.mark.parametrize(("machine", "vnni", "kwargs", "reduced"), [
    ("x86_64", False, {}, True), ("x86_64", True, {}, False), ("aarch64", False, {}, False),
    ("x86_64", False, {"provider": "cuda"}, False), ("x86_64", False, {"reduce_range": False},
                                                     False),
    ("aarch64", False, {"reduce_range": True}, True),
])
def test_reduce_range_where_u8s8_products_saturate(monkeypatch, machine, vnni, kwargs, reduced):
    from onnxcomp.passes import quantize as qmod

    monkeypatch.setattr(qmod.platform, "machine", lambda: machine)
    monkeypatch.setattr(qmod, "_cpu_has_vnni", lambda: vnni)
    assert qmod.reduced_range(QuantizeConfig(**kwargs)) is reduced


def test_reduced_range_weights_are_7_bit():
    from onnx import numpy_helper

    model = _static_model()
    result = quantize(model, static_config(reduce_range=True, min_params=0),
                      calibration(model, n=8, batch=2))
    assert result.report.metrics["weight_bits"] == 7
    weights = [numpy_helper.to_array(i) for i in result.model.graph.initializer
               if i.name in ("W1_q", "W2_q")]
    assert len(weights) == 2
    assert all(np.abs(w).max() == 63 for w in weights)


def _chain_model():
    """A CP-like chain: 1x1 (rows of very different size) -> depthwise 3x3 -> 1x1."""
    rng = np.random.default_rng(11)
    wa = rng.standard_normal([8, 8, 1, 1]).astype(np.float32)
    wa *= np.logspace(-3, 0, 8, dtype=np.float32)[:, None, None, None]
    wd = rng.standard_normal([8, 1, 3, 3]).astype(np.float32)
    wc = rng.standard_normal([8, 8, 1, 1]).astype(np.float32)
    wc /= np.logspace(-3, 0, 8, dtype=np.float32)[None, :, None, None]
    nodes = [helper.make_node("Conv", ["x", "WA"], ["a"], name="a"),
             helper.make_node("Conv", ["a", "WD"], ["d"], name="d", group=8, pads=[1] * 4),
             helper.make_node("Conv", ["d", "WC"], ["y"], name="c")]
    return make_model(nodes, [tensor("x", ["N", 8, 8, 8])], [tensor("y", ["N", 8, 8, 8])],
                      {"WA": wa, "WD": wd, "WC": wc})


def test_equalization_is_exact_in_float_and_helps_int8():
    from builders import relative_error

    from onnxcomp.passes.equalize import EqualizeConfig

    equalize = REGISTRY["equalize"]
    model = _chain_model()
    calib = calibration(model, n=8, batch=4)
    config = static_config(calibrator="minmax", min_params=0, max_drop=math.inf)
    result = equalize(model, EqualizeConfig(), calib)
    assert equalize.lossless
    even, count = result.model, len(result.report.applied)
    assert count == 2  # a -> d (depthwise), d -> c (dense)
    assert relative_error(model, even, calib) < 1e-5
    with_eq = quantize(model, config, calib)
    without = quantize(model, static_config(calibrator="minmax", min_params=0,
                                             equalize=False, max_drop=math.inf), calib)
    assert with_eq.report.metrics["tensors_equalized"] == 2
    assert relative_error(model, with_eq.model, calib) < 0.5 * relative_error(
        model, without.model, calib)


def _softmax_conv(w):
    """x -> Conv(w) -> Softmax over channels -> p: a per-pixel decision output."""
    model = conv_model(w, size=6, bias=False, pads=[1] * 4)
    model.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], name="sm", axis=1))
    model.graph.output[0].name = "p"
    return model


def test_drop_counts_kept_decisions_of_a_softmax_output():
    """A per-pixel softmax (4-D, not a 2-D classifier): the drop is the share of samples
    with a changed decision, not the relative error."""
    from onnxcomp import fidelity, verify

    w = np.random.default_rng(3).standard_normal([6, 4, 3, 3]).astype(np.float32)
    model = _softmax_conv(w)
    decisions = verify.decision_outputs(model)
    assert decisions == [(0, 1)]
    calib = calibration(model)
    ref = fidelity.Reference.of(model, calib)
    assert ref.decisions == decisions
    scaled = _softmax_conv(w * 1.02)  # the same argmax at every pixel
    fid = ref.compare(scaled)
    assert fid.rel_l2 > 1e-3 and fidelity.drop(fid) == 0.0
    no_decisions = fidelity.Reference(model, calib, ref.names, ref.outputs, [])
    assert fidelity.drop(no_decisions.compare(scaled)) == pytest.approx(fid.rel_l2)
    assert fidelity.drop(ref.compare(_softmax_conv(-w))) == 1.0


def test_only_static_runs_get_synthetic_calibration_and_say_so():
    model = conv_model(_on_grid(8), pads=[1] * 4)
    static = quantize(model, static_config(calibrator="minmax"))
    assert static.report.metrics["synthetic_calibration"] is True
    assert "synthetic_calibration" in static.report.codes
    weights = quantize(model, QuantizeConfig(mode="weight"))
    assert "synthetic_calibration" not in weights.report.metrics


def _per_sample_error(samples, lo, hi):
    """Mean over samples of each one's own relative squared rounding error on (lo, hi)."""
    from onnxcomp.quant import activation_qparams

    scale, zero = activation_qparams(lo, hi, False)
    errs = [np.mean(((np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale - x) ** 2)
            / np.mean(x * x) for x in samples]
    return float(np.mean(errs))


def test_weighted_mse_range_is_not_set_by_a_few_loud_samples():
    """Weights that make each sample's error relative to its own size: three samples whose
    values run 20x larger than the other sixty-one stretch the grid less, and each sample's
    own error is lower on average."""
    from onnxcomp.quant import mse_range

    rng = np.random.default_rng(1)
    samples = ([np.abs(rng.standard_normal(2000)) for _ in range(61)]
               + [20 * np.abs(rng.standard_normal(2000)) for _ in range(3)])
    values = np.concatenate(samples)
    weights = np.concatenate([np.full(s.size, 1.0 / np.mean(s * s) / s.size) for s in samples])
    lo, plain = mse_range(values)
    wlo, weighted = mse_range(values, weights=weights)
    assert lo == wlo == 0.0 and weighted < 0.75 * plain
    assert _per_sample_error(samples, 0.0, weighted) < 0.8 * _per_sample_error(samples, 0.0, plain)


def test_mse_calibrator_weighs_samples_in_activation_ranges():
    from onnxcomp.calibration import Calibration
    from onnxcomp.quant import activation_ranges

    model = conv_model(np.ones([1, 1, 1, 1], np.float32), size=4, bias=False, batch="N")
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal([32, 1, 4, 4])).astype(np.float32)
    x[:2] *= 30  # two loud samples of 32
    calib = Calibration([{"x": x[i:i + 8]} for i in range(0, 32, 8)], False, "test")
    y = model.graph.output[0].name
    samples = [s.reshape(-1).astype(np.float64) for s in x]
    _, hi_pct = activation_ranges(model, [y], calib, "percentile")[y]
    lo, hi_mse = activation_ranges(model, [y], calib, "mse")[y]
    assert lo == 0.0 and hi_mse < hi_pct
    assert _per_sample_error(samples, 0.0, hi_mse) < _per_sample_error(samples, 0.0, hi_pct)


def test_a_clip_with_a_bound_computed_at_run_time_is_not_folded():
    from onnxcomp.graph import Graph
    from onnxcomp.quant import clamping_activation

    nodes = [helper.make_node("Relu", ["x"], ["t"], name="r"),
             helper.make_node("Clip", ["t", "lo", "hi"], ["y"], name="clip")]
    model = make_model(nodes, [tensor("x", ["N", 4]), tensor("hi", [])], [tensor("y", ["N", 4])],
                       {"lo": np.array(0, np.float32)})
    graph = Graph(model)
    t = next(n for n in graph.nodes if n.name == "r").outputs[0]
    assert clamping_activation(graph, t) is None  # its upper bound is an input, not a constant
