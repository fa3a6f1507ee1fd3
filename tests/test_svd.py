from __future__ import annotations

import numpy as np
import pytest
from builders import (
    assert_equivalent,
    basis_errors,
    calibration,
    conv_model,
    loud_channels_model,
    make_model,
    op_count,
    relative_error,
    tensor,
)
from onnx import helper

from onnxcomp.decompose import LowRankConfig
from onnxcomp.passbase import SkipReason
from onnxcomp.passes import REGISTRY

svd = REGISTRY["svd"]
EXACT = {"latency_check": False, "min_macs": 0}


def spatial_kernel(o: int, c: int, kh: int, kw: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal([rank, c, kh])
    h = rng.standard_normal([o, rank, kw])
    return np.einsum("orj,rci->ocij", h, v).astype(np.float32)


def low_rank(m: int, n: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal([m, rank]) @ rng.standard_normal([rank, n])).astype(np.float32)


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 1], "pads": [1, 0, 1, 2]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
])
def test_exact_spatial_rank(attrs):
    model = conv_model(spatial_kernel(32, 32, 3, 3, rank=8), **attrs)
    result = svd(model, LowRankConfig(rank=8, **EXACT), calibration(model))
    assert op_count(result.model, "Conv") == 2
    assert result.report.applied[0].details["form"] == "spatial"
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_exact_pointwise_rank():
    w = low_rank(64, 48, 8).reshape(64, 48, 1, 1)
    model = conv_model(w, strides=[2, 2])
    result = svd(model, LowRankConfig(rank=8, **EXACT), calibration(model))
    assert result.report.applied[0].details["form"] == "pointwise"
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("op", "trans_b"), [("Gemm", 0), ("Gemm", 1), ("MatMul", 0)])
def test_exact_fc_rank(op, trans_b):
    rng = np.random.default_rng(3)
    w = low_rank(96, 80, 8)  # [K, N]
    inits = {"W": w.T.copy() if trans_b else w}
    inputs = ["x", "W"]
    attrs = {}
    if op == "Gemm":
        inits["C"] = rng.standard_normal(80).astype(np.float32)
        inputs.append("C")
        attrs = {"transB": trans_b, "alpha": 0.5, "beta": 2.0}
    nodes = [helper.make_node(op, inputs, ["y"], name="fc", **attrs)]
    model = make_model(nodes, [tensor("x", [4, 96])], [tensor("y", [4, 80])], inits)
    result = svd(model, LowRankConfig(rank=8, **EXACT), calibration(model, batch=4))
    assert result.report.applied[0].details["form"] == "fc"
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4, batch=4)


def test_batched_matmul_rows():
    w = low_rank(64, 48, 4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [tensor("x", ["N", 10, 64])], [tensor("y", ["N", 10, 48])],
                       {"W": w})
    result = svd(model, LowRankConfig(rank=4, **EXACT), calibration(model))
    assert op_count(result.model, "MatMul") == 2
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_grouped_conv_skipped():
    model = conv_model(np.ones([8, 2, 3, 3], np.float32), group=4, pads=[1] * 4)
    result = svd(model, LowRankConfig(rank=2, **EXACT), calibration(model))
    assert [s.reason for s in result.report.skipped] == [SkipReason.GROUPED]


@pytest.mark.parametrize(("batches", "refit"), [(2, "none"), (60, "asymmetric")])
def test_fc_refit_needs_enough_rows(batches, refit):
    """One row per sample for an FC layer: a rank-16 refit needs 10 x 17 rows or is skipped."""

    rng = np.random.default_rng(4)
    w1 = rng.standard_normal([96, 64]).astype(np.float32)
    w2 = rng.standard_normal([64, 80]).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor("x", ["N", 96])], [tensor("y", ["N", 80])],
                       {"W1": w1, "W2": w2})
    calib = calibration(model, n=batches, batch=4)
    result = svd(model, LowRankConfig(rank=16, **EXACT), calib)
    details = {c.node: c.details for c in result.report.applied}
    assert details["fc2"]["refit"].startswith(refit)
    # Held-out data: the model never gets worse than the raw decomposition.
    from builders import random_feeds

    from onnxcomp.calibration import Calibration

    held = Calibration([random_feeds(model, 500 + s, 4) for s in range(20)], False, "held")
    raw = svd(model, LowRankConfig(rank=16, refit=False, **EXACT), calib)
    assert relative_error(model, result.model, held) <= 1.05 * relative_error(
        model, raw.model, held)


def test_data_basis_beats_weight_basis_on_anisotropic_inputs():
    """Inputs living mostly in a few channels: keeping the outputs' principal subspace (data)
    loses far less than keeping W's top singular vectors (weights), at the same rank."""
    w = np.random.default_rng(5).standard_normal([48, 64, 1, 1])  # full rank 48
    model = loud_channels_model(w, loud=6)
    errors = basis_errors(svd, model, calibration(model, n=16), rank=8, **EXACT)
    assert errors["data"] < 0.5 * errors["weights"]


def test_data_basis_is_exact_at_the_layer_rank():
    """At the layer's rank both bases are exact (a tie keeps the weights' basis)."""
    w = low_rank(64, 48, 8).reshape(64, 48, 1, 1)
    model = conv_model(w)
    result = svd(model, LowRankConfig(rank=8, basis="data", **EXACT), calibration(model))
    assert result.report.applied[0].details["basis"].startswith("weights")
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_basis_option_is_checked():
    from onnxcomp.passbase import ConfigError

    with pytest.raises(ConfigError, match="--basis"):
        LowRankConfig(basis="pca")


def test_fc_layer_with_few_rows_keeps_the_weight_basis():
    """One row per sample: a 96-dim input covariance from 8 rows would describe the samples,
    not the data, so the data basis falls back to the weights' SVD (and says so)."""
    w = low_rank(96, 80, 8)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    model = make_model(nodes, [tensor("x", ["N", 96])], [tensor("y", ["N", 80])], {"W": w})
    result = svd(model, LowRankConfig(rank=8, basis="data", **EXACT),
                 calibration(model, n=4, batch=2))
    assert result.report.applied[0].details["basis"] == "weights"


def test_data_basis_must_hold_across_runs_of_related_samples():
    """Calibration sets come in runs (crops of one photo, one folder): a basis fitted on the
    first half of the samples must also serve the second. Here the two halves live in
    different input subspaces, so the check keeps the weights' basis; the same samples
    interleaved (each half sees both subspaces) pass it."""
    from onnxcomp.calibration import Calibration

    w = np.random.default_rng(3).standard_normal([64, 64, 1, 1]).astype(np.float32)
    model = conv_model(w, size=8, batch="N")
    rng = np.random.default_rng(4)

    def batch(lo: int) -> dict[str, np.ndarray]:
        x = np.zeros([2, 64, 8, 8], np.float32)
        x[:, lo:lo + 24] = rng.standard_normal([2, 24, 8, 8])
        return {"x": x}

    runs = [batch(0) for _ in range(4)] + [batch(32) for _ in range(4)]
    mixed = [runs[i // 2 + (i % 2) * 4] for i in range(8)]
    cfg = LowRankConfig(rank=16, refit=False, basis="data", **EXACT)
    split = svd(model, cfg, Calibration(runs, False, "runs"))
    interleaved = svd(model, cfg, Calibration(mixed, False, "mixed"))
    assert split.report.applied[0].details["basis"].startswith("weights (the data basis did not")
    assert interleaved.report.applied[0].details["basis"] == "data"
