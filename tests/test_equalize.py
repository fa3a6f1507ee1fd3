from __future__ import annotations

import numpy as np
from builders import assert_equivalent, calibration, make_model, relative_error, tensor
from onnx import helper, numpy_helper

from onnxcomp import pipeline
from onnxcomp.passbase import SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.equalize import EqualizeConfig

equalize = REGISTRY["equalize"]


def _pair(scales_a: np.ndarray, depthwise: bool, seed: int = 0, same_rows: bool = False):
    """x -> 1x1 conv A (rows scaled by ``scales_a``, bias) -> conv B (dense or depthwise)."""
    rng = np.random.default_rng(seed)
    c = len(scales_a)
    wa = rng.standard_normal([1 if same_rows else c, 4, 1, 1]).astype(np.float32)
    wa = np.broadcast_to(wa, (c, 4, 1, 1)) * scales_a[:, None, None, None]
    ba = (rng.standard_normal(1 if same_rows else c) * scales_a).astype(np.float32)
    if depthwise:
        wb = rng.standard_normal([c, 1, 3, 3]).astype(np.float32)
        b_node = helper.make_node("Conv", ["t", "WB"], ["y"], name="b", group=c, pads=[1] * 4)
    else:
        wb = rng.standard_normal([5, c, 3, 3]).astype(np.float32)
        b_node = helper.make_node("Conv", ["t", "WB"], ["y"], name="b", pads=[1] * 4)
    nodes = [helper.make_node("Conv", ["x", "WA", "BA"], ["t"], name="a"), b_node]
    out = c if depthwise else 5
    return make_model(nodes, [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", out, 6, 6])],
                      {"WA": wa, "BA": ba, "WB": wb})


def test_equalized_pairs_compute_the_same():
    for depthwise in (False, True):
        model = _pair(np.logspace(-3, 0, 8).astype(np.float32), depthwise)
        calib = calibration(model)
        result = equalize(model, EqualizeConfig(), calib)
        assert [c.node for c in result.report.applied] == ["a"]
        assert result.report.applied[0].details["depthwise_partner"] is depthwise
        assert_equivalent(model, result.model, rtol=1e-4, atol=1e-5)


def test_even_channels_are_left_alone_with_a_reason():
    model = _pair(np.ones(8, np.float32), depthwise=False, same_rows=True)
    result = equalize(model, EqualizeConfig(), calibration(model))
    assert not result.report.applied
    assert [(s.node, s.reason) for s in result.report.skipped] == [("a", SkipReason.NOT_NEEDED)]
    assert result.model.SerializeToString() == model.SerializeToString()


def test_a_tensor_read_twice_is_no_pair():
    model = _pair(np.logspace(-3, 0, 8).astype(np.float32), depthwise=False)
    model.graph.node.append(helper.make_node("Relu", ["t"], ["side"], name="side"))
    model.graph.output.append(tensor("side", ["N", 8, 6, 6]))
    result = equalize(model, EqualizeConfig(), calibration(model))
    assert not result.report.applied
    assert "nothing_to_do" in result.report.codes


def test_the_pipeline_runs_it_before_static_int8_and_verifies_it():
    model = _pair(np.logspace(-3, 0, 8).astype(np.float32), depthwise=True)
    calib = calibration(model, n=8, batch=4)
    steps = [pipeline.Step("quantize", REGISTRY["quantize"].config_cls.from_options(
        {"calibrator": "minmax", "max_drop": float("inf")}))]
    result = pipeline.run_pipeline(model, steps, calib)
    assert [s.name for s in result.steps] == ["canonicalize", "fold_bn", "equalize", "quantize"]
    eq = result.steps[2]
    assert eq.lossless and eq.fidelity.rel_l2 < 1e-5 and eq.report.applied
    assert eq.report.notes[0].code == "prerequisite"
    assert result.steps[3].config.equalize is False  # done once, by the step before


def _pair_through(act: str, depthwise: bool):
    """The pair of :func:`_pair` with ``act`` (Relu, or Clip(0, 6)) between A and B."""
    model = _pair(np.logspace(-2, 0, 8).astype(np.float32), depthwise)
    b = next(n for n in model.graph.node if n.name == "b")
    b.input[0] = "t_act"
    inputs = ["t", "lo", "hi"] if act == "Clip" else ["t"]
    model.graph.node.insert(1, helper.make_node(act, inputs, ["t_act"], name="act"))
    if act == "Clip":
        model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "lo"),
                                        numpy_helper.from_array(np.array(6, np.float32), "hi")])
    return model


def test_pairs_through_an_activation_only_when_asked():
    for act in ("Relu", "Clip"):
        for depthwise in (False, True):
            model = _pair_through(act, depthwise)
            calib = calibration(model)
            assert not equalize(model, EqualizeConfig(), calib).report.applied
            result = equalize(model, EqualizeConfig(through_activations=True), calib)
            (change,) = result.report.applied
            assert change.details["through"] == act and change.details["largest_scale"] > 2
            # exact where the calibration data goes (a Clip's bound is kept, see the pass)
            assert relative_error(model, result.model, calib) < 1e-5


def test_a_clip_keeps_saturated_channels_unscaled():
    """A channel that reaches the clip on the calibration data cannot be scaled up: the kept
    bound would cut it. Its scale stays 1 and the model still computes the same there."""
    model = _pair_through("Clip", depthwise=True)
    wa = next(t for t in model.graph.initializer if t.name == "WA")
    w = numpy_helper.to_array(wa).copy()
    w[0] *= 1e3  # channel 0 saturates at 6
    wa.CopyFrom(numpy_helper.from_array(w, "WA"))
    calib = calibration(model)
    result = equalize(model, EqualizeConfig(through_activations=True), calib)
    new = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                      if t.name == "WA"))
    assert np.allclose(new[0], w[0])
    assert relative_error(model, result.model, calib) < 1e-5
