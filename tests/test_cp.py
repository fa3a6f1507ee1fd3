from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from builders import (
    assert_equivalent,
    calibration,
    conv_model,
    cp_kernel,
    make_model,
    op_count,
    relative_error,
    run,
    tensor,
)
from onnx import helper

from onnxcomp import allocate, chain, cost, linear, measure, verify
from onnxcomp import benchmark as bench
from onnxcomp.decompose import LowRankConfig
from onnxcomp.graph import Graph
from onnxcomp.lowrank import cp_macs
from onnxcomp.passbase import PROVENANCE_KEY, ConfigError, Report, RunContext, SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.timing import Modelled, Timer

cp = REGISTRY["cp"]
EXACT = {"latency_check": False, "min_macs": 0}


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [1, 0, 1, 0]},
    {"dilations": [2, 1], "pads": [2, 1, 2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "VALID"},
])
def test_exact_cp_rank_is_reproduced(attrs):
    model = conv_model(cp_kernel(16, 8, 3, 3, rank=4), **attrs)
    result = cp(model, LowRankConfig(rank=4, cp_depthwise="separate", **EXACT),
                calibration(model))
    assert op_count(result.model, "Conv") == 4
    change = result.report.applied[0]
    assert change.details["ranks"] == [4]
    assert change.macs_after < change.macs_before
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("mode", "kernel", "convs"), [
    ("merged", 3, 3), ("auto", 3, 3), ("auto", 5, 4), ("separate", 3, 4), ("merged", 5, 3),
    (None, 3, 3), (None, 5, 4)])
def test_merged_depthwise_form_is_exact(mode, kernel, convs):
    """--cp-depthwise merged/auto: one depthwise kxk stage of rank-one kernels, same outputs."""
    p = kernel // 2
    model = conv_model(cp_kernel(16, 8, kernel, kernel, rank=4), pads=[p, p, p, p],
                       strides=[2, 1])
    config = LowRankConfig(rank=4, **EXACT) if mode is None else LowRankConfig(
        rank=4, cp_depthwise=mode, **EXACT)  # None: the default (auto)
    result = cp(model, config, calibration(model))
    assert op_count(result.model, "Conv") == convs
    change = result.report.applied[0]
    in_hw, out_hw = (12, 12), (6, 12)
    assert change.macs_after == cp_macs((16, 8, kernel, kernel), 4, in_hw, out_hw,
                                        merged=convs == 3)
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_cp_depthwise_option_is_checked():
    with pytest.raises(ConfigError, match="--cp-depthwise"):
        LowRankConfig(cp_depthwise="fused")


@pytest.mark.parametrize(("kh", "kw"), [(1, 3), (3, 1), (1, 5)])
def test_three_layer_form_for_1d_kernels(kh, kw):
    model = conv_model(cp_kernel(16, 8, kh, kw, rank=3), pads=[kh // 2, kw // 2] * 2,
                       strides=[2, 1])
    result = cp(model, LowRankConfig(rank=3, **EXACT), calibration(model))
    assert op_count(result.model, "Conv") == 3
    assert_equivalent(model, result.model, rtol=1e-4, atol=1e-4)


def test_provenance_and_input_untouched():
    model = conv_model(cp_kernel(16, 8, 3, 3, rank=4), pads=[1, 1, 1, 1])
    before = model.SerializeToString()
    result = cp(model, LowRankConfig(rank=4, **EXACT), calibration(model))
    assert model.SerializeToString() == before
    names = [n.name for n in result.model.graph.node]
    assert all(n.startswith("cp/conv") for n in names)
    assert all("onnxcomp.pass=cp" in n.doc_string for n in result.model.graph.node)


def test_refit_error_is_reported_and_measured():
    rng = np.random.default_rng(1)
    # The decomposed conv sees inputs in a 3-D subspace of its 8 channels: the refit can use
    # that, the raw decomposition (which fits the weights alone) cannot.
    mix = (rng.standard_normal([8, 3]) @ rng.standard_normal([3, 8])).astype(np.float32)
    w = rng.standard_normal([16, 8, 3, 3]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "M"], ["a"], name="mix"),
             helper.make_node("Conv", ["a", "W"], ["y"], name="conv", pads=[1] * 4)]
    model = make_model(nodes, [tensor("x", [1, 8, 12, 12])], [tensor("y", [1, 16, 12, 12])],
                       {"M": mix[:, :, None, None], "W": w})
    calib = calibration(model)
    raw = cp(model, LowRankConfig(rank=8, refit=False, **EXACT), calib)
    fit = cp(model, LowRankConfig(rank=8, **EXACT), calib)
    d_raw, d_fit = raw.report.applied[0].details, fit.report.applied[0].details
    assert d_raw["calib_error_before_refit"] == d_raw["calib_error_after_refit"]
    assert d_fit["calib_error_after_refit"] < d_fit["calib_error_before_refit"]
    # The claimed errors equal our own measurement on the calibration data (all rows sampled).
    assert relative_error(model, raw.model, calib) == pytest.approx(
        d_raw["calib_error_after_refit"], rel=1e-3)
    assert relative_error(model, fit.model, calib) == pytest.approx(
        d_fit["calib_error_after_refit"], rel=1e-3)


def test_rank_fraction_and_rounding():
    rng = np.random.default_rng(2)
    model = conv_model(rng.standard_normal([32, 32, 3, 3]).astype(np.float32), pads=[1] * 4)
    result = cp(model, LowRankConfig(rank=0.25, **EXACT), calibration(model))
    (rank,) = result.report.applied[0].details["ranks"]
    assert rank % 8 == 0 and rank > 0


def test_auto_meets_mac_target():
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal([32, 16, 3, 3]).astype(np.float32)
    w2 = cp_kernel(32, 32, 3, 3, rank=8, seed=4) + 0.01 * rng.standard_normal(
        [32, 32, 3, 3]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", pads=[1] * 4)]
    model = make_model(nodes, [tensor("x", [1, 16, 12, 12])], [tensor("y", [1, 32, 12, 12])],
                       {"W1": w1, "W2": w2})
    config = LowRankConfig(rank="auto", target_macs=0.6, **EXACT)
    result = cp(model, config, calibration(model))
    t = result.report.totals
    total_before = (32 * 16 + 32 * 32) * 9 * 144
    total_after = total_before - t["macs_before"] + t["macs_after"]
    assert total_after <= 0.6 * total_before
    # The near-rank-8 layer is the cheap one to compress: it must be chosen.
    assert "c2" in {c.node for c in result.report.applied}


def test_unreachable_target_is_reported():
    model = conv_model(cp_kernel(16, 8, 3, 3, rank=4), pads=[1, 1, 1, 1])
    result = cp(model, LowRankConfig(target_macs=0.01, **EXACT), calibration(model))
    assert "target_not_met" in result.report.codes
    assert result.report.metrics["target_met"] is False
    assert "target_not_met" in [w.code for w in result.report.warnings]


def _shared_weight_model():
    w = cp_kernel(8, 8, 3, 3, rank=2)
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Conv", ["a", "W"], ["y"], name="c2", pads=[1] * 4)]
    return make_model(nodes, [tensor("x", [1, 8, 8, 8])], [tensor("y", [1, 8, 8, 8])], {"W": w})


def _input_weight_model():
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1] * 4)]
    return make_model(nodes, [tensor("x", [1, 8, 8, 8]), tensor("W", [8, 8, 3, 3])],
                      [tensor("y", [1, 8, 8, 8])])


@pytest.mark.parametrize(("build", "config", "reasons"), [
    (lambda: conv_model(np.ones([8, 8, 1, 1], np.float32)), EXACT,
     [SkipReason.UNSUPPORTED_ATTRIBUTE]),
    (lambda: conv_model(np.ones([8, 2, 3, 3], np.float32), group=4, pads=[1] * 4), EXACT,
     [SkipReason.GROUPED]),
    (_input_weight_model, EXACT, [SkipReason.NOT_CONSTANT]),
    (_shared_weight_model, EXACT, [SkipReason.SHARED_WEIGHT, SkipReason.SHARED_WEIGHT]),
    (lambda: conv_model(cp_kernel(8, 8, 3, 3, 2), size=4), {"latency_check": False},
     [SkipReason.TOO_SMALL]),
    (lambda: conv_model(cp_kernel(8, 8, 3, 3, 2)), {**EXACT, "exclude": ("conv",)},
     [SkipReason.USER_EXCLUDED]),
    (lambda: conv_model(cp_kernel(8, 8, 3, 3, 2)), {**EXACT, "rank": 64},
     [SkipReason.NO_MAC_WIN]),
])
def test_must_not_fire(build, config, reasons):
    model = build()
    before = model.SerializeToString()
    cfg = {"rank": 2, **config}
    result = cp(model, LowRankConfig(**cfg), calibration(model))
    assert not result.report.applied
    assert [s.reason for s in result.report.skipped] == reasons
    assert result.model.SerializeToString() == before


def test_no_latency_win_is_skipped():
    model = conv_model(cp_kernel(16, 8, 3, 3, rank=4), pads=[1] * 4)
    layer_macs = cost.model_cost(model).macs
    # the chain takes twice the layer's time, whatever its MACs
    ctx = RunContext(timer=Timer(Modelled(
        lambda m: 2.0 if len(m.graph.node) > 1 else 1.0 if m.graph.name == "layer"
        else cost.model_cost(m).macs / layer_macs)))
    result = cp(model, LowRankConfig(rank=4, min_macs=0), calibration(model), context=ctx)
    assert [s.reason for s in result.report.skipped] == [SkipReason.NO_LATENCY_WIN]
    assert "0.50x" in result.report.skipped[0].detail


@pytest.mark.parametrize("kwargs", [
    {"rank": 0}, {"rank": -3}, {"rank": "abc"}, {"rank": 1.5}, {"target_speedup": 0.9},
    {"target_macs": 0.0}, {"target_macs": 1.5}, {"max_error": 0}, {"refit_mode": "magic"},
    {"rank": 4, "target_speedup": 2.0}, {"min_realized": 1.5},
])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        LowRankConfig(**kwargs)


def test_same_seed_same_bytes():
    model = conv_model(cp_kernel(16, 8, 3, 3, rank=6) + 0.1, pads=[1, 1, 1, 1])
    calib = calibration(model)
    a = cp(model, LowRankConfig(rank=4, **EXACT), calib)
    b = cp(model, LowRankConfig(rank=4, **EXACT), calib)
    assert a.model.SerializeToString() == b.model.SerializeToString()


def _two_layer_model():
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal([32, 16, 3, 3]).astype(np.float32)
    w2 = cp_kernel(32, 32, 3, 3, rank=8, seed=6) + 0.05 * rng.standard_normal(
        [32, 32, 3, 3]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", pads=[1] * 4)]
    return make_model(nodes, [tensor("x", [1, 16, 12, 12])], [tensor("y", [1, 32, 12, 12])],
                      {"W1": w1, "W2": w2})


def _rewritten(model):
    return any(p.key == PROVENANCE_KEY for n in model.graph.node for p in n.metadata_props) or \
        any(PROVENANCE_KEY in n.doc_string for n in model.graph.node)


def _modelled(whole=None, *, whole_scale=1.0, chain_scale=1.0, spread=0.0):
    """A run context whose timer computes latencies instead of timing them.

    One-layer models and edge models cost their MACs (a chain: times ``chain_scale``); whole
    models cost their MACs times ``whole_scale``, or, given ``whole``, 1 ms for the original
    and 1 / ``whole`` ms for any rewritten candidate.
    """
    def latency(m):
        ms = cost.model_cost(m).macs * 1e-6
        if m.graph.name in ("layer", "edge"):
            return ms * (chain_scale if len(m.graph.node) > 1 else 1.0)
        if whole is not None:
            return 1.0 / whole if _rewritten(m) else 1.0
        return ms * whole_scale

    bench_ = Modelled(latency, spread=spread)
    return RunContext(timer=Timer(bench_))


def test_auto_skips_chains_that_realize_little_of_their_mac_cut():
    ctx = _modelled(1.5, chain_scale=3.0)  # faster, but by a third of the MAC cut
    model = _two_layer_model()
    result = cp(model, LowRankConfig(min_macs=0, max_error=10.0), calibration(model),
                context=ctx)
    assert not result.report.applied
    assert {s.reason for s in result.report.skipped} == {SkipReason.NO_LATENCY_WIN}
    assert all("realize at most 0.33" in s.detail for s in result.report.skipped)
    looser = cp(model, LowRankConfig(min_macs=0, max_error=10.0, min_realized=0.3),
                calibration(model), context=ctx)
    assert looser.report.applied


def test_whole_model_slower_applies_nothing():
    ctx = _modelled(0.9)
    model = _two_layer_model()
    before = model.SerializeToString()
    result = cp(model, LowRankConfig(rank=8, min_macs=0), calibration(model), context=ctx)
    assert not result.report.applied
    assert {s.reason for s in result.report.skipped} == {SkipReason.NO_LATENCY_WIN}
    assert "whole_model_slower" in result.report.codes
    assert result.model.SerializeToString() == before


def test_unreachable_speedup_target_uses_best_measured():
    ctx = _modelled(1.3)
    model = _two_layer_model()
    result = cp(model, LowRankConfig(target_speedup=3.0, min_macs=0), calibration(model),
                context=ctx)
    assert result.report.metrics["target_met"] is False
    assert "target_not_met" in [w.code for w in result.report.warnings]
    assert result.report.applied  # the best achievable is still applied
    assert result.report.metrics["measured_speedup"] == 1.3


def test_reachable_speedup_target_stops_at_least_aggressive():
    ctx = _modelled(5.0)
    model = _two_layer_model()
    result = cp(model, LowRankConfig(target_speedup=1.2, min_macs=0), calibration(model),
                context=ctx)
    assert "target_met" not in result.report.metrics
    assert result.report.metrics["target_rounds"] == 1


def test_auto_without_target_uses_default_error_bound():
    ctx = _modelled(2.0)
    model = _two_layer_model()
    calib = calibration(model)
    result = cp(model, LowRankConfig(min_macs=0), calib, context=ctx)
    assert "default_max_error" in result.report.codes
    assert result.report.applied
    assert relative_error(model, result.model, calib) <= allocate.DEFAULT_MAX_ERROR


def test_explicit_max_error_is_respected():
    ctx = _modelled(2.0)
    model = _two_layer_model()
    calib = calibration(model)
    loose = cp(model, LowRankConfig(min_macs=0, max_error=0.5), calib, context=ctx)
    tight = cp(model, LowRankConfig(min_macs=0, max_error=0.005), calib, context=ctx)
    assert relative_error(model, tight.model, calib) <= 0.005
    assert tight.report.totals["macs_after"] >= loose.report.totals["macs_after"] or \
        not tight.report.applied


def test_every_candidate_is_applied_or_skipped():
    ctx = _modelled(2.0)
    model = _two_layer_model()
    result = cp(model, LowRankConfig(min_macs=0, max_error=0.02), calibration(model), context=ctx)
    applied = {c.node for c in result.report.applied}
    skipped = {s.node: s.reason for s in result.report.skipped}
    assert applied | set(skipped) == {"c1", "c2"} and not applied & set(skipped)
    # The dense random layer cannot be compressed within 2%: the allocation leaves it alone.
    assert skipped.get("c1") == SkipReason.NOT_SELECTED


def test_auto_without_latency_check_uses_mac_savings():
    model = _two_layer_model()
    calib = calibration(model)
    result = cp(model, LowRankConfig(min_macs=0, latency_check=False, max_error=0.2), calib)
    assert result.report.applied
    speed = cp(model, LowRankConfig(min_macs=0, latency_check=False, target_speedup=1.5), calib)
    assert "speed_target_from_macs" in speed.report.codes
    t = speed.report.totals
    total = (32 * 16 + 32 * 32) * 9 * 144
    assert total - t["macs_before"] + t["macs_after"] <= total / 1.5


def test_speed_target_search_goes_back_to_milder_ranks():
    """Whole-model speedup = MAC ratio: the search must end on a pick that meets the target,
    and with the bisection not on the most aggressive one."""
    model = _two_layer_model()
    # Micro-benchmarks claim 4x more time than the model takes: the first guess overshoots.
    ctx = _modelled(whole_scale=0.25)
    result = cp(model, LowRankConfig(target_speedup=1.3, min_macs=0), calibration(model),
                context=ctx)
    got = result.report.metrics["measured_speedup"]
    assert got >= 1.3
    probes = result.report.metrics["probe_speedups"]
    assert got < max(probes.values()) or len(probes) == 1


def test_error_bound_below_the_target_is_reported():
    ctx = _modelled(5.0)
    model = _two_layer_model()
    result = cp(model, LowRankConfig(target_macs=0.3, max_error=0.001, min_macs=0,
                                     latency_check=False), calibration(model), context=ctx)
    assert result.report.metrics["target_met"] is False
    assert "target_not_met" in [w.code for w in result.report.warnings]
    assert "max_error_bound_active" in result.report.codes


def test_unreachable_target_with_only_noise_level_gains_applies_nothing():
    # Every candidate measures 1.02x: within noise of the original, so no error is spent.
    ctx = _modelled(1.02)
    model = _two_layer_model()
    result = cp(model, LowRankConfig(target_speedup=3.0, min_macs=0), calibration(model),
                context=ctx)
    assert result.report.metrics["target_met"] is False
    assert "target_not_met" in [w.code for w in result.report.warnings]
    assert not result.report.applied
    assert result.report.metrics["probe_speedups"]  # measured, found within noise


def test_realized_in_context_takes_the_edges_off_both_timings():
    layer, plan = SimpleNamespace(macs=4000), SimpleNamespace(macs=1000)  # a 4x MAC cut
    opt = allocate.Option(plan, error=0.1, raw_error=0.1, base_ms=1.0, ms=0.4, edges_ms=0.2)
    assert allocate.realized(opt, layer, in_context=False) == pytest.approx(2.5 / 4)
    assert allocate.realized(opt, layer) == pytest.approx((0.8 / 0.2) / 4)
    # Edges above half of the faster timing are capped there (a noisy edge estimate).
    greedy = allocate.Option(plan, 0.1, 0.1, base_ms=1.0, ms=0.4, edges_ms=0.39)
    assert allocate.realized(greedy, layer) == pytest.approx((0.8 / 0.2) / 4)


def test_edges_of_a_one_layer_model_are_measured_and_below_its_time():
    """Timed alone, a conv pays edge costs (layout conversions, per-run overhead): positive,
    but less than its whole time. c2 keeps its input's shape (stacked copies of itself),
    c1 does not (cheap stand-in layers)."""
    model = _two_layer_model()
    config = LowRankConfig(bench_runs=15, min_macs=0)
    layers = linear.find_layers(Graph(model), linear.static_shapes(
        model, calibration(model)), ["Conv"], Report("test"))
    assert [lay.name for lay in layers] == ["c1", "c2"]
    for layer in layers:
        edges = measure.layer_edges_ms(layer, model, config, Timer())
        one = chain.standalone(layer, None, model.ir_version, model.opset_import)
        alone = bench.benchmark([one], bench.BenchConfig(runs=15)).models[0].median_ms
        assert 0 < edges < alone


def _softmax_model():
    """_two_layer_model with a per-pixel softmax over its 32 channels: a decision output."""
    model = _two_layer_model()
    model.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], name="sm", axis=1))
    del model.graph.output[:]
    model.graph.output.append(tensor("p", [1, 32, 12, 12]))
    return model


def _agreement(a, b, calib):
    ya = [np.concatenate([run(a, batch)[0] for batch in calib.batches])]
    yb = [np.concatenate([run(b, batch)[0] for batch in calib.batches])]
    return verify.decision_agreement([(0, 1)], ya, yb)


def test_decision_agreement_floor_limits_a_speed_target():
    ctx = _modelled(5.0)
    model = _softmax_model()
    calib = calibration(model, n=8, batch=1)
    free = cp(model, LowRankConfig(target_speedup=1.5, min_macs=0, min_agreement=0.0), calib,
              context=ctx)
    assert free.report.applied
    loose = _agreement(model, free.model, calib)
    assert loose < 1.0  # the aggressive choice changes some samples' decisions
    floor = (loose + 1) / 2
    bound = cp(model, LowRankConfig(target_speedup=1.5, min_macs=0, min_agreement=floor), calib,
               context=ctx)
    assert bound.report.metrics["decision_outputs"] == ["p"]
    assert bound.report.metrics["min_agreement_bound_active"] is True
    assert bound.report.metrics["target_met"] is False
    assert "target_not_met" in [w.code for w in bound.report.warnings]
    assert "min_agreement_bound_active" in bound.report.codes
    macs = cost.model_cost
    assert macs(bound.model).macs > macs(free.model).macs
    probes = bound.report.metrics["agreement_probes"]
    assert min(probes.values()) < floor  # the bound was measured, and it bit


def test_decision_agreement_floor_ignores_synthetic_calibration():
    ctx = _modelled(5.0)
    model = _softmax_model()
    result = cp(model, LowRankConfig(target_speedup=1.5, min_macs=0, min_agreement=1.0), None,
                context=ctx)
    assert "decision_outputs" not in result.report.metrics
    assert "min_agreement_bound_active" not in result.report.metrics


def test_a_target_met_only_within_noise_is_said():
    """The median of the rounds meets the target, a tenth of them did not: the report says so
    (and the timer measured the wide probes again before deciding)."""
    ctx = _modelled(1.6, spread=0.25)
    model = _two_layer_model()
    config = LowRankConfig(target_speedup=1.5, min_macs=0, min_agreement=0.0,
                           sensitivity=False)
    result = cp(model, config, calibration(model), context=ctx)
    metrics = result.report.metrics
    assert "target_met" not in metrics
    assert metrics["target_within_noise"] is True
    assert all(lo < 1.5 <= 1.6 < hi for lo, hi in metrics["probe_spread"].values())
    assert ctx.timer.spent.repeats >= ctx.timer.max_repeats
    assert "target_within_noise" in result.report.codes


def test_a_detector_speed_target_is_bound_by_its_confident_scores():
    """A sigmoid detector head (boxes + class scores in one output): --min-agreement binds
    on the F1 of the above-threshold score sets, and the search stops above the floor."""
    from builders import yolo_head

    from onnxcomp import fidelity

    ctx = _modelled(5.0)
    model = yolo_head(c_in=16, classes=6, size=12, channels=32)
    calib = calibration(model, n=8, batch=1)
    ref = fidelity.Reference.of(model, calib)
    free = cp(model, LowRankConfig(target_speedup=1.5, min_macs=0, min_agreement=0.0), calib,
              context=ctx)
    assert free.report.applied
    loose = ref.compare(free.model).score_agreement
    assert loose < 1.0  # the aggressive choice loses confident cells
    floor = (loose + 1) / 2
    bound = cp(model, LowRankConfig(target_speedup=1.5, min_macs=0, min_agreement=floor),
               calib, context=ctx)
    assert bound.report.metrics["score_outputs"] == ["y"]
    assert bound.report.metrics["min_agreement_bound_active"] is True
    assert "min_agreement_bound_active" in bound.report.codes
    assert ref.compare(bound.model).score_agreement >= floor


def test_a_bound_that_undoes_the_speed_pick_says_so():
    # every candidate measures 1.2x (3x is out of reach: the best is taken), then --max-error
    # allows no rewrite at all: the report must not leave "using it" as the last word
    ctx = _modelled(1.2)
    model = _two_layer_model()
    result = cp(model, LowRankConfig(target_speedup=3.0, max_error=1e-6, min_macs=0),
                calibration(model), context=ctx)
    assert not result.report.applied
    notes = [str(n) for n in result.report.notes]
    assert any("using it" in n for n in notes)
    assert any(n.code == "bound_after_target" and n.endswith("nothing applied")
               for n in result.report.notes), notes
