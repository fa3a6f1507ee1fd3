from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import conv_bn_model

from onnxcomp import verify
from onnxcomp.passbase import PassError


def test_compare_outputs_metrics():
    ref = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    got = np.array([[1.0, 2.0, 0.5], [0.0, 4.0, 3.0]])
    fid = verify.compare_outputs(["logits"], [ref], [got])
    assert fid.rel_l2 == pytest.approx(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert fid.outputs[0].max_abs == pytest.approx(3.0)
    assert fid.top1_agreement == pytest.approx(0.5)
    assert not fid.within()
    assert verify.compare_outputs(["y"], [ref], [ref + 1e-9]).within()


def test_shape_change_is_an_error():
    with pytest.raises(PassError, match="changed shape"):
        verify.compare_outputs(["y"], [np.zeros([2, 3])], [np.zeros([2, 4])])


def test_check_interface():
    a = conv_bn_model()
    b = conv_bn_model()
    verify.check_interface(a, b)
    b.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 9
    with pytest.raises(PassError, match="changed shape"):
        verify.check_interface(a, b)
    c = conv_bn_model()
    c.graph.output[0].name = "renamed"
    with pytest.raises(PassError, match="outputs changed"):
        verify.check_interface(a, c)


def test_within_noise_allows_a_multiple_of_the_reference_noise():
    ref = [np.array([[0.999, 0.001]], np.float32)]
    moved = [ref[0] + np.float32(3e-4)]
    fidelity = verify.compare_outputs(["p"], ref, moved)
    assert not fidelity.within()  # past the fixed tolerance (1e-5 + 1e-4 * 0.999)
    quiet = verify.compare_outputs(["p"], ref, [ref[0] + np.float32(1e-6)])
    loud = verify.compare_outputs(["p"], ref, [ref[0] + np.float32(1e-4)])
    assert not fidelity.within_noise(quiet)
    assert fidelity.within_noise(loud)  # 3e-4 <= 1.1e-4 + 4 * 1e-4
    assert not fidelity.within_noise(loud, factor=1.0)


def _heads_model(heads: list[tuple[str, dict]]) -> onnx.ModelProto:
    """x[N,8] -> MatMul + Add -> each head op -> its own graph output (out0, out1, ...)."""
    from builders import make_model, tensor
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "B"], ["hb"], name="bias")]
    outputs = []
    for i, (op, attrs) in enumerate(heads):
        nodes.append(helper.make_node(op, ["hb"], [f"out{i}"], name=f"head{i}", **attrs))
        outputs.append(tensor(f"out{i}", ["N", 4]))
    inits = {"W": np.ones((8, 4), np.float32), "B": np.zeros(4, np.float32)}
    return make_model(nodes, [tensor("x", ["N", 8])], outputs, inits)


def test_decision_outputs_prefer_softmax_over_linear_regressions():
    # Softmax beside a box regression (MTCNN): only the softmax decides.
    model = _heads_model([("Identity", {}), ("Softmax", {"axis": 1})])
    assert verify.decision_outputs(model) == [(1, 1)]
    # No softmax: a linear layer's output is read as logits over the last axis.
    assert verify.decision_outputs(_heads_model([("Identity", {})])) == [(0, -1)]
    # A sigmoid map decides nothing by argmax.
    assert verify.decision_outputs(_heads_model([("Sigmoid", {})])) == []


def test_decision_agreement_counts_a_sample_once_for_all_its_positions():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 5, 3))  # 4 samples, 5 steps, 3 classes
    got = ref.copy()
    got[1, 2] = -got[1, 2]  # sample 1 changes its decision at one step
    got[3, 0] = -got[3, 0]
    got[3, 4] = -got[3, 4]  # sample 3 at two steps
    changed = [(ref[i].argmax(-1) != got[i].argmax(-1)).any() for i in range(4)]
    expected = 1 - np.mean(changed)
    assert expected < 1
    assert verify.decision_agreement([(0, -1)], [ref], [got]) == pytest.approx(expected)
    assert verify.decision_agreement([(0, -1)], [ref], [ref]) == 1.0
    # A batch axis is not a class axis; no decision output: no agreement.
    assert verify.decision_agreement([(0, 0)], [ref], [got]) is None
    assert verify.decision_agreement([], [ref], [got]) is None
