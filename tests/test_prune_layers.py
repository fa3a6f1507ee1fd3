from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, calibration, op_count, relative_error
from test_prune_channels import Net

from onnxcomp.passbase import ConfigError, RunContext, SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.prune_layers import PruneLayersConfig
from onnxcomp.timing import Modelled, Timer

prune_layers = REGISTRY["prune_layers"]


def _residual_net(zero_branch: bool):
    net = Net(c_in=8)
    a = net.conv("x", 8, 8)
    r = net.op("Relu", [a])
    b = net.conv(r, 8, 8, zero=tuple(range(8)) if zero_branch else ())
    s = net.op("Add", ["x", b])
    c = net.conv(s, 8, 4)
    return net.model(c, [4, 8, 8])


def test_zero_residual_branch_is_removed_exactly():
    model = _residual_net(zero_branch=True)
    result = prune_layers(model, PruneLayersConfig(layers=1), calibration(model))
    change = result.report.applied[0]
    assert change.what == "removed residual branch"
    assert change.details["importance"] < 1e-6
    assert op_count(result.model, "Add") == 0 and op_count(result.model, "Conv") == 1
    assert_equivalent(model, result.model, rtol=1e-5, atol=1e-5)


def test_identity_conv_is_removed_exactly():
    net = Net(c_in=8)
    a = net.conv("x", 8, 8)
    w = np.zeros([8, 8, 3, 3], np.float32)
    w[np.arange(8), np.arange(8), 1, 1] = 1.0
    ident = net.conv(a, 8, 8)
    net.inits[f"{ident}_W"] = w
    net.inits[f"{ident}_B"] = np.zeros(8, np.float32)
    c = net.conv(ident, 8, 4)
    model = net.model(c, [4, 8, 8])
    result = prune_layers(model, PruneLayersConfig(layers=1), calibration(model))
    assert result.report.applied[0].node == ident
    assert op_count(result.model, "Conv") == 2
    assert_equivalent(model, result.model, rtol=1e-5, atol=1e-5)


def test_least_important_goes_and_others_are_reported():
    model = _residual_net(zero_branch=False)
    calib = calibration(model, n=8)
    result = prune_layers(model, PruneLayersConfig(layers=1), calib)
    applied = result.report.applied
    skipped = result.report.skipped
    assert len(applied) == 1
    assert all(s.reason == SkipReason.NOT_SELECTED for s in skipped)
    chosen = applied[0].details["importance"]
    assert all(float(s.detail.rsplit(" ", 1)[1]) >= chosen for s in skipped)
    # The refit of the next layer never makes the model worse than plain removal.
    plain = prune_layers(model, PruneLayersConfig(layers=1, refit=False), calib)
    assert relative_error(model, result.model, calib) <= relative_error(
        model, plain.model, calib) + 1e-6


def test_unreachable_speed_target():
    model = _residual_net(zero_branch=False)
    # every candidate measures 1.01x whatever is removed
    modelled = Modelled(lambda m: 1.01 if m is model else 1.0)
    result = prune_layers(model, PruneLayersConfig(target_speedup=3.0), calibration(model),
                          context=RunContext(timer=Timer(modelled)))
    assert modelled.calls >= 1
    assert result.report.metrics["target_met"] is False
    assert "target_not_met" in [w.code for w in result.report.warnings]
    assert result.report.applied


@pytest.mark.parametrize("kwargs", [{"layers": 0}, {"layers": 1, "target_speedup": 2.0},
                                    {"target_speedup": 1.0}])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        PruneLayersConfig(**kwargs)


def test_two_convs_in_a_row_are_removed_and_the_rest_refit():
    net = Net(c_in=8)
    a = net.conv("x", 8, 8)
    r = net.op("Relu", [a])
    b = net.conv(r, 8, 8)  # b and c: identity-shaped, c reads b's output
    c = net.conv(b, 8, 8)
    d = net.conv(c, 8, 4)
    model = net.model(d, [4, 8, 8])
    calib = calibration(model, n=8)
    result = prune_layers(model, PruneLayersConfig(layers=2), calib)
    assert {ch.node for ch in result.report.applied} == {b, c}
    assert op_count(result.model, "Conv") == 2
    assert relative_error(model, result.model, calib) < 1.0
