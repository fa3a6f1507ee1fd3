from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, calibration, conv_model, op_count, relative_error

from onnxcomp import sharing
from onnxcomp.passbase import ConfigError, SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.kernel_sharing import KernelSharingConfig

kernel_sharing = REGISTRY["kernel_sharing"]
EXACT = {"latency_check": False, "min_macs": 0}


def shared_kernel(o: int, c: int, groups: int, k: int = 3, weighted: bool = True,
                  seed: int = 0) -> np.ndarray:
    """A kernel with exactly ``groups`` shared kernels (and per-channel scales if weighted)."""
    rng = np.random.default_rng(seed)
    kernels = rng.standard_normal([o, groups, k, k])
    assign = np.concatenate([np.arange(groups), rng.integers(0, groups, c - groups)])
    rng.shuffle(assign)
    alpha = rng.standard_normal(c) if weighted else np.ones(c)
    return (kernels[:, assign] * alpha[None, :, None, None]).astype(np.float32)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [1, 0, 1, 0]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
])
def test_exact_groups_are_reproduced(weighted, attrs):
    model = conv_model(shared_kernel(24, 16, 4, weighted=weighted), **attrs)
    config = KernelSharingConfig(rank=4, weighted=weighted, **EXACT)
    result = kernel_sharing(model, config, calibration(model))
    assert op_count(result.model, "Conv") == 2
    change = result.report.applied[0]
    assert change.details["weight_error"] < 1e-6
    assert change.macs_after < change.macs_before
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_weighted_beats_plain_on_scaled_channels():
    w = shared_kernel(24, 16, 4, weighted=True, seed=3)
    assert sharing.kernel_sharing(w, 4, weighted=True).rel_error < 1e-6
    assert sharing.kernel_sharing(w, 4, weighted=False).rel_error > 0.05


def test_lloyd_never_worse_than_a_random_grouping():
    rng = np.random.default_rng(5)
    w = rng.standard_normal([32, 32, 3, 3])
    fit = sharing.kernel_sharing(w, 8, weighted=True)
    slices = w.transpose(1, 0, 2, 3).reshape(32, -1)
    assign = rng.integers(0, 8, 32)
    resid = 0.0
    for g in range(8):
        members = slices[assign == g]
        if len(members):
            s = np.linalg.svd(members, compute_uv=False)
            resid += float(np.sum(s[1:] ** 2))
    assert fit.rel_error <= np.sqrt(resid / np.sum(slices ** 2))
    np.testing.assert_allclose(
        fit.reconstruct(), (fit.share_matrix().T @ fit.kernels.reshape(32, 8, -1)
                            .transpose(1, 0, 2).reshape(8, -1)).reshape(32, 32, 3, 3)
        .transpose(1, 0, 2, 3), atol=1e-9)


def test_refit_improves_calibration_error():
    rng = np.random.default_rng(2)
    model = conv_model(rng.standard_normal([16, 16, 3, 3]).astype(np.float32), pads=[1] * 4)
    calib = calibration(model, n=8)
    raw = kernel_sharing(model, KernelSharingConfig(rank=8, refit=False, **EXACT), calib)
    fit = kernel_sharing(model, KernelSharingConfig(rank=8, **EXACT), calib)
    assert relative_error(model, fit.model, calib) <= relative_error(model, raw.model, calib)
    d = fit.report.applied[0].details
    assert d["weighted"] is True and d["ranks"] == [8]


def test_1x1_and_grouped_are_skipped():
    for model, reason in (
        (conv_model(np.ones([8, 8, 1, 1], np.float32)), SkipReason.UNSUPPORTED_ATTRIBUTE),
        (conv_model(np.ones([8, 2, 3, 3], np.float32), group=4, pads=[1] * 4),
         SkipReason.GROUPED),
    ):
        before = model.SerializeToString()
        result = kernel_sharing(model, KernelSharingConfig(rank=2, **EXACT),
                                calibration(model))
        assert [s.reason for s in result.report.skipped] == [reason]
        assert result.model.SerializeToString() == before


def test_groups_validation():
    with pytest.raises(ConfigError):
        KernelSharingConfig(rank=0)
