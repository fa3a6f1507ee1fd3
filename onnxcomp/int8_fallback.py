"""Static int8 within a fidelity bound: which layers stay in float (``quantize --max-drop``).

Layers are ranked by sensitivity (the output error with each alone in int8) and the most
sensitive are left in float, as few as the bound allows. The int8 layers keep the weights
the pass chose for them (after output-error rounding, onnxcomp/rounding.py, so the bound
judges the model that ships, not a nearest-rounded stand-in).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import fidelity, search
from onnxcomp.calibration import Calibration
from onnxcomp.judge import Judge
from onnxcomp.passbase import Report

# Samples each candidate model is judged on, and samples per layer sensitivity.
DROP_SAMPLES, SENSITIVITY_SAMPLES = 256, 32

# build(layers left in float, their sensitivity) -> (model, report)
Build = Callable[..., tuple[onnx.ModelProto, Report]]


def float_layers_for_drop(model: onnx.ModelProto, build: Build, calib: Calibration,
                          quantized: onnx.ModelProto, report: Report, max_drop: float,
                          judge: Judge) -> tuple[onnx.ModelProto, Report]:
    """Leave the most sensitive layers in float until the drop is within ``max_drop``.

    ``quantized`` / ``report``: every layer in int8, as the pass built it (its rounding
    included); ``build(excluded, sensitivity)`` builds the same with ``excluded`` in float.
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
    probe = reference.first(SENSITIVITY_SAMPLES)
    layers = [c.node for c in report.applied]
    sensitivity = {}
    for name in layers:
        alone, _ = build({n for n in layers if n != name})
        sensitivity[name] = probe.compare(alone).rel_l2
    ranked = sorted(layers, key=lambda n: -sensitivity[n])
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
    best_report.notes[:0] = [n for n in report.notes if n not in best_report.notes]
    if "rounding" in report.metrics:
        best_report.metrics["rounding"] = report.metrics["rounding"]
    best_report.metrics["drop_all_layers"] = round(drop, 5)
    best_report.metrics["drop_metric"] = metric
    best_report.metrics["drop"] = round(best_drop, 5)
    best_report.metrics["layers_left_in_float"] = good
    best_report.metrics["models_tried"] = len(tried)
    worst = ", ".join(f"{n} ({sensitivity[n]:.3g})" for n in ranked[:3])
    lost = (f"static int8 of every layer drops fidelity by {drop:.3g} on the calibration data "
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
