"""Static int8 layers left in float for fidelity (``quantize --max-drop`` / ``--float-budget``).

Layers are ranked by sensitivity (the output error with each alone in int8) and the most
sensitive are left in float:

- ``--max-drop``: as few as the fidelity bound allows;
- ``--float-budget F``: the top 1, 2, 4, ... while they fit in a share F of the int8
  model's measured speed, the count with the least output error kept. A bound in decisions
  changed moves in steps of one sample on a few dozen calibration samples and can stay flat
  while the output error falls by a quarter; a speed budget spends on what measurably
  lowers the error.

The int8 layers keep the weights the pass chose for them (after output-error rounding,
onnxcomp/rounding.py, so the bound judges the model that ships, not a nearest-rounded
stand-in).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import benchmark as bench
from onnxcomp import fidelity, search
from onnxcomp.calibration import Calibration
from onnxcomp.judge import Judge
from onnxcomp.latency_cache import structure_hash
from onnxcomp.passbase import Report
from onnxcomp.timing import Timer

# Samples each candidate model is judged on, and samples per layer sensitivity.
DROP_SAMPLES, SENSITIVITY_SAMPLES = 256, 32

# build(layers left in float, their sensitivity[, for_budget=the ones --float-budget
# leaves in float]) -> (model, report)
Build = Callable[..., tuple[onnx.ModelProto, Report]]


def float_layers_for_drop(model: onnx.ModelProto, build: Build, calib: Calibration,
                          quantized: onnx.ModelProto, report: Report, max_drop: float,
                          judge: Judge, start: str = "static int8 of every layer"
                          ) -> tuple[onnx.ModelProto, Report]:
    """Leave the most sensitive layers in float until the drop is within ``max_drop``.

    ``quantized`` / ``report``: every layer in int8, as the pass built it (its rounding
    included; ``start`` names it in the warning, when some layers are in float already);
    ``build(excluded, sensitivity)`` builds the same with ``excluded`` in float.
    Sensitivity of a layer: the output error with that layer alone quantized (on at most
    ``SENSITIVITY_SAMPLES`` calibration samples). The count left in float is found by
    doubling, then bisection; each count is judged on up to ``DROP_SAMPLES`` samples.
    """
    first = calib.first(DROP_SAMPLES)
    reference = fidelity.Reference.of(model, first, judge.first(first.num_samples))
    drop, metric = fidelity.bound(reference.compare(quantized))
    report.metrics["drop_all_layers"] = round(drop, 5)
    report.metrics["drop_metric"] = metric
    if drop <= max_drop:
        report.metrics["drop"] = round(drop, 5)
        report.metrics["layers_left_in_float"] = 0
        return quantized, report
    sensitivity = _sensitivity(build, report, reference.first(SENSITIVITY_SAMPLES))
    ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
    tried: dict[int, tuple[onnx.ModelProto, Report, float]] = {}

    def attempt(k: int) -> float:
        if k not in tried:
            m, r = build(set(ranked[:k]), sensitivity)
            tried[k] = (m, r, fidelity.drop(reference.compare(m)) if r.applied else 0.0)
        return tried[k][2]

    # 0 layers in float is known to miss the bound; all of them in float meets it.
    good = search.first_true_doubling(lambda k: attempt(k) <= max_drop, len(ranked))
    attempt(good)
    best, best_report, best_drop = tried[good]
    _carry(report, best_report)
    best_report.metrics["drop_all_layers"] = round(drop, 5)
    best_report.metrics["drop_metric"] = metric
    best_report.metrics["drop"] = round(best_drop, 5)
    best_report.metrics["layers_left_in_float"] = good
    best_report.metrics["models_tried"] = len(tried)
    worst = ", ".join(f"{n} ({sensitivity[n]:.3g})" for n in ranked[:3])
    lost = (f"{start} drops fidelity by {drop:.3g} on the calibration data "
            f"(measured as {DROP_METRICS[metric]})")
    if good == len(ranked):
        best_report.warn("quantize.max_drop_unmet",
                         f"{lost}, and no layer can be quantized within --max-drop "
                         f"{max_drop}: the model is left in float (most sensitive "
                         f"layers, output error alone: {worst})")
    else:
        best_report.warn("quantize.layers_in_float",
                         f"{lost}, above --max-drop {max_drop}: {good} most sensitive "
                         f"layer(s) left in float, drop now {best_drop:.3g} (most sensitive, "
                         f"output error alone: {worst})")
    if good == len(ranked):
        best_report.note("max_drop", f"--max-drop {max_drop}: not met with any layer "
                                     f"quantized; the model is left in float")
    else:
        best_report.note(
            "max_drop",
            f"--max-drop {max_drop}: {good} most sensitive layer(s) left in float; "
            f"drop {best_drop:.4f} on {reference.calib.num_samples} calibration samples "
            f"(all layers: {drop:.4f})")
    return best, best_report


def _carry(report: Report, rebuilt: Report) -> None:
    """What earlier steps of the pass said and measured, into a rebuilt model's report."""
    rebuilt.notes[:0] = [n for n in report.notes if n not in rebuilt.notes]
    for key, value in report.metrics.items():
        if key == "rounding" or key.startswith("float_budget"):
            rebuilt.metrics[key] = value


def _sensitivity(build: Build, report: Report, probe: fidelity.Reference
                 ) -> dict[str, float]:
    """Each int8 layer of ``report``: the output error on ``probe`` with it alone in int8."""
    layers = [c.node for c in report.applied]
    sensitivity = {}
    for name in layers:
        alone, _ = build({n for n in layers if n != name})
        sensitivity[name] = probe.compare(alone).rel_l2
    return sensitivity


def float_layers_for_budget(model: onnx.ModelProto, build: Build, calib: Calibration,
                            quantized: onnx.ModelProto, report: Report, budget: float,
                            judge: Judge, timer: Timer, config: bench.BenchConfig
                            ) -> tuple[onnx.ModelProto, Report, set[str]]:
    """Leave the most sensitive layers in float, within ``budget`` of int8's speed.

    Layers are ranked by sensitivity, as :func:`float_layers_for_drop` ranks them (the
    output error with each alone in int8). The top 1, 2, 4, ... are tried until the whole
    model, timed interleaved with the all-int8 one on ``config``'s provider, runs under
    ``1 - budget`` of its speed; of the counts within it, the one with the least error wins
    (none, when none lowers it). Returns (model, report, layers left in float).

    Ranking by what leaving each layer alone in float takes off the all-int8 error was
    tried: on MobileNetV2 those gains are 0.003-0.01 against errors of 0.03-0.06 alone (on
    32 samples, near their noise), and it picked wide 1x1 convs that cost 20 % of the
    speed for four layers.
    """
    first = calib.first(SENSITIVITY_SAMPLES)
    probe = fidelity.Reference.of(model, first, judge.first(first.num_samples))
    error = probe.compare(quantized).rel_l2
    sensitivity = _sensitivity(build, report, probe)
    ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
    feeds = {k: v[:1] for k, v in calib.batches[0].items()}
    report.metrics["float_budget_error_all_int8"] = round(error, 5)
    best: tuple[onnx.ModelProto, Report, set[str]] = (quantized, report, set())
    best_error, cost, tried = error, 1.0, []
    k = 1
    while k < len(ranked):
        excluded = set(ranked[:k])
        candidate, candidate_report = build(excluded, sensitivity, for_budget=excluded)

        def measure(candidate: onnx.ModelProto = candidate) -> list[float]:
            res = timer.compare([quantized, candidate], config, feeds, around=1.0 - budget)
            return [res.speedups[0].median]

        key = (f"int8 float budget {structure_hash(quantized)} -> "
               f"{structure_hash(candidate)} {config.provider} x{config.threads}")
        (ratio,) = timer.remember(key, measure, in_process=False)
        if ratio < 1.0 - budget:
            break
        new_error = probe.compare(candidate).rel_l2
        tried.append(f"{k}: {ratio:.2f}x, error {new_error:.4g}")
        if new_error < best_error:
            best, best_error, cost = (candidate, candidate_report, excluded), new_error, ratio
        k *= 2
    out, out_report, kept = best
    if kept:
        _carry(report, out_report)
    out_report.metrics["float_budget_layers"] = len(kept)
    out_report.metrics["float_budget_speed"] = round(cost, 3)
    out_report.metrics["float_budget_error"] = round(best_error, 5)
    out_report.note(
        "float_budget",
        f"--float-budget {budget}: {len(kept)} layer(s) left in float, at {cost:.2f}x of the "
        f"all-int8 speed; output error on {probe.calib.num_samples} calibration samples "
        f"{error:.4g} -> {best_error:.4g} (layers in float tried: "
        f"{'; '.join(tried) or 'none within the budget'})")
    return out, out_report, kept


def int8_codes(quantized: onnx.ModelProto, report: Report) -> dict[str, np.ndarray]:
    """The int8 weight of each layer ``report`` quantized, as it is in ``quantized``."""
    inits = {t.name: t for t in quantized.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    nodes = {n.name: n for n in quantized.graph.node}
    codes = {}
    for change in report.applied:
        node = nodes.get(change.node)
        dq = producer.get(node.input[1]) if node is not None and len(node.input) > 1 else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            codes[change.node] = numpy_helper.to_array(inits[dq.input[0]])
    return codes


# What fidelity.bound's metric names mean, for the report.
DROP_METRICS = {
    "decisions": "the share of samples with an argmax decision changed",
    "scores": "1 - the F1 of the score outputs' above-threshold sets",
    "regression": "the relative error of the outputs beside the decisions",
    "top1": "1 - top-1 agreement",
    "rel_l2": "the relative output error",
}
