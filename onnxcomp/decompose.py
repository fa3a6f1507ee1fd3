"""The shared driver of the decomposition passes: find layers, plan, choose ranks, refit, rewrite.

Every decomposition here replaces one linear layer ``y = W x + b`` (a Conv on its im2col
columns, or a Gemm/MatMul with a constant weight) by a chain of cheaper linear stages whose
last stage is a plain (group 1) Conv or MatMul. The chain up to the last stage is itself
linear in the layer's im2col input, ``z = P x``, so the whole chain computes ``A P x + b``.
That gives three things in closed form from second moments of calibration data:

* the **isolated error** of any plan, before and after a least-squares refit of ``A, b``
  (used to allocate ranks: ``E||A P x + b' - y||^2`` from ``E[x x^T]``);
* the **symmetric refit** (Ridge on the original network's layer inputs);
* the **asymmetric refit** (Zhang et al. 2016, arXiv:1505.06798): features from the already
  compressed upstream network ``x_c``, targets from the original ``y = W x_o + b``, so errors
  do not accumulate; only ``E[x_c x_c^T]`` and ``E[x_c y^T]`` are needed.

Moments are accumulated over a seeded sample of output positions (bounded rows per layer),
so memory is O(D^2) per layer whatever the calibration size.

Ranks: a fixed rank (absolute or fraction) for every layer, or ``auto``: each layer's rank
options are micro-benchmarked on the chosen ONNX Runtime provider (cached per shape), options
that are not measured faster than the original layer are dropped ("no latency win"), and a
Lagrangian allocation picks per-layer options that meet ``target_speedup`` / ``target_macs``
with the least isolated error, each layer's error weighted by its measured sensitivity (how
much of it reaches the model's outputs, :func:`layer_gains`); ``max_error`` bounds the
measured relative error of the model's outputs and ``min_agreement`` the share of calibration
samples whose decisions (argmax of a softmax or logits output) are unchanged (binary search
over the savings).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
import onnx

from onnxcomp import measure, weights
from onnxcomp.allocate import LayerChoice, Option, Probes, allocate, realized
from onnxcomp.calibration import Calibration
from onnxcomp.chain import build_chain
from onnxcomp.graph import Graph, check_rewritten
from onnxcomp.judge import Judge
from onnxcomp.linear import (
    Layer,
    Plan,
    find_layers,
    static_shapes,
    xdim,
)
from onnxcomp.model import copy_model
from onnxcomp.moments import Moments, collect_compressed, collect_original, input_covariance
from onnxcomp.passbase import (
    NOTHING_TO_DO,
    SYNTHETIC_CALIBRATION,
    Change,
    ConfigError,
    PassBase,
    PassConfig,
    PassError,
    PassResult,
    Report,
    RunContext,
    Skip,
    SkipReason,
    exclude_option,
    option,
    refit_mode_option,
    refit_option,
    seed_option,
    target_speedup_option,
)
from onnxcomp.refit import (
    REFIT_ROWS_PER_UNKNOWN,
    ChainFit,
    optimism,
    plan_ab,
    refit_rows_needed,
)
from onnxcomp.stream import LayerStream
from onnxcomp.timing import Timer

log = logging.getLogger(__name__)

# ``--rank auto`` on a model with decision outputs (a classifier's top-1, a recognizer's
# character per step): keep at least this share of the calibration samples' decisions, with
# or without a target.
DEFAULT_MIN_AGREEMENT = 0.97
# Layers whose input row is wider than this are left alone: their calibration moments (a
# float64 Gram of (width + 1)^2, twice for the data basis's halves) would take over 1 GiB.
MAX_INPUT_DIM = 12288


# ============================================================================ configuration
@dataclasses.dataclass(frozen=True)
class LowRankConfig(PassConfig):
    """Options shared by the decomposition passes.

    ``rank``: ``"auto"``, an absolute rank (int >= 1) or a fraction of the layer's
    break-even rank (0 < f < 1; the rank at which the chain costs as many MACs as the layer).
    """

    rank: str | int | float = option(
        'auto',
        'cp, tucker, svd: auto, an absolute rank N, or a fraction 0<f<1 of the break-even '
        'rank.')
    target_speedup: float | None = target_speedup_option()
    target_macs: float | None = option(None, "--rank auto: fraction of IN.onnx's MACs to keep.")
    max_error: float | None = option(
        None,
        "--rank auto: bound on the relative error of the model's outputs (default 0.03 "
        'without a target).')
    # --rank auto, models with decision outputs (verify.decision_outputs): keep at least this
    # share of the calibration samples' decisions (0: no such bound).
    min_agreement: float = option(
        DEFAULT_MIN_AGREEMENT,
        "--rank auto: keep at least this share of what the outputs decide on the calibration "
        "samples (argmax of a softmax or logits output at every position; the F1 of a "
        "sigmoid output's above-threshold set), with or without a target (0: off). Models "
        "whose outputs decide nothing are not bound by it.")
    refit: bool = refit_option()
    refit_mode: str = refit_mode_option()
    rank_multiple: int = option(8, 'Round ranks to multiples of this.')
    latency_check: bool = option(
        True,
        'Measure rank options on the provider and rewrite only layers measured faster (--no-'
        'latency-check rewrites them anyway).')
    min_layer_speedup: float = 1.05
    # --rank auto uses only options whose micro-benchmarked speedup, in context (see
    # realized: the edge cost a one-layer model pays is taken off), is at least this share of
    # their MAC cut. Timed alone, CP chains on the small Fashion-MNIST VGG layers realize only
    # 0.7 here; in context 0.8-0.95.
    min_realized: float = option(
        0.8,
        '--rank auto: use only chains whose measured speedup is at least this share of their '
        'MAC reduction, in context (what a one-layer model pays at its edges is taken off '
        'both timings).')
    # --rank auto: weight each layer's error by how much of it reaches the model's outputs
    # (one probe run per layer, see layer_gains).
    sensitivity: bool = option(
        True,
        "--rank auto: weight each layer's error by how much of it reaches the model's outputs"
        ' (one probe run per layer on 8-32 calibration samples).')
    # A JSON file of measured latencies read before measuring and written after (see
    # onnxcomp/latency_cache.py): with it a second compile replays the first one's choices.
    latency_cache: str | None = None
    min_macs: int = 1_000_000
    # cp only: "separate" (kh x 1 then 1 x kw depthwise), "merged" (one kh x kw depthwise),
    # "auto" (merged for kernels of at most 9 taps, where it measured faster; see passes/cp.py).
    cp_depthwise: str = option(
        'auto',
        "cp: the chain's spatial stages as depthwise kx1 then 1xk (separate), as one "
        'depthwise kxk of rank-one kernels (merged), or merged for kernels of at most 9 taps '
        '(auto).',
        choices=('separate', 'merged', 'auto'))
    # svd of 1x1 convs and FC layers: "data" keeps the principal subspace of the layer's
    # outputs on the calibration data (reduced-rank regression), "weights" the top singular
    # vectors of W alone. Without calibration data both are the weights' SVD.
    basis: str = option(
        'data',
        "svd of 1x1 convs and FC layers, and tucker's output factor: the principal subspace "
        "of the layer's outputs on the calibration data when that holds across calibration "
        'halves (data), or that of the weights.',
        choices=('data', 'weights'))
    max_rows: int = 16384
    ridge: float = 1e-7
    provider: str = "cpu"
    threads: int = 1
    bench_runs: int = 25
    seed: int = seed_option()
    exclude: tuple[str, ...] = exclude_option()
    max_seconds_per_layer: float = 10.0

    def __post_init__(self) -> None:
        rank = self.rank
        if isinstance(rank, str) and rank != "auto":
            try:
                rank = float(rank) if "." in rank else int(rank)
            except ValueError:
                raise ConfigError(f"--rank must be 'auto', an integer or a fraction, "
                                  f"got '{self.rank}'") from None
            object.__setattr__(self, "rank", rank)
        if isinstance(rank, bool):
            raise ConfigError("--rank must be 'auto', an integer or a fraction")
        if isinstance(rank, float):
            if rank.is_integer() and rank >= 1:
                object.__setattr__(self, "rank", int(rank))
            elif not 0 < rank < 1:
                raise ConfigError(f"--rank fraction must be in (0, 1), got {rank}")
        if isinstance(rank, int) and rank < 1:
            raise ConfigError(f"--rank must be >= 1, got {rank}")
        if self.target_speedup is not None and self.target_speedup <= 1.0:
            raise ConfigError(f"--target-speedup must be > 1, got {self.target_speedup}")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ConfigError(f"--target-macs must be in (0, 1], got {self.target_macs}")
        if not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_error is not None and self.max_error <= 0:
            raise ConfigError(f"--max-error must be > 0, got {self.max_error}")
        if self.refit_mode not in ("asymmetric", "symmetric"):
            raise ConfigError(f"refit mode must be asymmetric or symmetric, got "
                              f"'{self.refit_mode}'")
        if self.cp_depthwise not in ("separate", "merged", "auto"):
            raise ConfigError(f"--cp-depthwise must be separate, merged or auto, got "
                              f"'{self.cp_depthwise}'")
        if self.basis not in ("data", "weights"):
            raise ConfigError(f"--basis must be data or weights, got '{self.basis}'")
        if self.rank_multiple < 1:
            raise ConfigError("--rank-multiple must be >= 1")
        if not 0 <= self.min_realized <= 1:
            raise ConfigError(f"--min-realized must be in [0, 1], got {self.min_realized}")
        if self.rank != "auto" and (self.target_speedup or self.target_macs):
            raise ConfigError("--target-speedup/--target-macs need --rank auto")

    @property
    def auto(self) -> bool:
        """True when ranks are chosen automatically."""
        return self.rank == "auto"


# ============================================================================ layers


# ============================================================================ plans


class Method(Protocol):
    """A decomposition method (cp, tucker, svd, ...)."""

    name: str
    ops: tuple[str, ...]

    def check(self, layer: Layer) -> Skip | None:
        """Why this method cannot decompose ``layer``, or None."""
        ...

    def rank_options(self, layer: Layer, config: LowRankConfig) -> list[tuple[int, ...]]:
        """Candidate ranks in increasing order of cost, all cheaper than the layer in MACs."""
        ...

    def fixed_rank(self, layer: Layer, config: LowRankConfig) -> tuple[int, ...]:
        """The rank for ``--rank N`` / ``--rank f``."""
        ...

    def plan(self, layer: Layer, ranks: tuple[int, ...], config: LowRankConfig) -> Plan:
        """The factorization at ``ranks``."""
        ...


# ============================================================================ statistics


# ============================================================================ refit math


# ============================================================================ ONNX building


# ============================================================================ the driver


def _option(layer: Layer, plan: Plan, fit: ChainFit, rows: int, config: LowRankConfig
            ) -> Option:
    """A rank option with its isolated errors (timed later by :func:`_measure_options`)."""
    raw = fit.error(plan, plan_ab(layer, plan))
    err = raw
    if config.refit and rows >= refit_rows_needed(plan):
        ab = fit.refit(plan, config.ridge)
        err = min(raw, fit.error(plan, ab) * optimism(plan, rows))
    return Option(plan, err, raw, 0.0, 0.0)


def _measure_options(layer: Layer, options: list[Option], model: onnx.ModelProto,
                     config: LowRankConfig, timer: Timer) -> None:
    """Time the options cheapest first; once one is not faster, costlier ones are not timed.

    A chain's latency grows with its rank, so an option that loses to the original layer
    means every costlier option would too: they are marked not faster without measuring.
    """
    edges = measure.layer_edges_ms(layer, model, config, timer) if options else 0.0
    for method in dict.fromkeys(o.plan.method for o in options):  # per method (factorize)
        lost, base = False, 0.0
        for opt in sorted((o for o in options if o.plan.method == method),
                          key=lambda o: o.plan.macs):
            opt.edges_ms = edges
            if lost:
                opt.base_ms, opt.ms = base, float("inf")
                continue
            opt.base_ms, opt.ms = measure.measure_plan(layer, opt.plan, model, config, timer)
            base = opt.base_ms
            lost = opt.base_ms < config.min_layer_speedup * opt.ms


def run_decomposition(
    method: Method,
    model: onnx.ModelProto,
    config: LowRankConfig,
    calib: Calibration | None,
    pass_name: str,
    progress: Callable[[str], None] | None = None,
    timer: Timer | None = None,
    judge: Judge | None = None,
) -> PassResult:
    """Decompose ``model``'s layers with ``method`` per ``config``; see the module docstring.

    Latencies go through ``timer`` (the run context's; a fresh process timer when None),
    with ``config.latency_cache`` attached when given.
    """
    start = time.perf_counter()
    report = Report(pass_name)
    assert calib is not None  # PassBase gives synthetic inputs without --calib
    if calib.synthetic:
        report.note(SYNTHETIC_CALIBRATION,
                    "synthetic calibration: ranks and refits come from random inputs (weights "
                    "alone); give --calib for meaningful results")
    shapes = static_shapes(model, calib)
    graph = Graph(model)
    layers = find_layers(graph, shapes, method.ops, report, config.exclude, config.min_macs)
    kept: list[Layer] = []
    for layer in layers:
        skip = method.check(layer)
        if skip is None and xdim(layer) > MAX_INPUT_DIM:
            skip = Skip(layer.name, layer.op, SkipReason.UNSUPPORTED_ATTRIBUTE,
                        f"input of {xdim(layer)} values per row: its calibration moments "
                        f"would take {8 * (xdim(layer) + 1) ** 2 / 2**30:.1f} GiB (limit "
                        f"{MAX_INPUT_DIM} values)")
        if skip is not None:
            report.add_skip(skip)
        else:
            kept.append(layer)
    del layers  # the skipped layers' weights are not held through the pass
    if not kept:
        report.note(NOTHING_TO_DO, f"no layer to decompose with {method.name}")
        return PassResult(copy_model(model), report)
    timer = (timer or Timer()).with_cache_file(config.latency_cache, config.provider,
                                               config.threads)
    data_basis = (getattr(method, "data_basis", False) and config.basis == "data"
                  and not calib.synthetic)
    moments, targets = collect_original(model, kept, calib, config.max_rows, config.seed,
                                        halves=data_basis)
    if data_basis:
        for layer, m in zip(kept, moments, strict=True):
            # A covariance from fewer rows than REFIT_ROWS_PER_UNKNOWN per dimension (an FC
            # layer gets one row per sample) describes the calibration samples, not the data:
            # such layers keep the weights' own basis.
            if m.rows >= REFIT_ROWS_PER_UNKNOWN * xdim(layer):
                layer.input_cov = input_covariance(m)
                o = m.second
                if o is not None and 0 < o.rows < m.rows:
                    first = Moments(m.xx - o.xx, None, 0.0, m.rows - o.rows)
                    layer.input_cov_halves = (input_covariance(first), input_covariance(o))

    choices: list[LayerChoice] = []
    option_fits: list[ChainFit] = []  # symmetric fits, kept for the probe builds
    for i, layer in enumerate(kept):
        if progress:
            progress(f"{pass_name}: planning {layer.name}")
        if config.auto:
            ranks_list = method.rank_options(layer, config)
        else:
            ranks_list = [method.fixed_rank(layer, config)]
        options = []
        fit = ChainFit(layer, moments[i].normalized()[0])  # shared by the layer's options
        option_fits.append(fit)
        for ranks in ranks_list:
            plan = method.plan(layer, ranks, config)
            if plan.extra.get("degenerate"):
                continue
            options.append(_option(layer, plan, fit, moments[i].rows, config))
        if config.latency_check:
            _measure_options(layer, options, model, config, timer)
        choices.append(LayerChoice(layer, i, options))

    symmetric = dataclasses.replace(config, refit_mode="symmetric")
    fits = {i: option_fits[i] for i in range(len(kept))}  # probes refit from these
    probes = Probes(model, kept, moments, calib, symmetric,
                    lambda chosen: _build(model, chosen, kept, moments, targets, calib,
                                          symmetric, "probe", None, fits)[0], timer, judge)
    chosen = allocate(choices, probes, config, report)
    report.metrics["layer_options"] = _options_tried(choices, chosen)
    final_model, changes = _build(model, chosen, kept, moments, targets, calib, config,
                                  pass_name, progress, fits)
    if weights.on_disk(model):  # a large model: its weights are not held through the timing
        for layer in kept:
            layer.drop_weight()
    if changes and config.latency_check:
        if progress:
            progress(f"{pass_name}: timing the whole model")
        # The same structure as a measured probe (only refit weights differ): reuse its time.
        speedup = probes.measured(chosen)
        if speedup is None:
            speedup = probes.speedup_of(final_model)
        report.metrics["measured_speedup"] = round(speedup, 3)
        if speedup < 1.0:
            report.note(
                "whole_model_slower",
                f"the rewritten model measured {speedup:.2f}x (slower) as a whole on "
                f"{config.provider}: nothing applied")
            for change in changes:
                report.skip(change.node, change.op_type, SkipReason.NO_LATENCY_WIN,
                            f"whole model measured {speedup:.2f}x")
            changes = []
    for change in changes:
        report.apply(change)
    if (cache_stats := timer.save()) is not None:
        report.metrics["latency_cache"] = cache_stats
    report.metrics["seconds"] = round(time.perf_counter() - start, 2)
    if not changes:
        return PassResult(copy_model(model), report)
    return PassResult(final_model, report)


def _options_tried(choices: list[LayerChoice], chosen: dict[int, Option]
                   ) -> dict[str, list[dict[str, Any]]]:
    """Per layer, every option the allocation weighed, and which one it took.

    Method, ranks, MACs, isolated error, measured latency of the layer and of the option (ms).
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for ch in choices:
        pick = chosen.get(ch.index)
        out[ch.layer.name] = [{
            "method": o.plan.method, "ranks": list(o.plan.ranks), "macs": o.plan.macs,
            "error": round(o.error, 6), "layer_ms": round(o.base_ms, 4),
            "ms": round(o.ms, 4) if o.ms != float("inf") else None,
            "chosen": o is pick} for o in ch.options]
    return out


def _build(
    model: onnx.ModelProto, chosen: dict[int, Option], layers: Sequence[Layer],
    moments: list[Moments],
    targets: list[list[np.ndarray]], calib: Calibration, config: LowRankConfig,
    pass_name: str, progress: Callable[[str], None] | None,
    fits: dict[int, ChainFit] | None = None,
) -> tuple[onnx.ModelProto, list[Change]]:
    """Rewrite the chosen layers in graph order, refitting each on the compressed upstream.

    ``fits``: each layer's symmetric :class:`ChainFit` (on the original network's inputs),
    reused across the candidate models a search builds.
    """
    with LayerStream(calib) as stream:
        return _build_streamed(model, chosen, layers, moments, targets, config, pass_name,
                               progress, stream, fits or {})


def _build_streamed(
    model: onnx.ModelProto, chosen: dict[int, Option], layers: Sequence[Layer],
    moments: list[Moments], targets: list[list[np.ndarray]], config: LowRankConfig,
    pass_name: str, progress: Callable[[str], None] | None, stream: LayerStream,
    fits: dict[int, ChainFit],
) -> tuple[onnx.ModelProto, list[Change]]:
    current = model
    changes: list[Change] = []
    # One graph for the whole rewrite: each step exports (unchecked) only what the stream
    # runs next; the result is checked once at the end.
    graph = Graph(model)
    for index in sorted(chosen):  # layers are in graph order
        name = layers[index].name
        opt = chosen[index]
        plan = opt.plan
        node = next(n for n in graph.nodes if n.name == name)
        layer = dataclasses.replace(layers[index], node=node)
        if progress:
            progress(f"{pass_name}: rewriting {layer.name}")
        m0 = moments[index]
        xx0 = m0.normalized()[0]
        raw_ab = plan_ab(layer, plan)
        refit_note = config.refit_mode if config.refit else "none"
        if config.refit and m0.rows < refit_rows_needed(plan):
            refit_note = (f"none: {m0.rows} sampled rows, a refit at this rank needs "
                          f"{refit_rows_needed(plan)} (more --calib samples help, up to "
                          f"{config.max_rows} rows per layer)")
        symmetric = fits.get(index) or ChainFit(layer, xx0)
        if refit_note != config.refit_mode:
            ab = raw_ab
            err_before = err_after = symmetric.error(plan, ab)
        else:
            if config.refit_mode == "symmetric" or current is model:
                fit = symmetric
            else:
                mc = collect_compressed(stream, current, index, layer, targets[index],
                                        config.max_rows, config.seed)
                xx, xy, yy = mc.normalized()
                fit = ChainFit(layer, xx, xy, yy)
            ab = fit.refit(plan, config.ridge)
            err_before, err_after = fit.error(plan, raw_ab), fit.error(plan, ab)
        if not np.all(np.isfinite(ab)):
            raise PassError(f"refit of {layer.name} produced non-finite weights")
        expected = err_after
        if ab is not raw_ab:
            expected = err_after * optimism(plan, m0.rows)
            if expected > err_before:  # the refit is not expected to help: keep the raw plan
                ab, err_after, expected = raw_ab, err_before, err_before
                refit_note = "none: not expected to beat the raw decomposition"
        build_chain(graph, layer, plan, ab, pass_name)
        current = graph.export(check=False)
        details: dict[str, Any] = {
            "method": plan.method,
            "ranks": list(plan.ranks),
            "weight_error": round(plan.weight_error, 6),
            "calib_error_before_refit": round(err_before, 6),
            "calib_error_after_refit": round(err_after, 6),
            "expected_heldout_error": round(expected, 6),
            "refit": refit_note,
        }
        if opt.base_ms:
            details.update(latency_before_ms=round(opt.base_ms, 4),
                           latency_after_ms=round(opt.ms, 4),
                           edges_ms=round(opt.edges_ms, 4),
                           realized=round(realized(opt, layer), 3),
                           realized_alone=round(realized(opt, layer, in_context=False), 3))
        details.update({k: v for k, v in plan.extra.items() if k != "degenerate"})
        changes.append(Change(
            node=layer.name, op_type=layer.op,
            what=f"{plan.method} rank {'x'.join(str(r) for r in plan.ranks)}",
            params_before=layer.params, params_after=plan.params,
            macs_before=layer.macs, macs_after=plan.macs, error=round(err_after, 6),
            details=details,
        ))
    if current is not model:
        check_rewritten(current)
    return current, changes


# ============================================================================ pass wrapper
class DecompositionPass(PassBase):
    """A pass object around a :class:`Method` (subclasses set name and method)."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    config_cls: ClassVar[type[PassConfig]] = LowRankConfig
    uses_calibration: ClassVar[bool] = True
    method_cls: Callable[[], Any]  # a Method class

    def call(self, model: onnx.ModelProto, config: PassConfig, calib: Calibration | None,
             ctx: RunContext) -> PassResult:
        """Decompose ``model``'s layers; see :func:`run_decomposition`.

        A fresh method object per call: caches (e.g. CP warm starts) never outlive a run, so
        the same inputs give the same bytes.
        """
        assert isinstance(config, LowRankConfig)
        return run_decomposition(self.method_for(config), model, config, calib, self.name,
                                 timer=ctx.timer, judge=ctx.judge)

    def method_for(self, config: LowRankConfig) -> Any:
        """The :class:`Method` object for one run."""
        return self.method_cls()


# ============================================================================ refit helpers


