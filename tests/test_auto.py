"""--auto: plans compiled, judged the same way, the winner within the budget."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import calibration, make_model, tensor
from click.testing import CliRunner
from onnx import helper

from onnxcomp import cost, fidelity
from onnxcomp.auto import AutoConfig, run_auto
from onnxcomp.cli import main
from onnxcomp.errors import ConfigError
from onnxcomp.passbase import RunContext
from onnxcomp.timing import Modelled, Timer


def _classifier(seed=0):
    """conv-relu-conv-relu-flatten-fc (logits): a small classifier with redundant convs."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal([32, 8, 3, 3]).astype(np.float32)
    w2 = (np.einsum("or,rcij->ocij", rng.standard_normal([32, 8]), base[:8].reshape(
        8, 32 // 4, 3, 3).repeat(4, axis=1)) / 20).astype(np.float32)
    inits = {
        "W1": (rng.standard_normal([32, 3, 3, 3]) / 5).astype(np.float32),
        "W2": w2,
        "WF": (rng.standard_normal([32 * 8 * 8, 10]) / 40).astype(np.float32),
    }
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Conv", ["ra", "W2"], ["b"], name="c2", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["rb"], name="r2"),
             helper.make_node("Flatten", ["rb"], ["f"], name="fl"),
             helper.make_node("MatMul", ["f", "WF"], ["y"], name="fc")]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 10])], inits)


def _modelled_context():
    """Latency = MACs, halved for a model with int8 (QDQ) layers."""
    def latency(m):
        macs = cost.model_cost(m).macs
        quantized = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
        return macs * 1e-6 * (0.5 if quantized else 1.0)
    return RunContext(timer=Timer(Modelled(latency)))


def test_the_winner_meets_the_target_within_the_budget():
    model = _classifier()
    calib = calibration(model, n=8, batch=4)
    chosen = run_auto(model, calib, AutoConfig(target_speedup=1.5, max_drop=0.1),
                      context=_modelled_context())
    names = [p.name for p in chosen.plans]
    assert names == ["cleanup", "int8", "factorize", "factorize+int8", "prune", "prune+int8",
                     "layers"]
    assert chosen.code == "target_met", chosen.why
    winner = next(p for p in chosen.plans if p.name == chosen.chosen)
    assert winner.speedup >= 1.5 and winner.drop <= 0.1
    # the winner's figure is the pipeline's own final fidelity against the original
    assert fidelity.bound(chosen.result.fidelity)[0] == pytest.approx(winner.drop)
    # among the plans that meet the target within the budget, none loses less
    rivals = [p for p in chosen.plans if p.result is not None and p.drop <= 0.1
              and p.speedup >= 1.5]
    assert winner.drop == min(p.drop for p in rivals)
    assert [s.name for s in chosen.steps][:3] == ["canonicalize", "fold_bn", "fold_affine"]


def test_a_residual_branch_that_adds_nothing_is_removed_by_the_layers_plan():
    from test_prune_layers import _residual_net

    model = _residual_net(zero_branch=True)
    calib = calibration(model, n=8, batch=4)
    chosen = run_auto(model, calib, AutoConfig(target_speedup=1.5, max_drop=0.01,
                                               plans=("layers", "prune")),
                      context=_modelled_context())
    assert chosen.chosen == "layers" and chosen.code == "target_met", chosen.why
    assert "prune_layers" in [s.name for s in chosen.steps]
    assert fidelity.bound(chosen.result.fidelity)[0] < 1e-4


def test_a_budget_nothing_fits_keeps_the_cleanup():
    model = _classifier()
    calib = calibration(model, n=8, batch=4)
    chosen = run_auto(model, calib, AutoConfig(max_drop=0.0, plans=("factorize",)),
                      context=_modelled_context())
    assert chosen.code in ("budget_unmet", "fastest_within_budget")
    if chosen.code == "budget_unmet":
        assert chosen.chosen == "cleanup"
        assert fidelity.bound(chosen.result.fidelity)[0] == 0.0


def test_the_int8_plan_quantizes_every_layer_when_that_is_within_the_budget():
    import math

    model = _classifier()
    calib = calibration(model, n=8, batch=4)
    chosen = run_auto(model, calib, AutoConfig(max_drop=0.5, plans=("int8",)),
                      context=_modelled_context())
    assert chosen.chosen == "int8", chosen.why
    (step,) = [s for s in chosen.steps if s.name == "quantize"]
    assert math.isinf(step.config.max_drop)


@pytest.mark.parametrize(("budget", "said", "needed"), [(0.05, True, 80), (0.03, True, 136),
                                                      (0.2, False, None)])
def test_a_budget_under_one_held_back_sample_is_said(budget, said, needed):
    model = _classifier()
    calib = calibration(model, n=8, batch=4)  # 8 samples (the model's batch is 1): all judged
    chosen = run_auto(model, calib, AutoConfig(max_drop=budget, plans=("int8",)),
                      context=_modelled_context())
    assert chosen.checked_on == 8
    assert ("one sample of the 8 the losses are measured on is 0.125" in chosen.why) == said
    if said:
        assert f"at least {needed} calibration samples" in chosen.why
        assert 1 / (needed // 4) <= budget  # that many do hold back enough


@pytest.mark.parametrize("kwargs", [{"target_speedup": 1.0}, {"max_drop": -0.1},
                                    {"plans": ("magic",)}, {"plans": ()}])
def test_auto_config_validation(kwargs):
    with pytest.raises(ConfigError):
        AutoConfig(**kwargs)


def test_cli_auto_end_to_end_and_replay(tmp_path):
    model = _classifier()
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal([16, 3, 8, 8]).astype("f4"))
    held = tmp_path / "h.npz"
    np.savez(held, x=np.random.default_rng(1).standard_normal([16, 3, 8, 8]).astype("f4"))
    out, rep, rec = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "r.toml"
    runner = CliRunner()
    result = runner.invoke(main, [str(a) for a in [
        "optimize", path, "-o", out, "--auto", "--max-drop", 0.2, "--calib", calib,
        "--heldout", held, "--report", rep, "--save-recipe", rec, "--no-bench"]],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "--auto" in result.output and "held-out" in result.output
    doc = json.loads(rep.read_text())
    assert {p["plan"] for p in doc["auto"]["plans"]} >= {"cleanup", "int8", "factorize"}
    assert doc["heldout"]["heldout"]["samples"] == 16
    onnx.checker.check_model(onnx.load(out))
    replay = runner.invoke(main, [str(a) for a in [
        "optimize", path, "-o", tmp_path / "again.onnx", "--recipe", rec, "--calib", calib,
        "--no-bench"]], catch_exceptions=False)
    assert replay.exit_code == 0, replay.output
    both = runner.invoke(main, [str(a) for a in [
        "optimize", path, "-o", tmp_path / "x.onnx", "--auto", "--pass", "cp"]])
    assert both.exit_code == 2 and "one of" in both.output


def test_plans_are_judged_on_samples_held_back_from_compiling():
    from onnxcomp.fidelity import split_check
    from onnxcomp.judge import Judge

    model = _classifier()
    calib = calibration(model, n=32, batch=1)  # 32 samples
    labels = np.arange(32) % 10
    fit, check, fit_judge, check_judge = split_check(calib, Judge(labels=labels))
    assert (fit.num_samples, check.num_samples) == (24, 8)
    assert check_judge.labels.tolist() == labels[3::4].tolist()
    x = np.concatenate([b["x"] for b in calib.batches])
    assert np.array_equal(np.concatenate([b["x"] for b in check.batches]), x[3::4])
    small = calibration(model, n=8, batch=1)
    assert split_check(small, Judge())[1] is None
    chosen = run_auto(model, calib, AutoConfig(max_drop=0.1, plans=("int8",)),
                      context=_modelled_context())
    assert chosen.checked_on == 8
    assert chosen.fit_samples == 32  # the winner compiled again on every sample


def _latency_macs(m):
    """Modelled latency (module level: a --jobs worker unpickles it): MACs, int8 halved."""
    quantized = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    return cost.model_cost(m).macs * 1e-6 * (0.5 if quantized else 1.0)


def _never_time(*args, **kwargs):
    raise AssertionError("timed although the latency cache has the measurement")


def test_jobs_2_compiles_the_plans_in_workers_and_chooses_the_same(tmp_path):
    from onnxcomp.executor import Processes

    model = _classifier()
    calib = calibration(model, n=8, batch=4)
    config = AutoConfig(target_speedup=1.5, max_drop=0.1)
    one = run_auto(model, calib, config, context=RunContext(timer=Timer(Modelled(_latency_macs))))
    two = run_auto(model, calib, config, context=RunContext(
        timer=Timer(Modelled(_latency_macs)), executor=Processes(2)))
    assert (one.chosen, one.code) == (two.chosen, two.code)
    assert [(p.name, p.drop, p.speedup) for p in one.plans] == [
        (p.name, p.drop, p.speedup) for p in two.plans]
    assert one.result.model.SerializeToString() == two.result.model.SerializeToString()


def test_a_latency_cache_makes_jobs_2_replay_the_serial_choice(tmp_path):
    """Real timing, serial, recorded; then 2 workers that may not time: the same choice."""
    from onnxcomp.executor import Processes

    model = _classifier()
    calib = calibration(model, n=8, batch=4)
    config = AutoConfig(target_speedup=1.3, max_drop=0.1,
                        latency_cache=str(tmp_path / "lat.json"))
    serial = run_auto(model, calib, config, context=RunContext(timer=Timer()))
    replay = run_auto(model, calib, config, context=RunContext(
        timer=Timer(_never_time), executor=Processes(2)))
    assert (serial.chosen, serial.code) == (replay.chosen, replay.code)
    assert [(p.name, p.speedup) for p in serial.plans] == [
        (p.name, p.speedup) for p in replay.plans]
    assert serial.result.model.SerializeToString() == replay.result.model.SerializeToString()


def test_a_budget_the_samples_judged_cannot_confirm_is_said():
    model = _classifier()
    calib = calibration(model, n=32, batch=1)  # every 4th (8) held back
    chosen = run_auto(model, calib, AutoConfig(max_drop=0.2, plans=("int8",)),
                      context=_modelled_context())
    assert chosen.chosen == "int8" and chosen.checked_on == 8, chosen.why
    # none of 8 changed still allows 1 - 0.05^(1/8) = 0.31; none of 14 would allow 0.19
    assert ("0 of the 8 samples judged changed: on new data the loss may be up to 0.31 (95% "
            "confidence), which does not confirm --max-drop 0.2 (56 calibration samples, none "
            "of the 14 judged changed, would)") in chosen.why
    chosen = run_auto(model, calib, AutoConfig(max_drop=0.4, plans=("int8",)),
                      context=_modelled_context())
    assert "samples judged changed" not in chosen.why


@pytest.mark.parametrize(("changed", "samples"), [(0, 16), (3, 23), (1, 64), (0, 59),
                                                  (300, 2500)])
def test_the_loss_bound_is_where_so_few_changes_become_unlikely(changed, samples):
    from scipy.stats import beta, binom  # tensorly's dependency: an independent reference

    upper = fidelity.loss_upper_bound(changed, samples)
    if changed == 0:
        assert upper == pytest.approx(1 - 0.05 ** (1 / samples))
    assert upper == pytest.approx(beta.ppf(0.95, changed + 1, samples - changed), rel=1e-6)
    assert binom.cdf(changed, samples, upper) == pytest.approx(0.05, abs=1e-6)
    assert binom.cdf(changed, samples, 0.9 * upper) > 0.05  # a lower rate: likely enough
    assert fidelity.samples_to_confirm(0.05) == 59
    assert fidelity.loss_upper_bound(0, 59) <= 0.05 < fidelity.loss_upper_bound(0, 58)
