"""--auto's combined plans: how the first step's aim moves when a plan falls short or loses
too much (the pipeline, judging and timing replaced by a model of them)."""
from __future__ import annotations

import types

import pytest

import onnxcomp.auto as auto

LIMIT = 1.6  # aims up to this stay within the budget; a plan runs at 0.9x its aim


class _Modelled(auto._Auto):
    def __init__(self, target: float) -> None:  # noqa: D107 - no state but the config
        self.calib = self.registry = self.ctx = None
        self.config = auto.AutoConfig(target_speedup=target, max_drop=0.1,
                                      plans=("factorize+int8",))
        self.aims: list[float] = []

    @property
    def cleanup(self):
        return []

    def first_step(self, name, share, aim):
        return ("first", aim)

    def make(self, *args, **kwargs):
        return None

    def compile(self, name, steps):
        aim = steps[-1][1]
        self.aims.append(aim)
        plan = auto.Plan(name, list(steps))
        plan.result = types.SimpleNamespace(model=aim, steps=())
        plan.drop = 0.0 if aim <= LIMIT else 1.0
        return plan

    def fit_reference(self):
        return types.SimpleNamespace(compare=lambda model: model)

    def judge(self, plan, out):
        plan.drop = 0.0 if out <= LIMIT else 1.0
        plan.aim = out

    def measure(self, plans, around=None):
        for plan in plans:
            plan.speedup = 0.9 * plan.aim


def _patch(monkeypatch):
    monkeypatch.setattr(auto, "run_pipeline",
                        lambda model, steps, *a, **k: types.SimpleNamespace(model=model,
                                                                            steps=()))
    monkeypatch.setattr(auto, "fidelity", types.SimpleNamespace(
        bound=lambda f: (0.0 if f <= LIMIT else 1.0, "x")))
    monkeypatch.setattr(auto, "Step", lambda *a, **k: ("quantize", None))
    monkeypatch.setattr(auto, "dataclasses", types.SimpleNamespace(
        replace=lambda obj, **k: obj))


def test_after_an_aim_that_loses_too_much_the_aims_stay_under_it(monkeypatch):
    _patch(monkeypatch)
    planner = _Modelled(target=2.0)
    plan = planner.combined("factorize+int8", None)
    first, second, *rest = planner.aims
    assert first > LIMIT  # 2 x 1.03: over the budget
    assert second == (1 + first) / 2  # halfway down, kept
    assert rest and all(second < a < first for a in rest)  # bisected, never above
    assert plan.drop == 0.0 and plan.aim == max(a for a in planner.aims if a <= LIMIT)


def test_a_plan_short_of_the_target_aims_higher(monkeypatch):
    _patch(monkeypatch)
    monkeypatch.setattr(auto.Plan, "within", lambda self, budget: True)
    planner = _Modelled(target=1.5)
    plan = planner.combined("factorize+int8", None)
    # 1.545 runs at 1.39x: the next aim scales by the shortfall and the noise
    assert planner.aims[:2] == pytest.approx([1.5 * 1.03, 1.5 * 1.03 / 0.9])
    assert plan.speedup >= 1.5


def test_a_plan_measured_just_at_the_target_aims_past_it_by_the_noise(monkeypatch):
    _patch(monkeypatch)
    monkeypatch.setattr(auto.Plan, "within", lambda self, budget: True)
    planner = _Modelled(target=1.5)
    planner.measure = lambda plans, around=None: [  # type: ignore[method-assign]
        setattr(p, "speedup", 0.99 * p.aim) for p in plans]
    plan = planner.combined("factorize+int8", None)
    # 1.545 runs at 1.53x: it meets 1.5x, but by less than the 3 % a fresh timing moves
    assert len(planner.aims) == 2 and planner.aims[1] > planner.aims[0]
    assert plan.speedup >= 1.5 * 1.03


class _Timer:
    """Speedups by model: what a fresh interleaved measurement gives."""

    def __init__(self, speeds: dict) -> None:
        self.speeds = speeds
        self.calls: list[list] = []

    def compare(self, models, cfg, feeds, around=None):
        self.calls.append(list(models))
        return types.SimpleNamespace(speedups=[
            types.SimpleNamespace(median=self.speeds[m], p10=0.9 * self.speeds[m],
                                  p90=1.05 * self.speeds[m]) for m in models[1:]])


def _chosen(code: str) -> auto.AutoResult:
    won = types.SimpleNamespace(model="won")
    return auto.AutoResult(won, [], "factorize+int8", "meets 3x (3.05x)", [], code)


def _confirm(chosen, again, speeds, target=3.0):
    calib = types.SimpleNamespace(batches=[{"x": [[0.0]]}], num_samples=64)
    timer = _Timer(speeds)
    auto._confirm("original", chosen, again, calib,
                  auto.AutoConfig(target_speedup=target, max_drop=0.02),
                  types.SimpleNamespace(timer=timer))
    return timer


def test_the_outcome_rests_on_a_fresh_measurement_of_the_model_handed_back():
    # auto's winner measured 3.05x among several plans; timed again it is 2.5x: the
    # outcome says so instead of target_met
    chosen = _chosen("target_met")
    timer = _confirm(chosen, None, {"won": 2.5})
    assert timer.calls == [["original", "won"]]
    assert chosen.code == "fastest_within_budget"
    assert chosen.speedup == pytest.approx(2.5)
    assert "timed again after the choice: 2.50x" in chosen.why and "short of 3x" in chosen.why
    # p90 reaching the target: within noise; a median at the target: met
    chosen = _chosen("target_met")
    _confirm(chosen, None, {"won": 2.9})
    assert chosen.code == "target_within_noise"
    chosen = _chosen("target_within_noise")
    _confirm(chosen, None, {"won": 3.1})
    assert chosen.code == "target_met"


def test_the_winner_compiled_again_is_handed_back_only_when_as_fast():
    again = types.SimpleNamespace(model="again")
    chosen = _chosen("target_met")
    timer = _confirm(chosen, again, {"won": 3.2, "again": 2.6})
    assert timer.calls == [["original", "won", "again"]]
    assert chosen.result.model == "won"  # the recompile landed slower: not handed back
    assert "measured 2.60x against 3.20x" in chosen.why
    assert chosen.speedup == pytest.approx(3.2) and chosen.code == "target_met"
    chosen = _chosen("target_met")
    _confirm(chosen, again, {"won": 3.2, "again": 3.15})  # within the noise: handed back
    assert chosen.result.model == "again" and chosen.fit_samples == 64
    assert chosen.speedup == pytest.approx(3.15)


def _plan(name, speedup, p90, drop):
    plan = auto.Plan(name, [])
    plan.result = types.SimpleNamespace(model=name)
    plan.speedup, plan.p10, plan.p90 = speedup, 0.9 * speedup, p90
    plan.drop = plan.rel_l2 = drop
    plan.metric = "decisions"
    return plan


def test_of_plans_only_within_noise_of_the_target_the_fastest_wins():
    floor = _plan("cleanup", 1.0, 1.05, 0.0)
    slow = _plan("factorize+int8", 2.84, 3.1, 0.0)
    fast = _plan("prune+int8", 2.98, 3.3, 0.0156)
    chosen = auto._choose(floor, [slow, fast], 0.02, 3.0)
    assert chosen.chosen == "prune+int8" and chosen.code == "target_within_noise"
    # plans that meet the target (by the noise): the least loss wins, not the fastest
    met_slow = _plan("factorize+int8", 3.1, 3.3, 0.0)
    met_fast = _plan("prune+int8", 3.2, 3.5, 0.0156)
    chosen = auto._choose(floor, [met_slow, met_fast], 0.02, 3.0)
    assert chosen.chosen == "factorize+int8" and chosen.code == "target_met"


def test_of_plans_that_meet_the_target_at_equal_loss_the_surer_wins():
    # Fashion-MNIST 3x, one run: factorize+int8 3.05x (p10 2.96) and prune+int8 3.10x (p10
    # 3.03) lost the same sample; the closer outputs picked the first, re-timed at 3.01x
    floor = _plan("cleanup", 1.0, 1.05, 0.0)
    edge = _plan("factorize+int8", 3.10, 3.2, 0.0156)
    edge.p10, edge.rel_l2 = 2.96, 0.03
    sure = _plan("prune+int8", 3.12, 3.27, 0.0156)
    sure.p10, sure.rel_l2 = 3.03, 0.07
    assert auto._choose(floor, [edge, sure], 0.02, 3.0).chosen == "prune+int8"
    # a smaller loss still comes first
    edge.drop = 0.0
    assert auto._choose(floor, [edge, sure], 0.02, 3.0).chosen == "factorize+int8"


def test_a_plan_past_the_target_by_the_noise_beats_one_just_at_it():
    # PP-OCRv4 det 1.6x, one run: factorize 1.61x (p10 1.47) won on the least loss and
    # re-timed 1.58x; int8 measured 1.70x (p10 1.62) within the budget
    floor = _plan("cleanup", 1.3, 1.35, 0.0)
    just = _plan("factorize", 1.61, 1.70, 0.0011)
    past = _plan("int8", 1.70, 1.77, 0.0064)
    chosen = auto._choose(floor, [just, past], 0.03, 1.6)
    assert chosen.chosen == "int8" and "past it by the noise" in chosen.why
    # with none past it, the least loss of those at it
    past.speedup = 1.62
    chosen = auto._choose(floor, [just, past], 0.03, 1.6)
    assert chosen.chosen == "factorize" and chosen.code == "target_met"
