"""Empirical bias correction: each int8 conv's per-channel output mean restored."""

from __future__ import annotations

import numpy as np
from builders import calibration, make_model, tensor
from onnx import helper

from onnxcomp import bias_correction, capture
from onnxcomp.calibration import Calibration
from onnxcomp.passes.quantize import PASS as QUANTIZE
from onnxcomp.passes.quantize import QuantizeConfig


def static_config(**options):
    """A QuantizeConfig with the per-layer speed choice off: these tests check what int8 does
    to each layer, and on layers this small whether ONNX Runtime's int8 kernel beats float is
    down to timing noise (tests/test_int8_speed.py tests the choice). Output-error rounding
    is off too: it removes part of the shift these tests build for the correction to find."""
    return QuantizeConfig(**{"keep_fast": False, "rounding": False, **options})



def _biased_model():
    """Two convs whose weights sit 0.4 of a grid step above a grid point: int8 rounds every one
    down, so on positive inputs each output channel shifts by a known amount."""
    rng = np.random.default_rng(0)
    step = 1 / 127
    w1 = ((rng.integers(-60, 60, [16, 4, 3, 3]) + 0.4) * step).astype(np.float32)
    w1[:, :, 0, 0] = 127 * step  # every channel's largest weight fixes its grid step
    w2 = ((rng.integers(-60, 60, [8, 16, 3, 3]) + 0.4) * step).astype(np.float32)
    w2[:, :, 0, 0] = 127 * step
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", pads=[1] * 4)]
    model = make_model(nodes, [tensor("x", ["N", 4, 8, 8])], [tensor("y", ["N", 8, 8, 8])],
                       {"W1": w1, "W2": w2})
    x = np.abs(rng.standard_normal([32, 4, 8, 8])).astype(np.float32)
    calib = Calibration([{"x": x[i:i + 8]} for i in range(0, 32, 8)], False, "test")
    return model, calib


def _means(model, name, calib):
    out = np.concatenate([b[name] for b in capture.iter_capture(model, [name], calib)])
    return out.mean(axis=(0, 2, 3))


def test_correction_restores_each_channels_mean_and_lowers_the_error():
    model, calib = _biased_model()
    config = static_config(calibrator="minmax", min_params=0, bias_correction=False,
                            max_drop=float("inf"))
    plain = QUANTIZE(model, config, calib).model
    corrected, sizes = bias_correction.correct(model, plain, calib, ["c1", "c2"])
    assert set(sizes) == {"c1", "c2"} and all(v > 0 for v in sizes.values())
    ref = _means(model, "y", calib)
    before = np.abs(_means(plain, "y", calib) - ref).mean()
    after = np.abs(_means(corrected, "y", calib) - ref).mean()
    assert after < 0.1 * before  # the shift the rounding made is gone
    err = [np.linalg.norm(np.concatenate([b["y"] for b in capture.iter_capture(m, ["y"], calib)])
                          - np.concatenate([b["y"] for b in capture.iter_capture(
                              model, ["y"], calib)])) for m in (plain, corrected)]
    assert err[1] < err[0]


def test_the_pass_reports_the_correction_and_keeps_it_only_when_it_helps():
    model, calib = _biased_model()
    result = QUANTIZE(model, static_config(calibrator="minmax", min_params=0,
                                            max_drop=float("inf")), calib)
    info = result.report.metrics["bias_correction"]
    assert info["layers"] == 2 and info["kept"] is True
    assert info["rel_l2_after"] < info["rel_l2_before"]
    assert "bias_corrected" in result.report.codes
    # a model quantization does not shift: nothing to gain, and nothing worse is kept
    rng = np.random.default_rng(1)
    flat = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="c", pads=[1] * 4)],
                      [tensor("x", ["N", 4, 8, 8])], [tensor("y", ["N", 4, 8, 8])],
                      {"W": (rng.integers(-127, 128, [4, 4, 3, 3]) / 127).astype(np.float32)})
    exact = QUANTIZE(flat, static_config(calibrator="minmax", min_params=0,
                                          max_drop=float("inf")), calibration(flat, n=4, batch=8))
    info = exact.report.metrics["bias_correction"]
    assert info["rel_l2_after"] <= info["rel_l2_before"] or info["kept"] is False


def test_too_few_samples_skip_the_correction_and_say_so():
    model, calib = _biased_model()
    few = Calibration(calib.batches[:2], False, "test")  # 16 samples
    result = QUANTIZE(model, static_config(calibrator="minmax", min_params=0,
                                            max_drop=float("inf")), few)
    assert "bias_correction_skipped" in result.report.codes
    assert "bias_correction" not in result.report.metrics


def test_a_few_loud_samples_the_ranges_clip_do_not_set_every_samples_bias():
    # Two of 32 samples ten times louder than the rest, clipped by the activation ranges: the
    # pooled mean would put their clipping loss on every sample's bias; each sample's own
    # shift, median over samples, is the rounding shift the typical sample has.
    model, calib = _biased_model()
    x = np.concatenate([b["x"] for b in calib.batches])
    x[:2] *= 10.0
    loud = Calibration([{"x": x[i:i + 8]} for i in range(0, 32, 8)], False, "test")
    config = static_config(calibrator="percentile", percentile=99.0, min_params=0,
                           bias_correction=False, max_drop=float("inf"))
    plain = QUANTIZE(model, config, loud).model
    corrected, _ = bias_correction.correct(model, plain, loud, ["c1", "c2"])
    typical = Calibration([{"x": x[2:]}], False, "test")

    def err(m):
        got = np.concatenate([b["y"] for b in capture.iter_capture(m, ["y"], typical)])
        ref = np.concatenate([b["y"] for b in capture.iter_capture(model, ["y"], typical)])
        return float(np.abs((got - ref).mean(axis=(0, 2, 3))).mean())

    assert err(corrected) < 0.25 * err(plain)
