"""Output-error rounding of int8 conv weights (AdaRound, layer-wise): onnxcomp/rounding.py."""

from __future__ import annotations

import numpy as np
from builders import make_model, tensor
from onnx import helper, numpy_helper

from onnxcomp import capture, rounding
from onnxcomp.calibration import Calibration
from onnxcomp.passes.quantize import PASS as QUANTIZE
from onnxcomp.passes.quantize import QuantizeConfig

STEP = 1 / 127


def _config(**options):
    """Static int8 with the per-layer speed choice off (tiny layers: timing noise decides it)
    and bias correction off, so what is measured is the rounding alone."""
    return QuantizeConfig(**{"keep_fast": False, "bias_correction": False, "min_params": 0,
                             "calibrator": "minmax", "max_drop": float("inf"), **options})


def _calib(x: np.ndarray, batch: int = 8) -> Calibration:
    return Calibration([{"x": x[i:i + batch]} for i in range(0, len(x), batch)], False, "test")


def _q(model, name="W_q"):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _error(model, reference, calib, name="y"):
    got = np.concatenate([b[name] for b in capture.iter_capture(model, [name], calib)])
    want = np.concatenate([b[name] for b in capture.iter_capture(reference, [name], calib)])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _duplicated_inputs_model():
    """A 1x1 conv reading three copies of one channel, weights 127, 0.4 and 0.4 grid steps.

    Nearest rounding drops both small weights: the output is 0.8 of a step low per unit of
    input. Rounding one of them up leaves 0.2 of a step, the best the grid allows.
    """
    w = np.array([[127, 0.4, 0.4], [-127, -0.4, -0.4], [127, 0.3, 0.45]], np.float32) * STEP
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="c")]
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 3, 6, 6])],
                       {"W": w.reshape(3, 3, 1, 1)})
    rng = np.random.default_rng(0)
    # inputs on the uint8 grid of [0, 2] (minmax): activation rounding is exact, so all the
    # error is the weights'
    one = rng.integers(0, 256, [64, 1, 6, 6]) * (2 / 255)
    one[0, 0, 0, 0] = 2.0
    return model, _calib(np.repeat(one, 3, axis=1).astype(np.float32))


def test_rounding_fixes_what_nearest_rounding_loses_on_correlated_inputs():
    model, calib = _duplicated_inputs_model()
    plain = QUANTIZE(model, _config(rounding=False), calib).model
    assert _q(plain)[:, 1:].reshape(3, 2).tolist() == [[0, 0], [0, 0], [0, 0]]
    rounded, stats = rounding.round_layers(model, plain, calib, ["c"])
    q = _q(rounded).reshape(3, 3)
    assert q[:, 0].tolist() == [127, -127, 127]  # on the grid already: unchanged
    assert q[:, 1:].sum(axis=1).tolist() == [1, -1, 1]  # one small weight rounded away from 0
    assert np.all(np.abs(q - _q(model, "W").reshape(3, 3) / STEP) < 1)  # a grid neighbour
    assert stats["c"]["error"] < 0.5 * stats["c"]["error_nearest"]
    # the model's output error also holds the output's own int8 rounding, which stays
    assert _error(rounded, model, calib) < 0.8 * _error(plain, model, calib)


def _random_model(seed: int = 0):
    """conv 3x3 -> Relu -> depthwise 3x3 -> Relu -> conv 1x1, weights off the grid."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal([8, 4, 3, 3]).astype(np.float32) * 0.3
    dw = rng.standard_normal([8, 1, 3, 3]).astype(np.float32) * 0.3
    w3 = rng.standard_normal([6, 8, 1, 1]).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Conv", ["ra", "DW"], ["b"], name="dw", pads=[1] * 4, group=8),
             helper.make_node("Relu", ["b"], ["rb"], name="r2"),
             helper.make_node("Conv", ["rb", "W3"], ["y"], name="c3")]
    model = make_model(nodes, [tensor("x", ["N", 4, 10, 10])], [tensor("y", ["N", 6, 10, 10])],
                       {"W1": w1, "DW": dw, "W3": w3})
    # correlated input channels: a shared part plus a little of each channel's own
    shared = rng.standard_normal([96, 1, 10, 10])
    x = (shared + 0.3 * rng.standard_normal([96, 4, 10, 10])).astype(np.float32)
    return model, _calib(x[:64]), _calib(x[64:])


def test_rounding_lowers_the_error_on_held_out_data_and_handles_depthwise_convs():
    model, calib, held_out = _random_model()
    plain = QUANTIZE(model, _config(rounding=False), calib).model
    result = QUANTIZE(model, _config(), calib)
    info = result.report.metrics["rounding"]
    assert info["layers"] == 3 and info["kept"] is True  # c1, the depthwise dw and c3
    assert "rounded" in result.report.codes
    per_layer = info["per_layer"]
    assert all(per_layer[n]["error"] <= per_layer[n]["error_nearest"] for n in ("c1", "dw", "c3"))
    assert per_layer["dw"]["moved"] > 0
    assert info["rel_l2_after"] < info["rel_l2_before"]
    assert _error(result.model, model, held_out) < _error(plain, model, held_out)


def test_rounding_leaves_layers_it_cannot_describe_and_says_why():
    model, calib, _ = _random_model()
    few = Calibration(calib.batches[:1], False, "test")  # 8 samples
    plain = QUANTIZE(model, _config(rounding=False), few).model
    saved = rounding.MAX_ROWS
    try:
        rounding.MAX_ROWS = 200  # 200 rows: fewer than 10 per weight of c1 (36), not of dw (9)
        _, stats = rounding.round_layers(model, plain, few, ["c1", "dw", "c3"])
    finally:
        rounding.MAX_ROWS = saved
    assert "needs 10 per weight" in stats["c1"]["left"]
    assert "error" in stats["dw"] and "error" in stats["c3"]


def test_too_few_samples_leave_nearest_rounding_and_the_report_says_so():
    model, calib, _ = _random_model()
    few = Calibration(calib.batches[:2], False, "test")  # 16 samples
    result = QUANTIZE(model, _config(), few)
    assert "rounding_skipped" in result.report.codes and "rounding" not in result.report.metrics
    plain = QUANTIZE(model, _config(rounding=False), few).model
    for name in ("W1_q", "DW_q", "W3_q"):
        np.testing.assert_array_equal(_q(result.model, name), _q(plain, name))


def test_max_drop_judges_and_keeps_the_rounded_weights():
    """Rounding comes before --max-drop: the layers that stay int8 keep the codes rounding
    chose (not nearest ones), and the report keeps the rounding's metrics."""
    model, calib, _ = _random_model()
    everything = QUANTIZE(model, _config(), calib)
    assert everything.report.metrics["rounding"]["kept"] is True
    drop = everything.report.metrics["rounding"]["rel_l2_before"]
    bound = QUANTIZE(model, _config(max_drop=0.9 * drop), calib)  # some layers float, not all
    report = bound.report
    assert report.metrics["layers_left_in_float"] >= 1 and len(report.applied) >= 1
    assert report.metrics["rounding"]["kept"] is True and "rounded" in report.codes
    int8 = {c.node for c in report.applied}
    names = {"c1": "W1_q", "dw": "DW_q", "c3": "W3_q"}
    for layer in int8:
        assert np.array_equal(_q(bound.model, names[layer]), _q(everything.model, names[layer]))


def test_each_sample_counts_relative_to_its_own_size():
    """Two small weights (0.4 of a step each) read inputs that move together in 62 samples and
    against each other, ten times louder, in 2. For the 62 the best rounding takes one small
    weight up (their sum matters); for the loud 2 both the same way (their difference does).
    Weighted by each sample's own size, the 62 decide; unweighted, the loud two would."""
    w = np.array([[127, 0.4, 0.4]], np.float32) * STEP
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="c")]
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 1, 6, 6])],
                       {"W": w.reshape(1, 3, 1, 1)})
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, [64, 3, 6, 6])
    x[:, 2] = x[:, 1]  # together
    x[:2, :2] *= 10.0
    x[:2, 2] = -x[:2, 1]  # the loud two: against each other
    calib = _calib(x.astype(np.float32))
    plain = QUANTIZE(model, _config(rounding=False), calib).model
    rounded, _ = rounding.round_layers(model, plain, calib, ["c"])
    q = _q(rounded).reshape(3)
    assert q[0] == 127 and sorted(q[1:].tolist()) == [0, 1]  # unweighted: [0, 0]


def test_the_check_judges_every_sample_on_a_rounding_fitted_without_it():
    """Fitted on each half and run on the other: the unseen outputs are, sample by sample,
    those of the rounding fitted on the other half, and all the samples are judged."""
    from onnxcomp import fidelity

    model, calib, _ = _random_model()
    plain = QUANTIZE(model, _config(rounding=False), calib).model
    first, second = rounding._halves(calib)
    found = rounding._convs(model, plain, ["c1", "dw", "c3"], calib)
    reference = fidelity.Reference.of(model, calib)
    near, unseen = rounding._unseen(model, plain, reference, reference.compare(plain), first,
                                    second, ["c1", "dw", "c3"], 0, found)
    assert near.num_samples == unseen.num_samples == calib.num_samples == 64
    on_first, _ = rounding.round_layers(model, plain, first, ["c1", "dw", "c3"], found=found)
    on_second, _ = rounding.round_layers(model, plain, second, ["c1", "dw", "c3"], found=found)
    cross = [np.concatenate([a, b]) for a, b in zip(
        fidelity.run(on_second, first), fidelity.run(on_first, second), strict=True)]
    assert unseen.rel_l2 == reference.compare_outputs(cross).rel_l2
    assert near.rel_l2 == reference.compare(plain).rel_l2
