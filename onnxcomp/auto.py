"""``--auto``: the fastest model within a fidelity budget, across the passes.

A user gives a speed target (``--target-speedup``), a fidelity budget (``--max-drop``: what
:func:`onnxcomp.fidelity.bound` may lose against the original on the calibration data), or
both. The lossless clean-up runs first in every plan; then a few plans are compiled, each a
pipeline of passes that stands on the engine's own searches:

- ``int8``: static int8, layers left in float until the budget holds (``quantize
  --max-drop``);
- ``factorize``: per layer the best of svd / cp / tucker / kernel sharing /
  depthwise-separable (passes/factorize.py), ranks allocated to the target within the budget
  (``--min-agreement`` for models whose outputs decide something, ``--max-error`` otherwise);
- ``factorize+int8``: the factorization aimed at the target divided by what int8 measured,
  within half the budget, then int8 within what is left;
- ``prune``: channel pruning to the target (kept only if it lands within the budget).

Every plan's output is then judged the same way: its fidelity against the original (as
deployed) and its speed, all plans timed interleaved in one measurement. The winner meets the
target within the budget with the least loss; when no plan meets the target, the fastest
within the budget; when none is within the budget, the clean-up alone. The result says which
bound decided and keeps every plan's figures.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import onnx

from onnxcomp import bench, fidelity, verify
from onnxcomp.calibration import Calibration
from onnxcomp.errors import ConfigError, OnnxcompError
from onnxcomp.passbase import PassConfig, RunContext
from onnxcomp.pipeline import PipelineResult, Step, run_pipeline

log = logging.getLogger(__name__)

CLEANUP = ("canonicalize", "fold_bn", "fold_affine")
# With only a target: the budget (what fidelity.bound may lose).
DEFAULT_MAX_DROP = 0.02
# A --max-error no model reaches: the bound is off.
OFF = 1e9
# Rounds of the final interleaved measurement of every plan against the original.
FINAL_RUNS = 60


@dataclasses.dataclass(frozen=True)
class AutoConfig:
    """What ``--auto`` aims at and where it measures."""

    target_speedup: float | None = None
    max_drop: float = DEFAULT_MAX_DROP
    provider: str = "cpu"
    threads: int = 1
    plans: tuple[str, ...] = ("int8", "factorize", "factorize+int8", "prune")
    latency_cache: str | None = None

    def __post_init__(self) -> None:
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise ConfigError(f"--target-speedup must be > 1, got {self.target_speedup}")
        if not (self.max_drop >= 0) or math.isnan(self.max_drop):
            raise ConfigError(f"--max-drop must be >= 0, got {self.max_drop}")
        unknown = [p for p in self.plans if p not in PLANS]
        if unknown or not self.plans:
            raise ConfigError(f"--auto plans must be some of {', '.join(PLANS)}, got "
                              f"{', '.join(unknown) or 'none'}")


@dataclasses.dataclass
class Plan:
    """One compiled plan: its steps, result and measured figures."""

    name: str
    steps: list[Step]
    result: PipelineResult | None = None
    error: str | None = None
    drop: float = math.inf
    metric: str = ""
    speedup: float = 0.0
    p10: float = 0.0
    p90: float = 0.0

    def within(self, budget: float) -> bool:
        """Within the fidelity budget (and compiled)."""
        return self.result is not None and self.drop <= budget

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {"plan": self.name, "passes": [s.name for s in self.steps],
                "error": self.error, "drop": _finite(self.drop), "drop_metric": self.metric,
                "speedup": round(self.speedup, 3), "speedup_p10": round(self.p10, 3),
                "speedup_p90": round(self.p90, 3)}


@dataclasses.dataclass
class AutoResult:
    """The chosen plan's pipeline result, every plan tried, and why the winner won."""

    result: PipelineResult
    steps: list[Step]
    chosen: str
    why: str
    plans: list[Plan]
    code: str  # "target_met", "fastest_within_budget", "budget_unmet"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {"chosen": self.chosen, "why": self.why, "outcome": self.code,
                "plans": [p.to_dict() for p in self.plans]}


PLANS = ("int8", "factorize", "factorize+int8", "prune")


def _finite(x: float) -> float | None:
    return round(x, 5) if math.isfinite(x) else None


def _configs(registry: dict[str, Any], config: AutoConfig) -> Callable[..., PassConfig]:
    common = {"provider": config.provider, "threads": config.threads,
              "latency_cache": config.latency_cache}

    def make(name: str, **options: Any) -> PassConfig:
        return registry[name].config_cls.from_options({**common, **options})
    return make


def run_auto(model: onnx.ModelProto, calib: Calibration, config: AutoConfig,
             registry: dict[str, Any] | None = None, context: RunContext | None = None,
             on_step: Callable[[str], None] | None = None) -> AutoResult:
    """Compile the plans (see the module docstring) and return the winner."""
    if registry is None:
        from onnxcomp.passes import REGISTRY

        registry = dict(REGISTRY)
    ctx = context or RunContext()
    make = _configs(registry, config)
    cleanup = [Step(n, make(n)) for n in CLEANUP]
    judged = bool(verify.calibrated_decisions(model, calib) or
                  verify.calibrated_scores(model, calib))
    budget, target = config.max_drop, config.target_speedup

    def structural(share: float, aim: float | None) -> PassConfig:
        # Outputs that decide something are bound by what they decide (without a target the
        # allocation would otherwise also stop at its default model error); the others by
        # their relative error.
        bound = {"min_agreement": max(0.0, 1.0 - share),
                 "max_error": None if aim is not None else OFF} if judged else \
            {"min_agreement": 0.0, "max_error": max(share, 1e-6)}
        return make("factorize", rank="auto", target_speedup=aim, **bound)

    plans: list[Plan] = []
    int8: Plan | None = None
    for name in config.plans:
        if name == "int8":
            steps = [*cleanup, Step("quantize", make("quantize", mode="static",
                                                      max_drop=budget))]
        elif name == "factorize":
            steps = [*cleanup, Step("factorize", structural(budget, target))]
        elif name == "factorize+int8":
            s8 = int8.speedup if int8 is not None and int8.within(budget) else 1.0
            aim = None if target is None else max(target / max(s8, 1.0), 1.05)
            steps = [*cleanup, Step("factorize", structural(budget / 2, aim)),
                     Step("quantize", make("quantize", mode="static", max_drop=budget / 2))]
        else:  # prune: only toward a target (it has no fidelity bound of its own)
            if target is None:
                continue
            steps = [*cleanup, Step("prune_channels", make("prune_channels",
                                                           target_speedup=target))]
        plan = Plan(name, steps)
        plans.append(plan)
        if on_step is not None:
            on_step(f"auto: plan {name}")
        try:
            plan.result = run_pipeline(model, steps, calib, registry, context=ctx)
        except OnnxcompError as exc:  # one plan failing leaves the others
            plan.error = str(exc)
            log.warning("auto: plan %s failed: %s", name, exc)
            continue
        plan.drop, plan.metric = fidelity.bound(plan.result.fidelity)
        if name == "int8":
            _measure(model, [plan], calib, config, ctx)
            int8 = plan
    # Clean-up alone: the floor every plan must beat.
    if on_step is not None:
        on_step("auto: clean-up alone")
    floor = Plan("cleanup", cleanup, run_pipeline(model, cleanup, calib, registry, context=ctx))
    assert floor.result is not None
    floor.drop, floor.metric = fidelity.bound(floor.result.fidelity)
    done = [p for p in plans if p.result is not None]
    _measure(model, [floor, *done], calib, config, ctx)
    return _choose(floor, plans, budget, target)


def _measure(model: onnx.ModelProto, plans: Sequence[Plan], calib: Calibration,
             config: AutoConfig, ctx: RunContext) -> None:
    """Every plan's speedup over the original, interleaved in one measurement."""
    feeds = {k: v[:1] for k, v in calib.batches[0].items()}
    cfg = bench.BenchConfig(provider=config.provider, threads=config.threads, warmup=5,
                            runs=FINAL_RUNS)
    models = [model, *(p.result.model for p in plans if p.result is not None)]
    res = ctx.timer.compare(models, cfg, feeds)
    for plan, s in zip([p for p in plans if p.result is not None], res.speedups, strict=True):
        plan.speedup, plan.p10, plan.p90 = s.median, s.p10, s.p90


def _choose(floor: Plan, plans: list[Plan], budget: float, target: float | None
            ) -> AutoResult:
    within = [p for p in plans if p.within(budget) and p.speedup > floor.speedup]
    everything = [floor, *plans]
    if target is not None:
        meets = [p for p in within if p.speedup >= target]
        if meets:
            best = min(meets, key=lambda p: (p.drop, -p.speedup))
            return _result(best, everything, "target_met",
                           f"meets {target:g}x ({best.speedup:.2f}x) within --max-drop "
                           f"{budget:g} ({best.metric} {best.drop:.4g}) with the least loss "
                           f"of the plans that meet it")
    if within:
        best = max(within, key=lambda p: p.speedup)
        short = f"no plan meets {target:g}x within the budget; " if target is not None else ""
        return _result(best, everything, "fastest_within_budget",
                       f"{short}the fastest within --max-drop {budget:g}: {best.speedup:.2f}x "
                       f"({best.metric} {best.drop:.4g})")
    return _result(floor, everything, "budget_unmet",
                   f"no plan is faster than the clean-up alone within --max-drop {budget:g}: "
                   f"the clean-up alone ({floor.speedup:.2f}x, lossless)")


def _result(best: Plan, plans: list[Plan], code: str, why: str) -> AutoResult:
    assert best.result is not None
    return AutoResult(best.result, best.steps, best.name, why, plans, code)
