from __future__ import annotations

import numpy as np
from builders import calibration, conv_model
from onnx import numpy_helper

from onnxcomp import fidelity, verify


def _scaled(model, factor):
    out = type(model)()
    out.CopyFrom(model)
    w = next(i for i in out.graph.initializer if i.name == "W")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * factor, "W"))
    return out


def test_reference_compares_candidates_on_the_same_samples():
    model = conv_model(np.random.default_rng(0).standard_normal([4, 3, 3, 3]), pads=[1] * 4)
    calib = calibration(model, n=3, batch=2)
    ref = fidelity.Reference.of(model, calib)
    assert ref.compare(model).rel_l2 < 1e-6
    assert ref.compare(_scaled(model, 1.1)).rel_l2 > 0.01
    # The same figure as comparing outputs computed by hand.
    got = fidelity.run(_scaled(model, 1.1), calib)
    assert ref.compare_outputs(got).rel_l2 == ref.compare(_scaled(model, 1.1)).rel_l2


def test_first_samples_reuse_batch_first_outputs():
    model = conv_model(np.random.default_rng(1).standard_normal([4, 3, 3, 3]), pads=[1] * 4,
                       batch="N")
    calib = calibration(model, n=3, batch=2)
    ref = fidelity.Reference.of(model, calib)
    sub = ref.first(3)
    assert sub.calib.num_samples == 3 and sub.outputs[0].shape[0] == 3
    np.testing.assert_array_equal(sub.outputs[0], ref.outputs[0][:3])


def test_drop_prefers_decisions_then_top1_then_error():
    fid = verify.Fidelity((verify.OutputFidelity("y", 0.3, 1.0, 1.0, top1_agreement=0.9),),
                          10, decision_agreement=0.75)
    assert fidelity.drop(fid) == 0.25
    fid = verify.Fidelity((verify.OutputFidelity("y", 0.3, 1.0, 1.0, top1_agreement=0.9),), 10)
    assert abs(fidelity.drop(fid) - 0.1) < 1e-12
    fid = verify.Fidelity((verify.OutputFidelity("y", 0.3, 1.0, 1.0),), 10)
    assert fidelity.drop(fid) == 0.3
