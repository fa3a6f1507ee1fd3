"""quantize --float-budget: the most sensitive layers stay in float within a speed budget."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from test_quantize import _sensitive_model, quantize, static_config

from onnxcomp import fidelity
from onnxcomp.passbase import ConfigError, SkipReason
from onnxcomp.passes.quantize import QuantizeConfig
from onnxcomp.timing import Timer


def test_the_sensitive_layer_stays_in_float_and_the_error_falls():
    model, calib = _sensitive_model()
    base = static_config(calibrator="minmax", min_params=0, max_drop=math.inf)
    everything = quantize(model, base, calib)
    # a budget of 0.9: any measured cost fits, so the error alone decides
    result = quantize(model, static_config(calibrator="minmax", min_params=0,
                                           max_drop=math.inf, float_budget=0.9), calib)
    assert [c.node for c in result.report.applied] == ["c2"]
    ((node, reason, detail),) = [(s.node, s.reason, s.detail) for s in result.report.skipped]
    assert (node, reason) == ("c1", SkipReason.ERROR_TOO_HIGH)
    assert "--float-budget 0.9" in detail
    metrics = result.report.metrics
    assert metrics["float_budget_layers"] == 1
    assert metrics["float_budget_error"] < metrics["float_budget_error_all_int8"]
    assert "float_budget" in result.report.codes
    ref = fidelity.Reference.of(model, calib)
    assert ref.compare(result.model).rel_l2 < 0.5 * ref.compare(everything.model).rel_l2


def test_nothing_stays_in_float_when_it_costs_more_than_the_budget(monkeypatch):
    model, calib = _sensitive_model()
    slower = SimpleNamespace(speedups=[SimpleNamespace(median=0.8, p10=0.8, p90=0.8)])
    monkeypatch.setattr(Timer, "compare", lambda self, *a, **k: slower)
    result = quantize(model, static_config(calibrator="minmax", min_params=0,
                                           max_drop=math.inf, float_budget=0.1), calib)
    assert sorted(c.node for c in result.report.applied) == ["c1", "c2"]
    assert result.report.metrics["float_budget_layers"] == 0
    (note,) = [n for n in result.report.notes if n.code == "float_budget"]
    assert "0 layer(s) left in float" in note


def test_float_budget_then_max_drop_keeps_both_choices():
    model, calib = _sensitive_model()
    result = quantize(model, static_config(calibrator="minmax", min_params=0, max_drop=0.05,
                                           float_budget=0.9), calib)
    assert [s.node for s in result.report.skipped] == ["c1"]
    assert result.report.metrics["float_budget_layers"] == 1
    assert result.report.metrics["drop"] <= 0.05
    # a bound the budget's model misses: the drop search runs on top and keeps its figures
    result = quantize(model, static_config(calibrator="minmax", min_params=0, max_drop=0.0,
                                           float_budget=0.9), calib)
    assert result.report.metrics["drop_all_layers"] > 0.0  # c2 in int8 still changes outputs
    metrics = result.report.metrics
    assert metrics["float_budget_layers"] == 1 and "float_budget_error" in metrics
    skipped = {s.node: s.detail for s in result.report.skipped}
    assert set(skipped) == {"c1", "c2"} and "--float-budget" in skipped["c1"]
    assert not any("nan" in d for d in skipped.values())
    (warning,) = result.report.warnings
    assert "but the 1 --float-budget left in float" in warning.text


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"float_budget": 1.0}, r"\[0, 1\)"), ({"float_budget": -0.1}, r"\[0, 1\)"),
    ({"mode": "weight", "float_budget": 0.05}, "static")])
def test_float_budget_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        QuantizeConfig(**kwargs)



def _three_convs():
    """c1 -> Relu -> c2 -> Relu -> c3, c2's output channels in two groups: 0-3 read c1's
    tiny channels 0-3 with weights 100x, 4-7 its normal channels with weights near 1. Per
    channel, int8 keeps both; one scale for the tensor rounds group 4-7's weights to 0."""
    import numpy as np
    from builders import make_model, tensor
    from onnx import helper

    from onnxcomp.calibration import Calibration

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal([8, 4, 3, 3]).astype(np.float32) * 0.3
    w1[:4] *= 0.01
    w2 = np.zeros([8, 8, 3, 3], np.float32)
    w2[:4, :4] = rng.standard_normal([4, 4, 3, 3]) * 30.0
    w2[4:, 4:] = rng.standard_normal([4, 4, 3, 3]) * 0.3
    w3 = rng.standard_normal([6, 8, 1, 1]).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Conv", ["ra", "W2"], ["b"], name="c2", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["rb"], name="r2"),
             helper.make_node("Conv", ["rb", "W3"], ["y"], name="c3")]
    model = make_model(nodes, [tensor("x", ["N", 4, 8, 8])], [tensor("y", ["N", 6, 8, 8])],
                       {"W1": w1, "W2": w2, "W3": w3})
    x = rng.standard_normal([16, 4, 8, 8]).astype(np.float32)
    return model, Calibration([{"x": x[:8]}, {"x": x[8:]}], False, "test")


def test_a_layer_left_in_float_between_int8_layers_runs_in_float():
    """ONNX Runtime quantizes a float conv between a DequantizeLinear and a QuantizeLinear
    by itself, per tensor (its WeightBiasQuantization): here that rounds half of c2's
    weights to 0. The pass gives such a layer an input it does not take, so the deployed
    model computes what its graph says."""
    import numpy as np

    from onnxcomp import capture, quant

    model, calib = _three_convs()
    config = static_config(calibrator="minmax", min_params=0, max_drop=math.inf,
                           exclude=("c2",))
    result = quantize(model, config, calib)
    assert [c.node for c in result.report.applied] == ["c1", "c3"]

    def gap(m):
        as_written = capture.run_model(m, calib, optimize=False)[0]
        deployed = capture.run_model(m, calib, optimize=True)[0]
        return float(np.linalg.norm(deployed - as_written) / np.linalg.norm(as_written))

    assert gap(result.model) < 1e-4
    # without the separate input, ONNX Runtime's own int8 of c2 is what runs
    original = quant.keep_float
    try:
        quant.keep_float = lambda graph: []
        plain = quantize(model, config, calib).model
    finally:
        quant.keep_float = original
    assert gap(plain) > 0.1
