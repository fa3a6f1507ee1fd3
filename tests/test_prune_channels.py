from __future__ import annotations

import numpy as np
import pytest
from builders import assert_equivalent, calibration, make_model, random_feeds, run, tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxcomp.depgraph import DepGraph
from onnxcomp.graph import Graph
from onnxcomp.passbase import ConfigError, SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.prune_channels import PruneConfig, keep_count

prune = REGISTRY["prune_channels"]


class Net:
    """A tiny builder of conv graphs with seeded weights."""

    def __init__(self, c_in: int = 4, size: int = 8, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.c_in, self.size = c_in, size
        self.n = 0

    def _name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1,
             zero: tuple[int, ...] = ()) -> str:
        name = self._name("conv")
        w = self.rng.standard_normal([c_out, c_in // group, k, k]).astype(np.float32) * 0.3
        b = self.rng.standard_normal(c_out).astype(np.float32) * 0.1
        w[list(zero)] = 0
        b[list(zero)] = 0
        self.inits[f"{name}_W"], self.inits[f"{name}_B"] = w, b
        self.nodes.append(helper.make_node("Conv", [x, f"{name}_W", f"{name}_B"], [name],
                                           name=name, pads=[k // 2] * 4, group=group))
        return name

    def bn(self, x: str, c: int, zero: tuple[int, ...] = ()) -> str:
        name = self._name("bn")
        gamma = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        beta = self.rng.standard_normal(c).astype(np.float32) * 0.1
        mean = self.rng.standard_normal(c).astype(np.float32) * 0.1
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        beta[list(zero)] = 0
        mean[list(zero)] = 0
        for key, v in (("g", gamma), ("b", beta), ("m", mean), ("v", var)):
            self.inits[f"{name}_{key}"] = v
        self.nodes.append(helper.make_node(
            "BatchNormalization", [x] + [f"{name}_{k}" for k in "gbmv"], [name], name=name))
        return name

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        name = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, out: str, out_shape: list):
        self.nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
        return make_model(self.nodes, [tensor("x", ["N", self.c_in, self.size, self.size])],
                          [tensor("y", ["N", *out_shape])], self.inits)


EXACT = {"refit": False, "round_to": 2}


def _zero_channel_chain():
    net = Net()
    a = net.conv("x", 4, 8, zero=(1, 3, 4, 6))
    a = net.bn(a, 8, zero=(1, 3, 4, 6))
    a = net.op("Relu", [a])
    a = net.conv(a, 8, 6)
    return net.model(a, [6, 8, 8])


@pytest.mark.parametrize("refit", [False, True])
def test_zero_channels_are_removed_exactly(refit):
    model = _zero_channel_chain()
    config = PruneConfig(ratio=0.5, round_to=4, refit=refit)
    result = prune(model, config, calibration(model, n=8))
    change = result.report.applied[0]
    assert change.what == "kept 4 of 8 channels"
    assert change.details["removed"] == [1, 3, 4, 6]
    w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert w["conv1_W"].shape[0] == 4 and w["conv4_W"].shape[1] == 4
    assert_equivalent(model, result.model, rtol=1e-5, atol=1e-5)


def test_residual_add_couples_both_branches():
    net = Net()
    a = net.conv("x", 4, 8, zero=(2, 5))
    r = net.op("Relu", [a])
    b = net.conv(r, 8, 8, zero=(2, 5))
    s = net.op("Add", [a, b])
    c = net.conv(s, 8, 3)
    model = net.model(c, [3, 8, 8])
    dep = DepGraph(Graph(model))
    merged = [g for g in dep.groups if set(g.producers) == {"conv1", "conv3"}]
    assert len(merged) == 1 and merged[0].prunable
    result = prune(model, PruneConfig(ratio=0.25, **EXACT), calibration(model))
    assert [c.what for c in result.report.applied] == ["kept 6 of 8 channels"]
    assert_equivalent(model, result.model, rtol=1e-5, atol=1e-5)


def test_concat_offsets_and_depthwise_pass_through():
    net = Net()
    a = net.conv("x", 4, 8, zero=(0, 7))
    b = net.conv("x", 4, 8, zero=(3, 4))
    cat = net.op("Concat", [a, b], axis=1)
    dw = net.conv(cat, 16, 16, group=16)
    c = net.conv(dw, 16, 5)
    model = net.model(c, [5, 8, 8])
    result = prune(model, PruneConfig(ratio=0.25, **EXACT), calibration(model))
    assert sorted(c.what for c in result.report.applied) == ["kept 6 of 8 channels"] * 2
    dw_node = next(n for n in result.model.graph.node if n.name == "conv4")
    assert next(a.i for a in dw_node.attribute if a.name == "group") == 12
    # The depthwise conv's own bias is not zero on pruned channels: the exactness check needs
    # the removed channels to be zero all the way; compare shapes and validity only there.
    for ya, yb in zip(run(model, random_feeds(model, 0)), run(result.model, random_feeds(
            model, 0)), strict=True):
        assert ya.shape == yb.shape


def test_flatten_gemm_slices_by_stride():
    net = Net(size=4)
    a = net.conv("x", 4, 8, zero=(1, 2, 5, 6))
    a = net.op("Relu", [a])
    f = net.op("Flatten", [a], axis=1)
    w = net.rng.standard_normal([10, 8 * 16]).astype(np.float32)
    net.inits["fc_W"] = w
    net.inits["fc_B"] = np.zeros(10, np.float32)
    net.nodes.append(helper.make_node("Gemm", [f, "fc_W", "fc_B"], ["fc"], name="fc",
                                      transB=1))
    model = net.model("fc", [10])
    result = prune(model, PruneConfig(ratio=0.5, **EXACT), calibration(model))
    ws = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert ws["fc_W"].shape == (10, 4 * 16)
    assert_equivalent(model, result.model, rtol=1e-5, atol=1e-5)


def test_blocked_groups_are_reported():
    net = Net()
    a = net.conv("x", 4, 8)
    t = net.op("Transpose", [a], perm=[0, 2, 3, 1])
    model = net.model(t, [8, 8, 8])
    before = model.SerializeToString()
    result = prune(model, PruneConfig(ratio=0.5, **EXACT), calibration(model))
    assert not result.report.applied
    skip = result.report.skipped[0]
    assert skip.reason == SkipReason.BLOCKED and "Transpose" in skip.detail
    assert result.model.SerializeToString() == before


def test_refit_beats_plain_removal():
    net = Net(seed=3)
    a = net.conv("x", 4, 16)
    a = net.op("Relu", [a])
    a = net.conv(a, 16, 8)
    model = net.model(a, [8, 8, 8])
    calib = calibration(model, n=16)
    from builders import relative_error

    plain = prune(model, PruneConfig(ratio=0.5, round_to=4, refit=False), calib)
    fit = prune(model, PruneConfig(ratio=0.5, round_to=4), calib)
    assert relative_error(model, fit.model, calib) < relative_error(model, plain.model, calib)


@pytest.mark.parametrize("criterion", ["l1", "l2", "activation"])
def test_criteria_all_find_the_zero_channels(criterion):
    model = _zero_channel_chain()
    result = prune(model, PruneConfig(ratio=0.5, round_to=4, criterion=criterion),
                   calibration(model, n=8))
    assert result.report.applied[0].details["removed"] == [1, 3, 4, 6]


def test_bn_scale_criterion_uses_gamma():
    net = Net()
    a = net.conv("x", 4, 8)
    a = net.bn(a, 8)
    gamma = net.inits["bn2_g"]
    gamma[[0, 2, 5, 7]] = 1e-3
    a = net.conv(net.op("Relu", [a]), 8, 6)
    model = net.model(a, [6, 8, 8])
    result = prune(model, PruneConfig(ratio=0.5, round_to=4, criterion="bn_scale"),
                   calibration(model, n=8))
    assert result.report.applied[0].details["removed"] == [0, 2, 5, 7]


def test_keep_count_rounding():
    assert keep_count(32, 0.3, 8) == 24
    assert keep_count(8, 0.9, 8) == 8
    assert keep_count(100, 0.5, 1) == 50


@pytest.mark.parametrize("kwargs", [{"ratio": 1.0}, {"ratio": -0.1}, {"criterion": "magic"},
                                    {"target_speedup": 0.5}, {"round_to": -1}])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        PruneConfig(**kwargs)


@st.composite
def random_nets(draw):
    net = Net(seed=draw(st.integers(0, 1000)))
    widths = [8, 16]
    tensors = [(net.conv("x", 4, 8), 8)]
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "dw", "add", "concat", "relu", "bn", "split"]))
        x, c = tensors[draw(st.integers(0, len(tensors) - 1))]
        if kind == "conv":
            c2 = draw(st.sampled_from(widths))
            tensors.append((net.conv(x, c, c2, k=draw(st.sampled_from([1, 3]))), c2))
        elif kind == "dw":
            tensors.append((net.conv(x, c, c, group=c), c))
        elif kind == "relu":
            tensors.append((net.op("Relu", [x]), c))
        elif kind == "bn":
            tensors.append((net.bn(x, c), c))
        elif kind == "add":
            same = [t for t in tensors if t[1] == c]
            y, _ = same[draw(st.integers(0, len(same) - 1))]
            tensors.append((net.op("Add", [x, y]), c))
        elif kind == "split":  # channel Split blocks its groups (not yet remapped)
            name = net._name("split")
            net.nodes.append(helper.make_node("Split", [x], [f"{name}_a", f"{name}_b"],
                                              name=name, axis=1))
            tensors.append((f"{name}_a", c // 2))
        else:
            y, c2 = tensors[draw(st.integers(0, len(tensors) - 1))]
            tensors.append((net.op("Concat", [x, y], axis=1), c + c2))
    last, c = tensors[-1]
    out = net.conv(last, c, 3)
    return net.model(out, [3, 8, 8])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(), st.floats(0.0, 0.8), st.booleans())
def test_random_graphs_stay_valid(model, ratio, refit):
    result = prune(model, PruneConfig(ratio=ratio, round_to=4, refit=refit),
                   calibration(model, n=2))
    feeds = random_feeds(model, 0)
    for ya, yb in zip(run(model, feeds), run(result.model, feeds), strict=True):
        assert ya.shape == yb.shape and np.all(np.isfinite(yb))


def test_default_rounding_is_the_providers_channel_block():
    from onnxcomp import runtime

    model = _zero_channel_chain()
    result = prune(model, PruneConfig(ratio=0.5, refit=False), calibration(model, n=8))
    block = runtime.channel_block("cpu")
    assert result.report.metrics["round_to"] == block
    # 8-channel groups are not above a block of 8 or 16: nothing to prune
    assert not result.report.applied
