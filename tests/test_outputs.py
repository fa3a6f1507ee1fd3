"""What outputs decide: argmax decisions, above-threshold scores, regressions."""

from __future__ import annotations

import numpy as np
from builders import calibration, make_model, run, tensor, yolo_head
from onnx import helper

from onnxcomp import fidelity, verify
from onnxcomp.outputs import ScoreOutput, f1_per_sample, score_outputs


def test_a_sigmoid_output_is_all_scores_through_reshapes_and_transposes():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
             helper.make_node("Transpose", ["s"], ["t"], name="tr", perm=[0, 2, 3, 1]),
             helper.make_node("Flatten", ["t"], ["y"], name="fl")]
    model = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 32])])
    assert score_outputs(model) == [ScoreOutput(0)]


def test_boxes_concatenated_with_scores_split_on_the_concat_axis():
    model = yolo_head(classes=6, size=4)
    assert score_outputs(model) == [ScoreOutput(0, 1, 4, 10)]
    assert verify.decision_outputs(model) == []


def test_outputs_that_decide_nothing_are_not_scores():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    model = make_model(nodes, [tensor("x", [1, 4])], [tensor("y", [1, 4])])
    assert score_outputs(model) == []


def test_f1_per_sample():
    ref = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    got = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
    assert f1_per_sample(ref, got).tolist() == [2 / 3, 1.0, 0.0]


def test_score_agreement_counts_cells_that_cross_the_threshold():
    model = yolo_head(classes=6, size=4)
    calib = calibration(model, n=2, batch=2)
    ref = fidelity.Reference.of(model, calib)
    assert ref.scores == [ScoreOutput(0, 1, 4, 10)]
    same = ref.compare(model)
    assert same.score_agreement == 1.0 and fidelity.bound(same) == (0.0, "scores")
    # Moving the boxes alone keeps every score: the drop is the boxes' regression error.
    outs = [np.concatenate([r for r in run_all(model, calib)])]
    moved = outs[0].copy()
    moved[:, :4] *= 1.1
    fid = ref.compare_outputs([moved])
    assert fid.score_agreement == 1.0
    assert fid.regression_rel_l2 is not None and fid.regression_rel_l2 > 0.01
    assert fidelity.bound(fid)[1] == "regression"
    # Scores pushed across 0.5 lose their cells.
    flipped = outs[0].copy()
    flipped[:, 4:] = 1 - flipped[:, 4:]
    lost = ref.compare_outputs([flipped])
    assert lost.score_agreement < 0.5
    assert fidelity.bound(lost)[1] == "scores"
    assert fidelity.agreement(lost) == lost.score_agreement


def test_synthetic_calibration_judges_no_scores():
    from onnxcomp.synthetic import synthetic_calibration

    model = yolo_head(size=4)
    assert verify.calibrated_scores(model, synthetic_calibration(model, 2)) == []


def run_all(model, calib):
    return [run(model, batch)[0] for batch in calib.batches]


def test_a_two_class_softmax_map_is_a_score_map_not_a_decision():
    """MTCNN PNet's face map: softmax over 2 classes at every position."""
    nodes = [helper.make_node("Softmax", ["x"], ["p"], name="sm", axis=1)]
    model = make_model(nodes, [tensor("x", [1, 2, 6, 6])], [tensor("p", [1, 2, 6, 6])])
    assert score_outputs(model) == [ScoreOutput(0, 1, 1, 2)]
    assert verify.decision_outputs(model) == []
    # a [N, 2] classifier stays a decision
    flat = make_model([helper.make_node("Softmax", ["x"], ["p"], name="sm", axis=1)],
                      [tensor("x", [1, 2])], [tensor("p", [1, 2])])
    assert score_outputs(flat) == [] and verify.decision_outputs(flat) == [(0, 1)]
