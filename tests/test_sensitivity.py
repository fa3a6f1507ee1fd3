"""Sensitivity-weighted rank allocation (sensitivity.layer_gains)."""

from __future__ import annotations

import numpy as np
from builders import calibration, make_model, relative_error, tensor
from onnx import helper

from onnxcomp.decompose import LowRankConfig
from onnxcomp.passes import REGISTRY

svd = REGISTRY["svd"]


def _two_branch_model(scale: float = 0.02):
    """y = P(x) + scale * Q(x): P and Q are 1x1 convs with the same weights.

    Both have the same isolated error at every rank; Q's reaches the output ``scale`` times
    weaker.
    """
    rng = np.random.default_rng(0)
    w = rng.standard_normal([64, 64, 1, 1]).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["p"], name="P"),
        helper.make_node("Conv", ["x", "W2"], ["q"], name="Q"),
        helper.make_node("Mul", ["q", "s"], ["qs"], name="scale"),
        helper.make_node("Add", ["p", "qs"], ["y"], name="sum"),
    ]
    inits = {"W": w, "W2": w.copy(), "s": np.array(scale, np.float32)}
    return make_model(nodes, [tensor("x", ["N", 64, 8, 8])], [tensor("y", ["N", 64, 8, 8])],
                      inits)


def _config(sensitivity: bool) -> LowRankConfig:
    return LowRankConfig(target_macs=0.75, latency_check=False, min_macs=0,
                         sensitivity=sensitivity, basis="weights")


def test_gains_measure_how_much_error_reaches_the_outputs():
    model = _two_branch_model()
    result = svd(model, _config(True), calibration(model, n=4, batch=4))
    gains = result.report.metrics["sensitivity"]
    assert 0.5 < gains["P"] < 1.5
    assert gains["Q"] < 0.05


def test_rank_goes_where_errors_wash_out():
    model = _two_branch_model()
    calib = calibration(model, n=4, batch=4)
    weighted = svd(model, _config(True), calib)
    plain = svd(model, _config(False), calib)
    assert "sensitivity" not in plain.report.metrics
    ranks = {c.node: c.details["ranks"][0] for c in weighted.report.applied}
    assert "Q" in ranks
    assert ranks.get("P", 64) > ranks["Q"]  # P, whose errors reach y, keeps more rank
    held = calibration(model, n=2, batch=4)
    held.batches[:] = [{"x": np.random.default_rng(9 + i).standard_normal(
        [4, 64, 8, 8]).astype(np.float32)} for i in range(2)]
    assert relative_error(model, weighted.model, held) < relative_error(model, plain.model, held)


def test_same_inputs_same_bytes_with_sensitivity():
    model = _two_branch_model()
    calib = calibration(model, n=4, batch=4)
    a = svd(model, _config(True), calib).model.SerializeToString()
    b = svd(model, _config(True), calib).model.SerializeToString()
    assert a == b


def test_sensitivity_batches_are_spread_over_the_calibration_set():
    from onnxcomp.sensitivity import spread_batches

    # 12 batches of 8: 32 samples are 4 batches from the start, the middle and the end.
    picked = spread_batches([8] * 12, 32)
    assert len(picked) == 4 and picked[0] == 0 and picked[-1] == 11
    assert spread_batches([8] * 3, 32) == [0, 1, 2]  # fewer samples than wanted: all
    assert spread_batches([8, 8, 3], 8) == [0, 2]  # by the mean batch size: 11 samples
    assert spread_batches([1] * 100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]
