from __future__ import annotations

import numpy as np
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
