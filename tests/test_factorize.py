"""factorize: per layer, the best option of every decomposition method."""

from __future__ import annotations

import numpy as np
import pytest
from builders import calibration, cp_kernel, make_model, relative_error, tensor
from onnx import helper

from onnxcomp.passbase import ConfigError
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.factorize import METHODS, FactorizeConfig, MixedMethod

factorize = REGISTRY["factorize"]


def _separable_kernel(o, c, k, rank, seed):
    """W[o,c,i,j] = sum_r H[o,r,j] V[r,c,i]: exactly spatial-SVD rank ``rank``."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal([rank, c, k])
    h = rng.standard_normal([o, rank, k])
    return (np.einsum("orj,rci->ocij", h, v) / np.sqrt(c * k)).astype(np.float32)


def _model():
    """c1: spatially separable at rank 4; c2: CP rank 4; fc: a dense FC layer."""
    w1 = _separable_kernel(32, 16, 3, 4, seed=1)
    w2 = cp_kernel(32, 32, 3, 3, rank=4, seed=2)
    rng = np.random.default_rng(3)
    wf = rng.standard_normal([32 * 8 * 8, 10]).astype(np.float32) / 40
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Conv", ["ra", "W2"], ["b"], name="c2", pads=[1] * 4),
             helper.make_node("Flatten", ["b"], ["f"], name="fl"),
             helper.make_node("MatMul", ["f", "WF"], ["y"], name="fc")]
    return make_model(nodes, [tensor("x", [1, 16, 8, 8])], [tensor("y", [1, 10])],
                      {"W1": w1, "W2": w2, "WF": wf})


def test_each_layer_takes_the_method_that_fits_it():
    model = _model()
    calib = calibration(model, n=4, batch=2)
    result = factorize(model, FactorizeConfig(min_macs=0, latency_check=False,
                                              target_macs=0.4, min_agreement=0.0), calib)
    methods = {c.node: c.details["method"] for c in result.report.applied}
    assert methods.get("c1") == "svd"  # exactly separable: spatial SVD at rank 4 is exact
    # low CP rank: a CP or Tucker chain, or a spatial SVD (CP rank 4 is also spatial rank
    # <= 4); all exact, so which one wins is down to the measured speeds
    assert methods.get("c2") in ("cp", "tucker", "svd")
    (c2,) = [o for o in result.report.metrics["layer_options"]["c2"] if o["chosen"]]
    assert c2["error"] < 1e-3
    assert set(methods.values()) <= set(METHODS)
    seen = {c.node for c in result.report.applied} | {s.node for s in result.report.skipped}
    assert seen == {"c1", "c2", "fc"}
    assert relative_error(model, result.model, calib) < 0.05
    # the report keeps every option weighed per layer, and which one won
    options = result.report.metrics["layer_options"]
    assert {o["method"] for o in options["c1"]} == set(METHODS)
    assert sum(o["chosen"] for o in options["c1"]) == 1
    assert not any(o["chosen"] for o in options["fc"])


def test_options_come_from_every_able_method():
    from onnxcomp import linear
    from onnxcomp.graph import Graph
    from onnxcomp.passbase import Report

    model = _model()
    layers = linear.find_layers(Graph(model), linear.static_shapes(
        model, calibration(model)), ["Conv", "MatMul"], Report("t"))
    mixed = MixedMethod(tuple(METHODS))
    config = FactorizeConfig(min_macs=0)
    by_layer = {lay.name: {mixed.methods[r[0]].name for r in mixed.rank_options(lay, config)}
                for lay in layers}
    assert by_layer["c1"] == set(METHODS)
    assert by_layer["fc"] == {"svd"}


def test_restricted_methods_and_validation():
    model = _model()
    calib = calibration(model, n=4, batch=2)
    only = factorize(model, FactorizeConfig(min_macs=0, latency_check=False, target_macs=0.6,
                                            min_agreement=0.0, methods=("tucker",)), calib)
    assert {c.details["method"] for c in only.report.applied} <= {"tucker"}
    assert only.report.applied
    with pytest.raises(ConfigError):
        FactorizeConfig(rank=4)
    with pytest.raises(ConfigError):
        FactorizeConfig(methods=("magic",))
