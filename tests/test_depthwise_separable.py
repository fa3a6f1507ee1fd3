from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, calibration, conv_model, op_count
from onnx import numpy_helper

from onnxcomp import sharing
from onnxcomp.passbase import ConfigError, SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.depthwise_separable import SeparableConfig

separable = REGISTRY["depthwise_separable"]
EXACT = {"latency_check": False, "min_macs": 0}


def separable_kernel(o: int, c: int, m: int, k: int = 3, seed: int = 0) -> np.ndarray:
    """W[o, c] = sum_j P[o, c, j] D[c, j]: exactly depthwise-separable at multiplier m."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal([o, c, m])
    d = rng.standard_normal([c, m, k * k])
    return np.einsum("ocj,cjk->ock", p, d).reshape(o, c, k, k).astype(np.float32)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 1], "pads": [1, 1, 1, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
])
def test_exact_separable_kernel_is_reproduced(m, attrs):
    model = conv_model(separable_kernel(24, 16, m), **attrs)
    result = separable(model, SeparableConfig(rank=m, **EXACT), calibration(model))
    assert op_count(result.model, "Conv") == 2
    dw = next(n for n in result.model.graph.node if n.name.endswith("depthwise"))
    assert next(a.i for a in dw.attribute if a.name == "group") == 16
    w = next(t for t in result.model.graph.initializer if t.name == dw.input[1])
    assert numpy_helper.to_array(w).shape == (16 * m, 1, 3, 3)
    assert result.report.applied[0].details["weight_error"] < 1e-6
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_shared_then_separable_is_exact_on_its_structure():
    rng = np.random.default_rng(1)
    base = separable_kernel(24, 4, 1, seed=2)  # 4 shared kernels, each separable at m=1
    assign = np.concatenate([np.arange(4), rng.integers(0, 4, 12)])
    alpha = rng.standard_normal(16)
    w = (base[:, assign] * alpha[None, :, None, None]).astype(np.float32)
    model = conv_model(w, pads=[1] * 4)
    result = separable(model, SeparableConfig(rank=1, share_groups=4, **EXACT),
                       calibration(model))
    assert op_count(result.model, "Conv") == 3
    assert result.report.applied[0].details["share_groups"] == 4
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_multiplier_error_decreases():
    w = np.random.default_rng(0).standard_normal([16, 8, 3, 3])
    errs = [sharing.depthwise_separable(w, m).rel_error for m in range(1, 10)]
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 1e-12


def test_auto_meets_a_mac_target():
    model = conv_model(separable_kernel(8, 64, 2), size=16, pads=[1] * 4)
    result = separable(model, SeparableConfig(target_macs=0.5, **EXACT), calibration(model))
    change = result.report.applied[0]
    assert change.macs_after <= 0.5 * change.macs_before
    # O = 8, k = 9: break-even multiplier is below 8 * 9 / (9 + 8) = 4.2.
    assert change.details["ranks"][0] <= 4


def test_1x1_skipped_and_validation():
    model = conv_model(np.ones([8, 8, 1, 1], np.float32))
    result = separable(model, SeparableConfig(rank=1, **EXACT), calibration(model))
    assert [s.reason for s in result.report.skipped] == [SkipReason.UNSUPPORTED_ATTRIBUTE]
    with pytest.raises(ConfigError):
        SeparableConfig(share_groups=0)
