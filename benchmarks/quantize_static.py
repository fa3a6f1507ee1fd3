"""onnxcomp static int8 (QDQ) vs ONNX Runtime's quantize_static, same calibration set.

    python benchmarks/quantize_static.py

Writes benchmarks/results/quantize_static.md and .json. Both get the same model (BN folded)
and the same calibration samples; ONNX Runtime's quantizer runs with QDQ format, per-channel
int8 weights, uint8 activations and MinMax calibration (its fastest configuration on this x86
CPU). Latency: ORT CPU, 1 thread, batch 1, each quantized model interleaved with the fp32
original. Fidelity on held-out inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from cases import CASES, fmnist_accuracy, run
from common import calibration, fixed_batch, optimize, speed, write
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

MODELS = {"fashion_mnist_vgg": 128, "mobilenetv2": 64, "efficientnet_lite0": 64,
          "ppocrv4_det": 16, "ppocrv4_rec": 39}


class _Reader(CalibrationDataReader):
    def __init__(self, inputs: dict, n: int) -> None:
        self.items = iter([{k: v[i:i + 1] for k, v in inputs.items()} for i in range(n)])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def main() -> None:
    rows, docs = [], []
    for name, n in MODELS.items():
        case = CASES[name]
        model = case.load()
        cal_in = case.inputs("calib")
        calib = calibration(cal_in, n, fixed_batch=fixed_batch(model))
        folded, _ = optimize(model, [("fold_bn", {})], calib)
        ours, seconds = optimize(model, [("fold_bn", {}), ("quantize", {"mode": "static"})],
                                 calib)
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "ort.onnx"
            onnx.save(folded.model, src)
            quantize_static(str(src), str(dst), _Reader(cal_in, n),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            theirs = onnx.load(str(dst))
        held = case.inputs("heldout")
        ref = run(model, held)
        for label, m in (("onnxcomp", ours.model), ("onnxruntime", theirs)):
            try:
                got = run(m, held)
            except Exception as exc:  # noqa: BLE001 - a quantizer's invalid output is a result
                rows.append([name, label, "-", f"invalid model: {str(exc)[-160:]}", "-"])
                docs.append({"model": name, "tool": label, "error": str(exc)})
                print(rows[-1], flush=True)
                continue
            fid = case.fidelity(ref, got)
            sp = speed(model, m, held, runs=60)
            metric = f"{case.metric} {fid[case.metric]:.1%}"
            if name == "fashion_mnist_vgg":
                metric = f"acc {fmnist_accuracy(m):.2%}; {metric}"
            rows.append([name, label, f"{sp['speedup']:.2f}x ({sp['speedup_p10']:.2f}-"
                         f"{sp['speedup_p90']:.2f})", metric, f"{fid['rel_l2']:.4f}"])
            docs.append({"model": name, "tool": label, **sp, "fidelity": fid})
            print(rows[-1], flush=True)
        del seconds
    pre = ("Static int8 QDQ, onnxcomp (`quantize --mode static`, percentile 99.99) vs "
           "onnxruntime.quantization.quantize_static (QDQ, per-channel, u8/s8, MinMax), same "
           "calibration samples; speedup vs the fp32 model (ORT CPU, 1 thread, batch 1).\n\n")
    path = write("quantize_static", ["model", "quantizer", "speedup vs fp32", "fidelity "
                                     "(held-out)", "rel L2"], rows, docs, pre)
    print(path.read_text())


if __name__ == "__main__":
    main()
