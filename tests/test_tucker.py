from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, calibration, conv_model, op_count

from onnxcomp.decompose import LowRankConfig
from onnxcomp.passbase import SkipReason
from onnxcomp.passes import REGISTRY

tucker = REGISTRY["tucker"]
EXACT = {"latency_check": False, "min_macs": 0}


def tucker_kernel(o: int, c: int, k: int, r_out: int, r_in: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    core = rng.standard_normal([r_out, r_in, k, k])
    u_out = rng.standard_normal([o, r_out])
    u_in = rng.standard_normal([c, r_in])
    return np.einsum("pqij,op,cq->ocij", core, u_out, u_in).astype(np.float32)


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [0, 1, 1, 0]},
    {"dilations": [1, 2], "pads": [1, 2, 1, 2]},
    {"auto_pad": "SAME_LOWER"},
])
def test_exact_tucker_ranks_are_reproduced(attrs):
    model = conv_model(tucker_kernel(32, 24, 3, r_out=8, r_in=8), **attrs)
    result = tucker(model, LowRankConfig(rank=8, **EXACT), calibration(model))
    assert op_count(result.model, "Conv") == 3
    assert result.report.applied[0].details["ranks"] == [8, 8]
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_fraction_keeps_channel_proportions():
    rng = np.random.default_rng(1)
    model = conv_model(rng.standard_normal([64, 32, 3, 3]).astype(np.float32), pads=[1] * 4)
    result = tucker(model, LowRankConfig(rank=0.25, **EXACT), calibration(model))
    assert result.report.applied[0].details["ranks"] == [8, 16]


def test_refit_helps_and_is_bounded():
    rng = np.random.default_rng(2)
    model = conv_model(rng.standard_normal([32, 32, 3, 3]).astype(np.float32), pads=[1] * 4)
    result = tucker(model, LowRankConfig(rank=8, **EXACT), calibration(model))
    d = result.report.applied[0].details
    assert d["calib_error_after_refit"] <= d["calib_error_before_refit"]


def test_pointwise_is_skipped():
    model = conv_model(np.ones([8, 8, 1, 1], np.float32))
    before = model.SerializeToString()
    result = tucker(model, LowRankConfig(rank=4, **EXACT), calibration(model))
    assert [s.reason for s in result.report.skipped] == [SkipReason.UNSUPPORTED_ATTRIBUTE]
    assert result.model.SerializeToString() == before


def test_data_basis_beats_weight_basis_on_anisotropic_inputs():
    """Six loud input channels: the output subspace that matters on the data (data basis)
    loses less than the weights' leading subspace, at the same ranks and without refit."""
    from builders import basis_errors, loud_channels_model

    w = np.random.default_rng(5).standard_normal([32, 16, 3, 3])
    model = loud_channels_model(w, loud=3, pads=[1] * 4)
    errors = basis_errors(tucker, model, calibration(model, n=32), rank=8, **EXACT)
    assert errors["data"] < 0.8 * errors["weights"]
