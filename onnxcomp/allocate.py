"""Choosing per-layer rank options for a whole model: targets, bounds, measured outcomes.

Each layer comes with options (a plan, its isolated error, its measured saving). The
allocation walks the Lagrangian path of least weighted error per saving
(:func:`onnxcomp.search.lagrangian_path`), then reaches a measured whole-model speed target
or a MAC target, and stays within the fidelity bounds (``--max-error``, ``--min-agreement``)
measured on candidate models (:class:`Probes`: built with the symmetric refit, cached per
choice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxcomp import benchmark as bench
from onnxcomp import cost, fidelity, search, verify
from onnxcomp.calibration import Calibration
from onnxcomp.judge import Judge
from onnxcomp.latency_cache import structure_hash
from onnxcomp.linear import Layer, Plan, batch1_shapes
from onnxcomp.moments import Moments
from onnxcomp.passbase import Report, SkipReason
from onnxcomp.sensitivity import layer_gains
from onnxcomp.timing import Timer

if TYPE_CHECKING:
    from onnxcomp.decompose import LowRankConfig

# ``--rank auto`` with no target and no bound: the fastest ranks within this model error.
DEFAULT_MAX_ERROR = 0.03
# Floor of a layer's sensitivity gain (errors far beyond the probe's stop washing out).
MIN_GAIN = 0.3
# --rank auto leaves alone layers whose rewrite saves less than this share of the model's
# measured latency (see _drop_unseen_savings).
MIN_MODEL_SAVING = 0.01
# Closed-loop rounds that re-measure the whole model to reach ``target_speedup``.
TARGET_ROUNDS = 4
# Extra whole-model measurements spent looking for a milder pick that still meets the target.
MILDER_ROUNDS = 5
# A whole-model probe measurement stops after this long (once bench.MIN_ROUNDS rounds ran).
PROBE_SECONDS = 8.0
# Relative speed difference treated as measurement noise when comparing whole models.
NOISE = 0.03


@dataclasses.dataclass
class Option:
    """One rank option of one layer, with its measured costs and isolated errors."""

    plan: Plan
    error: float  # isolated relative error after symmetric refit (or raw without refit)
    raw_error: float
    base_ms: float
    ms: float
    edges_ms: float = 0.0  # what the one-layer models pay at their edges (both alike)

    @property
    def saved_ms(self) -> float:
        """Latency saved on this layer (ms)."""
        return self.base_ms - self.ms


@dataclasses.dataclass
class LayerChoice:
    """Per-layer options for the allocation."""

    layer: Layer
    index: int
    options: list[Option]
    gain: float = 1.0  # model output error per unit of this layer's isolated error


class Probes:
    """Candidate models built during the allocation, with measured speedups and errors.

    Probes use the symmetric refit (closed form, no activation capture); results are cached
    per choice of options.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], moments: list[Moments],
                 calib: Calibration, config: LowRankConfig,
                 build: Callable[[dict[int, Option]], onnx.ModelProto],
                 timer: Timer | None = None, judge: Judge | None = None) -> None:
        self.model, self.layers, self.moments = model, layers, moments
        self._build_model = build  # a candidate model for a choice (symmetric refit)
        self.timer = timer or Timer()
        self.judge = judge or Judge()
        self._structure = structure_hash(model) if self.timer.cache is not None else ""
        self.calib = calib
        self.config = config
        self.feeds = {k: v[:1] for k, v in calib.batches[0].items()}
        self._built: dict[tuple[Any, ...], onnx.ModelProto] = {}
        self._speedup: dict[tuple[Any, ...], float] = {}
        # p10-p90 of the per-round ratios behind each measured median speedup
        self.spread: dict[float, tuple[float, float]] = {}
        self._fidelity: dict[tuple[Any, ...], tuple[float, float | None]] = {}
        self._ref: fidelity.Reference | None = None
        self._model_ms: float | None = None
        self.decisions = verify.calibrated_decisions(model, calib)
        self.scores = verify.calibrated_scores(model, calib)

    def judged_by(self) -> str:
        """Which outputs the agreement reads, for the report."""
        names = [self.model.graph.output[i].name for i, _ in self.decisions]
        names += [self.model.graph.output[s.index].name for s in self.scores]
        return ", ".join(dict.fromkeys(names)) or "none"

    def model_ms(self) -> float:
        """The model's measured latency (ms), once per compile (and per latency cache)."""
        if self._model_ms is None:
            cfg = bench.BenchConfig(provider=self.config.provider, threads=self.config.threads,
                                    warmup=5, runs=self.config.bench_runs)
            self._model_ms = self.cached("model_ms", lambda: self.timer.latency_ms(
                self.model, cfg, self.feeds))
        return self._model_ms

    @staticmethod
    def key(chosen: dict[int, Option]) -> tuple[Any, ...]:
        """What identifies a choice: (layer, method, ranks) per chosen layer."""
        return tuple(sorted((i, o.plan.method, o.plan.ranks) for i, o in chosen.items()))

    def build(self, chosen: dict[int, Option]) -> onnx.ModelProto:
        """The candidate model of ``chosen`` (built once)."""
        k = self.key(chosen)
        if k not in self._built:
            self._built[k] = self._build_model(chosen)
        return self._built[k]

    def speedup_of(self, candidate: onnx.ModelProto) -> float:
        """Measured whole-model speedup of ``candidate`` over the model (latency cache aware)."""
        # Bounded in time: a 15-GMAC model takes a third of a second a run, and 30
        # interleaved rounds of it per probe were most of a compile. The timer repeats a
        # measurement whose spread is wide.
        cfg = bench.BenchConfig(provider=self.config.provider, threads=self.config.threads,
                                warmup=2, runs=max(self.config.bench_runs, 30),
                                max_seconds=PROBE_SECONDS)

        def measure() -> list[float]:
            res = self.timer.compare([self.model, candidate], cfg, self.feeds,
                                     around=self.config.target_speedup or 1.0)
            s = res.speedups[0]
            return [s.median, s.p10, s.p90]

        key = f"speedup {self._structure} {structure_hash(candidate)}" if self._structure else ""
        if key:
            median, p10, p90 = (self.timer.remember(key, measure, in_process=False) + [0, 0])[:3]
        else:
            median, p10, p90 = measure()
        if p90 > 0:
            self.spread[median] = (p10, p90)
        return median

    def cached(self, what: str, measure: Callable[[], float]) -> float:
        """``measure()``, or its value recorded for this model in the latency cache."""
        if not self._structure:
            return measure()
        return self.timer.remember(f"{what} {self._structure}", lambda: [measure()],
                                   in_process=False)[0]

    def measured(self, chosen: dict[int, Option]) -> float | None:
        """The whole-model speedup already measured for ``chosen``, if any."""
        return self._speedup.get(self.key(chosen))

    def speedup(self, chosen: dict[int, Option]) -> float:
        """Measured whole-model speedup of ``chosen`` (once per choice)."""
        k = self.key(chosen)
        if k not in self._speedup:
            self._speedup[k] = 1.0 if not chosen else self.speedup_of(self.build(chosen))
        return self._speedup[k]

    def fidelity(self, chosen: dict[int, Option]) -> tuple[float, float | None]:
        """(relative output error, agreement or None) of ``chosen``.

        Both on the calibration data; the agreement (:func:`onnxcomp.fidelity.agreement`:
        argmax decisions and above-threshold scores kept) is None when the outputs decide
        nothing.
        """
        k = self.key(chosen)
        if k not in self._fidelity:
            if not chosen:
                self._fidelity[k] = (0.0, 1.0 if self.decisions or self.scores else None)
            else:
                if self._ref is None:
                    self._ref = fidelity.Reference.of(self.model, self.calib, self.judge)
                fid = self._ref.compare(self.build(chosen))
                self._fidelity[k] = (fid.rel_l2, fidelity.agreement(fid))
        return self._fidelity[k]


def allocate(
    choices: list[LayerChoice], probes: Probes, config: LowRankConfig, report: Report,
) -> dict[int, Option]:
    """Pick at most one option per layer; record skips for layers left alone."""
    usable: list[LayerChoice] = []
    for ch in choices:
        layer = ch.layer
        if not ch.options:
            report.skip(layer.name, layer.op, SkipReason.DEGENERATE,
                        "no usable factorization at the requested rank")
            continue
        wins = [o for o in ch.options if o.plan.macs < layer.macs]
        if not wins:
            report.skip(layer.name, layer.op, SkipReason.NO_MAC_WIN,
                        f"rank {ch.options[0].plan.ranks} costs {ch.options[0].plan.macs} MACs "
                        f">= {layer.macs}")
            continue
        if config.latency_check:
            fast = [o for o in wins if o.base_ms >= config.min_layer_speedup * o.ms]
            if not fast:
                best = max(wins, key=lambda o: o.base_ms / max(o.ms, 1e-9))
                report.skip(layer.name, layer.op, SkipReason.NO_LATENCY_WIN,
                            f"best measured {best.base_ms / max(best.ms, 1e-9):.2f}x at rank "
                            f"{best.plan.ranks} ({best.base_ms:.3f} -> {best.ms:.3f} ms)")
                continue
            # --rank auto: only options whose MAC cut shows as time (a fixed rank is the
            # user's choice).
            honest = [o for o in fast if not config.auto
                      or realized(o, layer) >= config.min_realized]
            if not honest:
                best = max(fast, key=lambda o: realized(o, layer))
                report.skip(layer.name, layer.op, SkipReason.NO_LATENCY_WIN,
                            f"the chains realize at most {realized(best, layer):.2f} of their "
                            f"MAC cut (< --min-realized {config.min_realized}; rank "
                            f"{best.plan.ranks}, {best.base_ms:.3f} -> {best.ms:.3f} ms)")
                continue
            wins = honest
        usable.append(LayerChoice(layer, ch.index, wins))
    if not config.auto:
        return {ch.index: ch.options[0] for ch in usable}
    if config.latency_check and usable:
        usable = _drop_unseen_savings(usable, probes.model_ms(), report)
    if config.sensitivity and not probes.calib.synthetic and len(usable) > 1:
        gains = layer_gains(probes, usable)
        for ch in usable:
            ch.gain = max(gains.get(ch.index, 1.0), MIN_GAIN)
        report.metrics["sensitivity"] = {ch.layer.name: round(gains.get(ch.index, 1.0), 3)
                                         for ch in usable}
    chosen = _auto_allocate(usable, probes, config, report)
    for ch in usable:
        if ch.index not in chosen:
            mild = min(ch.options, key=lambda o: o.error)
            report.skip(ch.layer.name, ch.layer.op, SkipReason.NOT_SELECTED,
                        f"least-error option: rank {mild.plan.ranks}, isolated error "
                        f"{mild.error:.3g}")
    return chosen


def realized(opt: Option, layer: Layer, in_context: bool = True) -> float:
    """Measured layer speedup over its MAC reduction (1.0: every MAC cut shows as time).

    In context (the default), the edge cost both one-layer models pay (layout conversions,
    per-run overhead; none of it exists between layers of a network) is taken off both
    timings, at most half of either.
    """
    if opt.ms <= 0 or opt.plan.macs <= 0 or not np.isfinite(opt.ms):
        return 1.0
    edges = min(opt.edges_ms, 0.5 * opt.ms, 0.5 * opt.base_ms) if in_context else 0.0
    return ((opt.base_ms - edges) / (opt.ms - edges)) / (layer.macs / opt.plan.macs)


def _savings(opt: Option, config: LowRankConfig, layer: Layer) -> float:
    """What an option saves: measured ms, or MACs for a MAC target or without timings."""
    if not config.latency_check or (config.target_macs is not None
                                    and config.target_speedup is None):
        return float(layer.macs - opt.plan.macs)
    return opt.saved_ms


def _hull_steps(ch: LayerChoice, config: LowRankConfig) -> list[tuple[float, Option]]:
    """One layer's moves along its lower convex hull of (saving, weighted error^2)."""
    return search.hull_steps([(_savings(o, config, ch.layer), (ch.gain * o.error) ** 2, o)
                              for o in ch.options])


def lagrangian_path(usable: list[LayerChoice], config: LowRankConfig
                    ) -> list[dict[int, Option]]:
    """Allocations from nothing to the most aggressive, one layer's move at a time.

    See :func:`onnxcomp.search.lagrangian_path` (measured on PP-OCRv4 rec, a sweep of the
    multiplier instead moved four 240-channel 1x1 convs at once, 1.13x to 1.35x in one step).
    """
    return search.lagrangian_path([(ch.index, _hull_steps(ch, config)) for ch in usable])


def _auto_allocate(
    usable: list[LayerChoice], probes: Probes, config: LowRankConfig, report: Report,
) -> dict[int, Option]:
    """Choose per-layer options: predicted savings first, then whole-model measurements.

    Candidates are the Lagrangian allocations, one layer's move apart (least isolated error
    for a given saving). ``target_speedup``: the least aggressive pick predicted to reach it, then
    re-measured as a whole model and moved up while the measured speedup falls short (per-layer
    micro-benchmarks over- or under-predict what a whole model realizes). ``max_error`` (or
    :data:`DEFAULT_MAX_ERROR` when no target is given): the most aggressive pick, no more
    aggressive than that, whose measured output error stays within the bound.
    """
    if not usable:
        if config.target_speedup is not None or config.target_macs is not None:
            report.target_missed("target cannot be met: no layer can be rewritten "
                                 "(see the skip reasons)")
        return {}
    model, calib = probes.model, probes.calib
    layer_of = {c.index: c.layer for c in usable}
    picks = lagrangian_path(usable, config)
    report.metrics["allocations"] = len(picks)

    def saving(p: dict[int, Option]) -> float:
        return sum(_savings(o, config, layer_of[i]) for i, o in p.items())

    savings = [saving(p) for p in picks]
    index = len(picks) - 1
    max_error = config.max_error
    target_macs = config.target_macs
    if config.target_speedup is not None and not config.latency_check:
        target_macs = 1 / config.target_speedup
        report.note("speed_target_from_macs",
                    f"no latency measurements (--no-latency-check): the speed target is read "
                    f"as keeping {target_macs:.1%} of the MACs")
    if config.target_speedup is not None and config.latency_check:
        base = probes.model_ms()
        report.metrics["model_ms"] = round(base, 4)
        index = _reach_speedup(picks, savings, base, probes, config, report, usable)
    elif target_macs is not None:
        total_macs = cost.model_cost(model, batch1_shapes(model, calib)).macs
        needed = total_macs * (1 - target_macs)
        feasible = [i for i, v in enumerate(savings) if v >= needed]
        if feasible:
            index = feasible[0]
        else:
            report.target_missed(
                f"target cannot be met: at most {savings[-1] / total_macs:.1%} of the MACs can "
                f"be saved, {1 - target_macs:.1%} asked; using the most aggressive ranks")
    elif max_error is None:
        max_error = DEFAULT_MAX_ERROR
        report.note("default_max_error",
                    f"no target given: the fastest ranks within a model output error of "
                    f"{DEFAULT_MAX_ERROR} (the default --max-error)")
    min_agreement = config.min_agreement if config.min_agreement > 0 else None
    if probes.decisions:
        report.metrics["decision_outputs"] = [model.graph.output[i].name
                                              for i, _ in probes.decisions]
    if probes.scores:
        report.metrics["score_outputs"] = [model.graph.output[s.index].name
                                           for s in probes.scores]
    if not probes.decisions and not probes.scores:
        min_agreement = None
    if max_error is not None or min_agreement is not None:
        target_index = index
        index = _bound_fidelity(picks, index, max_error, min_agreement, probes, report,
                                explicit=config.max_error is not None)
        has_target = config.target_speedup is not None or target_macs is not None
        if has_target and index < target_index:
            bounds = [f"{b} {v:g}" for b, v in (("--max-error", max_error),
                                                ("--min-agreement", min_agreement))
                      if v is not None]
            text = (f"target not met: {' and '.join(bounds)} "
                    f"allow{'s' if len(bounds) == 1 else ''} only milder ranks"
                    + ("; nothing applied" if index == 0 else ""))
            if report.metrics.get("target_met") is not False:
                report.target_missed(text)
            else:  # the speed search already missed; say what the bound then did to its pick
                report.note("bound_after_target", text)
    return picks[index]


def _drop_unseen_savings(usable: list[LayerChoice], model_ms: float, report: Report
                         ) -> list[LayerChoice]:
    """Keep the options that save at least :data:`MIN_MODEL_SAVING` of the model's latency.

    A rewrite saving less cannot be seen in any whole-model measurement here (run-to-run noise
    is several percent), yet it costs fidelity: on PP-OCRv4's recognizer a neck conv saving
    0.3 % of the time flipped 6 % of the strings.
    """
    kept = []
    floor = MIN_MODEL_SAVING * model_ms
    for ch in usable:
        options = [o for o in ch.options if o.saved_ms >= floor]
        if options:
            kept.append(dataclasses.replace(ch, options=options))
            continue
        best = max(o.saved_ms for o in ch.options)
        report.skip(ch.layer.name, ch.layer.op, SkipReason.TOO_SMALL,
                    f"saves at most {best:.3f} ms, under {MIN_MODEL_SAVING:.0%} of the model's "
                    f"{model_ms:.2f} ms")
    return kept


def _reach_speedup(picks: list[dict[int, Option]], savings: list[float], base_ms: float,
                   probes: Probes, config: LowRankConfig, report: Report,
                   usable: Sequence[LayerChoice] = ()) -> int:
    """Index of a mild pick measured (as a whole model) to reach ``config.target_speedup``.

    Start at the mildest pick the micro-benchmarks predict to be enough; while the measured
    speedup falls short, move up by the realized share of the predicted saving; once one
    meets the target, bisect toward milder picks (a few more measurements). Out of reach:
    the mildest pick within noise of the fastest measured, or nothing.
    """
    target = float(config.target_speedup or 1.0)
    needed = base_ms * (1 - 1 / target)
    feasible = [i for i, v in enumerate(savings) if v >= needed]
    index = feasible[0] if feasible else len(picks) - 1
    measured: dict[int, float] = {0: 1.0}  # picks[0] changes nothing
    rounds = 0
    for _ in range(TARGET_ROUNDS):
        measured[index] = probes.speedup(picks[index])
        rounds += 1
        if measured[index] >= target:
            break
        # Scale what the micro-benchmarks promise by what the whole model realized.
        predicted = savings[index]
        realized = base_ms * (1 - 1 / measured[index])
        efficiency = min(max(realized / predicted, 0.2), 1.0) if predicted > 0 else 1.0
        want = needed / efficiency
        later = [i for i in range(index + 1, len(picks)) if savings[i] >= want]
        nxt = later[0] if later else len(picks) - 1
        if nxt == index or nxt in measured:
            if index + 1 < len(picks) and index + 1 not in measured:
                nxt = index + 1
            else:
                break
        index = nxt
    met = [i for i, v in measured.items() if v >= target]
    if met:
        hi = min(met)
        lo = max(i for i, v in measured.items() if v < target and i < hi)
        lo, hi, rounds = _bisect_milder(picks, lo, hi, measured, target, probes, rounds)
        best = hi
        if hi - lo == 1:
            best, rounds = _refine_step(picks, lo, hi, measured, target, probes, config, usable,
                                        rounds)
    else:
        # Out of reach: measure a few milder picks too and take the mildest one within
        # noise of the fastest, so error is not spent on speed that does not show.
        top = max(measured, key=lambda i: measured[i])
        for frac in (0.5, 0.25):
            i = int(round(top * frac))
            if 0 < i < len(picks) and i not in measured:
                measured[i] = probes.speedup(picks[i])
                rounds += 1
        # The mildest pick beyond noise of the original (1.0) and within noise of the
        # fastest; nothing when no pick is beyond noise of the original.
        fastest = max(measured.values())
        gains = [i for i, v in measured.items() if v >= 1 + NOISE]
        best = min((i for i in gains if measured[i] >= fastest - NOISE * fastest), default=0)
    report.metrics["target_rounds"] = rounds
    report.metrics["probe_speedups"] = {str(i): round(v, 3) for i, v in sorted(measured.items())
                                        if i}
    report.metrics["probe_spread"] = {str(i): [round(x, 3) for x in probes.spread[v]]
                                      for i, v in sorted(measured.items())
                                      if i and v in probes.spread}
    if met and best in measured and measured[best] in probes.spread:
        p10, _ = probes.spread[measured[best]]
        if p10 < target:  # the median meets it, a tenth of the rounds did not
            report.metrics["target_within_noise"] = True
            report.note("target_within_noise",
                        f"target {target:.3g}x met by the median ({measured[best]:.2f}x) but "
                        f"within noise: a tenth of the rounds measured under {p10:.2f}x")
    if not met:
        if best == 0:
            report.target_missed(f"target {target:.3g}x not reached: no choice of ranks measured "
                                 f"faster than the original beyond noise; nothing applied")
        else:
            report.target_missed(f"target {target:.3g}x not reached: best measured "
                                 f"{measured[best]:.2f}x, using it")
    return best


def _bisect_milder(picks: list[dict[int, Option]], lo: int, hi: int,
                   measured: dict[int, float], target: float, probes: Probes,
                   rounds: int) -> tuple[int, int, int]:
    """Narrow ``lo`` (short of ``target``) and ``hi`` (meets it): (lo, hi, rounds).

    Up to :data:`MILDER_ROUNDS` whole-model measurements.
    """
    spent = 0

    def meets(i: int) -> bool:
        nonlocal spent
        measured[i] = probes.speedup(picks[i])
        spent += 1
        return measured[i] >= target

    lo, hi = search.bracket(meets, lo, hi, max_steps=MILDER_ROUNDS)
    return lo, hi, rounds + spent


def _refine_step(picks: list[dict[int, Option]], lo: int, hi: int, measured: dict[int, float],
                 target: float, probes: Probes, config: LowRankConfig,
                 usable: Sequence[LayerChoice], rounds: int) -> tuple[int, int]:
    """Look between two neighbouring picks for a milder one that still meets the target.

    Neighbours differ in one layer, which moves between two points of its convex frontier;
    the options it skips (off the frontier: more error per millisecond saved) can land much
    nearer the target (Fashion-MNIST CP: one layer's move took the model from 1.85x to 2.70x
    with 2x asked). They are inserted into ``picks`` between the two, in order of saving, and
    bisected with up to :data:`MILDER_ROUNDS` more measurements. Returns (index, rounds).
    """
    changed = [i for i in picks[hi] if picks[lo].get(i) is not picks[hi][i]]
    choice = next((ch for ch in usable if changed and ch.index == changed[0]), None)
    if len(changed) != 1 or choice is None:
        return hi, rounds
    layer = changed[0]

    def saved(o: Option | None) -> float:
        return 0.0 if o is None else _savings(o, config, choice.layer)

    low, high = saved(picks[lo].get(layer)), saved(picks[hi][layer])
    between = sorted((o for o in choice.options if low < saved(o) < high), key=saved)
    if not between:
        return hi, rounds
    picks[hi:hi] = [{**picks[lo], layer: o} for o in between]
    shift = len(between)
    for key in sorted((k for k in measured if k >= hi), reverse=True):
        measured[key + shift] = measured.pop(key)
    _, hi, rounds = _bisect_milder(picks, lo, hi + shift, measured, target, probes, rounds)
    return hi, rounds


def _bound_fidelity(picks: list[dict[int, Option]], limit: int, max_error: float | None,
                    min_agreement: float | None, probes: Probes, report: Report,
                    explicit: bool) -> int:
    """Index of the most aggressive pick up to ``limit`` within both fidelity bounds.

    The model error must be at most ``max_error``, the decision agreement at least
    ``min_agreement`` (either may be None: no such bound). Both are measured on the
    calibration data with probe builds (symmetric refit, which errs high: the final
    asymmetric refit is at least as good on average).
    """
    tried: dict[int, tuple[float, float | None]] = {}

    def within(i: int) -> bool:
        tried[i] = probes.fidelity(picks[i])
        err, agree = tried[i]
        return ((max_error is None or err <= max_error)
                and (min_agreement is None or agree is None or agree >= min_agreement))

    lo = search.last_within(within, limit)  # picks[0] is "nothing" (lam 0): error 0
    hi = lo + 1
    report.metrics["error_probes"] = {f"{i} ({len(picks[i])} layers)": round(e, 4)
                                      for i, (e, _) in sorted(tried.items())}
    if any(a is not None for _, a in tried.values()):
        report.metrics["agreement_probes"] = {
            f"{i} ({len(picks[i])} layers)": round(a, 4)
            for i, (_, a) in sorted(tried.items()) if a is not None}
    if lo == limit:
        return limit
    err, agree = tried[hi]
    if max_error is not None and err > max_error and explicit:
        report.metrics["max_error_bound_active"] = True
        report.note("max_error_bound_active",
                    f"--max-error {max_error} limits the ranks (measured model error "
                    f"{probes.fidelity(picks[lo])[0]:.4g})")
    if min_agreement is not None and agree is not None and agree < min_agreement:
        report.metrics["min_agreement_bound_active"] = True
        kept = probes.fidelity(picks[lo])[1]
        report.note(
            "min_agreement_bound_active",
            f"--min-agreement {min_agreement} limits the ranks: the next faster choice keeps "
            f"{agree:.1%} of what the outputs decide on the calibration samples (argmax "
            f"decisions, above-threshold scores: {probes.judged_by()})"
            + (f" (this one {kept:.1%})" if kept is not None else ""))
    return lo
