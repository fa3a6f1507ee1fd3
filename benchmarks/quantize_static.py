"""onnxcomp static int8 (QDQ) vs ONNX Runtime's quantize_static, same calibration set.

    python benchmarks/quantize_static.py [model ...]

Writes benchmarks/results/quantize_static.md and .json (``quantize_static_<names>`` when models
are named: a filtered run never replaces the full table).
Both get the same model (BN folded; opset-12 models upgraded to 13 by onnx's version
converter, which ORT's quantizer needs for per-channel weights and does not do itself) and the
same calibration samples. ONNX Runtime's quantizer runs with QDQ format, per-channel int8
weights, uint8 activations and MinMax calibration (its fastest configuration on this x86
CPU), with and without ``reduce_range`` (7-bit weights, its advice for x86 without VNNI,
which onnxcomp follows by itself). onnxcomp runs with each calibrator (percentile 99.99 is
the default) and with ``--max-drop`` (the bound per model in MAX_DROP). Latency: ORT CPU,
1 thread, batch 1, every quantized model of one model timed in one interleaved run with the
fp32 original. Fidelity on held-out inputs.

NNCF (``nncf.quantize``, ONNX backend, its defaults: symmetric int8 activations, per-channel
weights, fast bias correction; the ``peers`` extra installs it) gets the same BN-folded model
and samples: the post-training anchor the issue measures against.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import nncf
import onnx
from cases import CASES, fmnist_accuracy, run
from common import calibration, fixed_batch, optimize, write
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from onnxcomp import benchmark as bench

MODELS = {"fashion_mnist_vgg": 128, "mobilenetv2": 64, "efficientnet_lite0": 64,
          "ppocrv4_det": 64, "ppocrv4_rec": 94}
# --max-drop per model (a row each): classifiers bound the top-1 disagreement on the
# calibration data, the OCR models the relative output error.
MAX_DROP = {"fashion_mnist_vgg": (0.01,), "mobilenetv2": (0.1, 0.05),
            "efficientnet_lite0": (0.1,), "ppocrv4_det": (0.1,), "ppocrv4_rec": (0.1,)}
# The calibrator rows quantize every layer (no --max-drop bound), with output-error rounding
# and bias correction (the defaults) and, once each, without (their own contributions);
# "default" is what a plain `quantize` does (percentile, --max-drop 0.2); "max-drop" the
# per-model bound above.
UNBOUNDED = {"max_drop": math.inf}
OURS = [("percentile", UNBOUNDED),
        ("percentile, no bias correction", {"bias_correction": False, **UNBOUNDED}),
        ("percentile, no rounding", {"rounding": False, **UNBOUNDED}),
        ("percentile, no per-layer speed", {"keep_fast": False, **UNBOUNDED}),
        ("percentile, CLE through activations", {"through_activations": True, **UNBOUNDED}),
        ("entropy", {"calibrator": "entropy", **UNBOUNDED}),
        ("mse", {"calibrator": "mse", **UNBOUNDED}),
        ("minmax", {"calibrator": "minmax", **UNBOUNDED}),
        ("float-budget 0.1", {"float_budget": 0.1, **UNBOUNDED}),
        ("float-budget 0.2", {"float_budget": 0.2, **UNBOUNDED}),
        ("float-budget 0.3", {"float_budget": 0.3, **UNBOUNDED}),
        ("default (max-drop 0.2)", {}), ("max-drop", {})]
# Photo models: also scored on 512 more held-out crops (64 put a standard error of about 4.5
# points on an agreement near 85 %).
LARGE_HELDOUT = {"mobilenetv2", "efficientnet_lite0"}


class _Reader(CalibrationDataReader):
    def __init__(self, inputs: dict, n: int) -> None:
        self.items = iter([{k: v[i:i + 1] for k, v in inputs.items()} for i in range(n)])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def main() -> None:
    names = sys.argv[1:] or list(MODELS)
    rows, docs = [], []
    for name in names:
        n = MODELS[name]
        case = CASES[name]
        model = case.load()
        cal_in = case.inputs("calib")
        calib = calibration(cal_in, n, fixed_batch=fixed_batch(model))
        folded, _ = optimize(model, [("fold_bn", {})], calib)
        candidates = []
        runs = [(lb, o) for lb, o in OURS if lb != "max-drop"] + [
            (f"max-drop {bound}", {"max_drop": bound}) for bound in MAX_DROP[name]]
        for label, opts in runs:
            opts = dict(opts)
            steps = [("fold_bn", {})]
            if opts.pop("through_activations", False):  # equalize's option, run before
                steps += [("equalize", {"through_activations": True})]
                opts["equalize"] = False
            ours, seconds = optimize(
                model, [*steps, ("quantize", {"mode": "static", **opts})], calib)
            metrics = ours.steps[-1].report.metrics
            kept = metrics.get("layers_left_in_float", metrics.get("float_budget_layers"))
            extra = f", {kept} layers left in float" if kept is not None else ""
            candidates.append((f"onnxcomp {label}{extra}", ours.model, seconds))
        src_model = folded.model
        if src_model.opset_import[0].version < 13:
            src_model = version_converter.convert_version(src_model, 13)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "in.onnx"
            onnx.save(src_model, src)
            for reduce in (False, True):  # 7-bit weights: ORT's advice for AVX2 without VNNI
                dst = Path(tmp) / f"ort{int(reduce)}.onnx"
                quantize_static(str(src), str(dst), _Reader(cal_in, n),
                                quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=reduce, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
                label = "onnxruntime MinMax" + (", reduce_range" if reduce else "")
                candidates.append((label, onnx.load(str(dst)), 0.0))
        items = [{k: v[i:i + 1] for k, v in cal_in.items()} for i in range(n)]
        start = time.perf_counter()
        peer = nncf.quantize(src_model, nncf.Dataset(items), subset_size=n)
        candidates.append(("nncf 3.4 defaults", peer, time.perf_counter() - start))
        start = time.perf_counter()  # asymmetric (uint8) activations, like the others
        peer = nncf.quantize(src_model, nncf.Dataset(items), subset_size=n,
                             preset=nncf.QuantizationPreset.MIXED)
        candidates.append(("nncf 3.4 mixed preset", peer, time.perf_counter() - start))
        held = case.inputs("heldout")
        ref = run(model, held)
        large = case.inputs("heldout512") if name in LARGE_HELDOUT else None
        ref_large = run(model, large) if large is not None else None
        valid = []
        for label, m, seconds in candidates:
            try:
                got = run(m, held)
            except Exception as exc:  # noqa: BLE001 - a quantizer's invalid output is a result
                rows.append([name, label, "-", f"invalid model: {str(exc)[-160:]}", "-", "-"])
                docs.append({"model": name, "tool": label, "error": str(exc)})
                print(rows[-1], flush=True)
                continue
            fid = case.fidelity(ref, got)
            if large is not None:
                fid[f"{case.metric}_512"] = case.fidelity(ref_large, run(m, large))[case.metric]
            valid.append((label, m, seconds, fid))
        # Every quantized model of this model in one interleaved run with the fp32 original.
        feeds = {k: v[:1] for k, v in held.items()}
        res = bench.benchmark([model, *(v[1] for v in valid)],
                              bench.BenchConfig(threads=1, runs=60, warmup=5), inputs=feeds)
        for (label, m, seconds, fid), sp in zip(valid, res.speedups, strict=True):
            metric = f"{case.metric} {fid[case.metric]:.1%}"
            if f"{case.metric}_512" in fid:
                metric += f" (512 crops: {fid[f'{case.metric}_512']:.1%})"
            if name == "fashion_mnist_vgg":
                metric = f"acc {fmnist_accuracy(m):.2%}; {metric}"
            rows.append([name, label, f"{sp.median:.2f}x ({sp.p10:.2f}-{sp.p90:.2f})", metric,
                         f"{fid['rel_l2']:.4f}", f"{seconds:.0f}"])
            docs.append({"model": name, "tool": label, "speedup": sp.median,
                         "speedup_p10": sp.p10, "speedup_p90": sp.p90, "fidelity": fid,
                         "compile_s": seconds})
            print(rows[-1], flush=True)
    pre = ("Static int8 QDQ, onnxcomp (`quantize --mode static`, per calibrator, and with "
           "`--max-drop`) vs onnxruntime.quantization.quantize_static (QDQ, per-channel, "
           "u8/s8, MinMax, with and without reduce_range), same calibration samples; "
           "speedup vs the fp32 model (ORT CPU, "
           "1 thread, batch 1; all quantized models of a row group timed in one interleaved "
           "run with the fp32 original). `--max-drop`: classifiers bound 1 - top-1 "
           "agreement on the calibration data, the OCR models the relative output "
           "error. The calibrator rows quantize every layer (`--max-drop inf`); the default "
           "row is a plain `quantize` (percentile, `--max-drop 0.2`); every onnxcomp row "
           "but one leaves in float the layers int8 measures slower (`--per-layer-speed`, "
           "the default). NNCF 3.4: `nncf.quantize` with its defaults (symmetric int8 "
           "activations) and with its mixed preset (asymmetric uint8 activations, as the "
           "others) on the same BN-folded model and samples. `--float-budget F`: the most "
           "sensitive layers stay in float while the model keeps 1 - F of the all-int8 "
           "speed. Photo models: top-1 agreement on the 64 held-out crops and, in brackets, "
           "on 512 more crops of the same held-out images.\n\n")
    stem = "_".join(["quantize_static", *sys.argv[1:]])
    path = write(stem, ["model", "quantizer", "speedup vs fp32", "fidelity (held-out)",
                        "rel L2", "compile s"], rows, docs, pre)
    print(path.read_text())


if __name__ == "__main__":
    main()
