from __future__ import annotations

import numpy as np
import pytest
from builders import calibration, conv_model, run

from onnxcomp import allocate, linear, moments, refit
from onnxcomp.decompose import LowRankConfig
from onnxcomp.graph import Graph
from onnxcomp.moments import Moments
from onnxcomp.passbase import Report


def _layer(model, calib):
    shapes = linear.static_shapes(model, calib)
    layers = linear.find_layers(Graph(model), shapes, ("Conv",), Report("t"))
    return layers[0]


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [1, 0, 0, 1]},
    {"dilations": [2, 1], "pads": [2, 1, 2, 1]}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
])
def test_im2col_rows_reproduce_the_conv(attrs):
    rng = np.random.default_rng(0)
    model = conv_model(rng.standard_normal([6, 4, 3, 3]).astype(np.float32), size=9, **attrs)
    calib = calibration(model, n=1, batch=1)
    layer = _layer(model, calib)
    x = calib.batches[0]["x"][0]
    y = run(model, calib.batches[0])[0][0]
    pos = np.arange(layer.rows_per_sample)
    rows = moments.im2col_rows(x, layer, pos)
    got = rows @ layer.matrix.T + layer.bias_vector
    np.testing.assert_allclose(got, moments.output_rows(y, layer, pos), rtol=1e-4, atol=1e-4)


def test_moment_errors_match_direct_computation():
    rng = np.random.default_rng(1)
    model = conv_model(rng.standard_normal([8, 4, 3, 3]).astype(np.float32), pads=[1] * 4)
    calib = calibration(model)
    config = LowRankConfig(rank=3, min_macs=0, latency_check=False)
    layer = _layer(model, calib)
    plan = linear.Plan("t", (3,), [], {}, (8, 3, 1, 1),
                          prefix=rng.standard_normal([3, 36]), last=rng.standard_normal([8, 3]),
                          weight_error=0.0, macs=0, params=0)
    (m,), (targets,) = (lambda r: ([r[0][0]], [r[1][0]]))(
        moments.collect_original(model, [layer], calib, config.max_rows, config.seed))
    xx, _, yy = m.normalized()
    ab = refit.refit_solution(layer, plan, xx, None, 0.0)
    # Direct: features z = P x on every row, least squares against y.
    xs, ys = [], []
    for batch in calib.batches:
        for s in range(batch["x"].shape[0]):
            pos = np.arange(layer.rows_per_sample)
            xs.append(moments.im2col_rows(batch["x"][s], layer, pos))
            ys.append(xs[-1] @ layer.matrix.T + layer.bias_vector)
    x, y = np.vstack(xs), np.vstack(ys)
    z = np.hstack([x @ plan.prefix.T, np.ones([len(x), 1])])
    sol = np.linalg.lstsq(z, y, rcond=None)[0].T
    np.testing.assert_allclose(ab, sol, rtol=1e-6, atol=1e-8)
    direct = np.linalg.norm(z @ sol.T - y) / np.linalg.norm(y)
    assert refit.ChainFit(layer, xx).error(plan, ab) == pytest.approx(direct, rel=1e-6)
    # The asymmetric form with x_c = x reduces to the same answer.
    xt = np.hstack([x, np.ones([len(x), 1])])
    asym = Moments(xt.T @ xt, xt.T @ y, float(np.sum(y * y)), len(x))
    xx2, xy2, yy2 = asym.normalized()
    ab2 = refit.refit_solution(layer, plan, xx2, xy2, 0.0)
    np.testing.assert_allclose(ab2, sol, rtol=1e-6, atol=1e-8)
    assert refit.ChainFit(layer, xx2, xy2, yy2).error(plan, ab2) == pytest.approx(direct,
                                                                       rel=1e-6)
    assert len(targets) == calib.num_samples


def test_rank_ladder():
    assert linear.rank_ladder(64, 8, 4) == [8, 16, 32, 64]
    assert linear.rank_ladder(5, 8) == [5]
    assert all(r % 8 == 0 for r in linear.rank_ladder(500, 8))


def testlagrangian_path_moves_one_layer_at_a_time_along_each_frontier():
    from onnxcomp.allocate import LayerChoice, Option, lagrangian_path

    def opt(saved: float, error: float) -> Option:
        return Option(plan=None, error=error, raw_error=error, base_ms=1.0, ms=1.0 - saved)

    # Layer 0: the middle option is dominated (off the convex frontier), never picked.
    a = [opt(0.2, 0.1), opt(0.3, 0.5), opt(0.6, 0.4)]
    b = [opt(0.2, 0.1), opt(0.5, 0.3)]  # same shape as layer 0's first option: a tie
    choices = [LayerChoice(None, 0, a), LayerChoice(None, 1, b)]  # type: ignore[arg-type]
    path = lagrangian_path(choices, LowRankConfig())
    assert path[0] == {}
    for before, after in zip(path[:-1], path[1:], strict=True):
        changed = [i for i in after if before.get(i) is not after[i]]
        assert len(changed) == 1  # one layer's move per step, even on a tie
    assert all(a[1] not in p.values() for p in path)
    saved = [sum(o.saved_ms for o in p.values()) for p in path]
    assert saved == sorted(saved) and path[-1] == {0: a[2], 1: b[1]}
    assert len(path) == 5


def test_refine_step_finds_a_milder_option_off_the_frontier():
    from onnxcomp.allocate import LayerChoice, Option, _refine_step, lagrangian_path

    def opt(saved: float, error: float) -> Option:
        return Option(plan=None, error=error, raw_error=error, base_ms=1.0, ms=1.0 - saved)

    options = [opt(0.2, 0.1), opt(0.4, 0.9), opt(0.6, 0.9), opt(0.8, 0.3)]
    usable = [LayerChoice(None, 0, options)]  # type: ignore[arg-type]
    config = LowRankConfig()
    picks = lagrangian_path(usable, config)
    assert [p[0] for p in picks[1:]] == [options[0], options[3]]  # 0.4 and 0.6: off the hull

    class Probes:  # whole-model speedup: 1 + the milliseconds saved
        calls = 0

        def speedup(self, pick):
            Probes.calls += 1
            return 1.0 + sum(o.saved_ms for o in pick.values())

    measured = {0: 1.0, 1: 1.2, 2: 1.8}
    best, rounds = _refine_step(picks, 1, 2, measured, 1.5, Probes(), config, usable, 0)
    assert picks[best][0] is options[2]  # 1.6x: the mildest that meets 1.5x
    assert rounds == Probes.calls and measured[best] >= 1.5
    assert measured[len(picks) - 1] == 1.8  # the old neighbour's measurement moved with it


def test_rewrites_saving_under_one_percent_of_the_model_are_left_alone():
    from types import SimpleNamespace

    from onnxcomp.passbase import SkipReason

    def opt(base_ms, ms):
        return allocate.Option(SimpleNamespace(macs=1), 0.1, 0.1, base_ms=base_ms, ms=ms)

    big = allocate.LayerChoice(SimpleNamespace(name="big", op="Conv"), 0,
                                [opt(1.0, 0.5), opt(1.0, 0.995)])
    tiny = allocate.LayerChoice(SimpleNamespace(name="tiny", op="Conv"), 1,
                                 [opt(0.1, 0.08), opt(0.1, 0.09)])
    report = Report("svd")
    kept = allocate._drop_unseen_savings([big, tiny], 10.0, report)  # 1 % of 10 ms: 0.1 ms
    assert [ch.layer.name for ch in kept] == ["big"]
    assert [o.ms for o in kept[0].options] == [0.5]  # 0.005 ms saved is dropped too
    assert report.skipped[0].node == "tiny"
    assert report.skipped[0].reason == SkipReason.TOO_SMALL
    assert "0.020 ms" in report.skipped[0].detail
