"""Static int8 on a SiLU detector: onnxcomp vs ONNX Runtime's quantizer, node by node.

    python benchmarks/int8_silu.py [--size 320] [--runs 60]

The model is models/yolo_style.py (YOLOv8n layout, BN statistics set on photos; built on
first use). Both quantizers get the same 32 calibration photos. For each quantized model the
script times it against the float one (ORT CPU, 1 thread, batch 1, interleaved) and counts
the ops of the graph ONNX Runtime actually runs (its optimized graph, saved by the session):
which ops run as integer kernels (QLinear*, and MaxPool / Resize / Split / Concat between
quantize and dequantize nodes) and which stay float. The ORT quantizer's QDQ graph differs
from onnxcomp's in which tensors it quantizes; the census says which of those ORT turns into
integer kernels, and the timing what each is worth.

Writes benchmarks/results/int8_silu.md and .json.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from common import optimize, write
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from onnxcomp import benchmark as bench
from onnxcomp import fidelity
from onnxcomp.calibration import Calibration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
import paths  # noqa: E402
import yolo_style  # noqa: E402

CALIB = 32
# Ops whose kind (integer or float) the census reports.
WATCH = ("Conv", "Sigmoid", "Mul", "Add", "Concat", "Split", "MaxPool", "Resize", "Softmax",
         "Reshape", "Transpose")


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.items = iter([{"images": x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def census(model: onnx.ModelProto, tmp: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs for ``model`` (after its own fusions)."""
    src, dst = tmp / "census_in.onnx", tmp / "census_out.onnx"
    onnx.save(model, src)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(str(dst)).graph.node))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--runs", type=int, default=60)
    args = ap.parse_args()
    path = paths.cache_dir() / f"yolo_style_{args.size}.onnx"
    if not path.exists():
        yolo_style.export(path, args.size)
    model = onnx.load(str(path))
    calib_x = yolo_style.photo_batch("calib", args.size)[:CALIB]
    held_x = yolo_style.photo_batch("heldout", args.size)
    calib = Calibration([{"images": calib_x[i:i + 1]} for i in range(CALIB)], False,
                        "photos")
    held = Calibration([{"images": held_x[i:i + 1]} for i in range(len(held_x))], False,
                       "photos (held out)")
    candidates: list[tuple[str, onnx.ModelProto]] = []
    for label, opts in (("onnxcomp static int8 (every layer)", {"max_drop": float("inf")}),
                        ("onnxcomp static int8, --no-per-layer-speed",
                         {"max_drop": float("inf"), "keep_fast": False}),
                        ("onnxcomp static int8, --no-int8-elementwise (as before)",
                         {"max_drop": float("inf"), "elementwise": False}),
                        ("onnxcomp static int8, --activations int8 (s8 x s8)",
                         {"max_drop": float("inf"), "activations": "int8"})):
        res, _ = optimize(model, [("quantize", {"mode": "static", **opts})], calib)
        candidates.append((label, res.model))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dst = tmp / "ort.onnx"
        quantize_static(str(path), str(dst), _Reader(calib_x), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        candidates.append(("onnxruntime quantize_static (QDQ, MinMax)", onnx.load(str(dst))))
        counts = {"float": census(model, tmp)}
        counts.update({label: census(m, tmp) for label, m in candidates})
    reference = fidelity.Reference.of(model, held)
    res = bench.benchmark([model, *(m for _, m in candidates)],
                          bench.BenchConfig(threads=1, runs=args.runs, warmup=5),
                          inputs={"images": held_x[:1]})
    rows, docs = [], []
    for (label, m), sp in zip(candidates, res.speedups, strict=True):
        fid = reference.compare(m)
        drop, metric = fidelity.bound(fid)
        c = counts[label]
        integer = ", ".join(f"{op} {n}" for op, n in sorted(c.items())
                            if op.startswith("QLinear") or op.startswith("QGemm"))
        left = ", ".join(f"{op} {c[op]}" for op in WATCH if c.get(op))
        rows.append([label, f"{sp.median:.2f}x ({sp.p10:.2f}-{sp.p90:.2f})",
                     f"{fid.rel_l2:.4f}", f"{drop:.3f} ({metric})",
                     f"{c.get('QuantizeLinear', 0)} / {c.get('DequantizeLinear', 0)}",
                     integer, left])
        docs.append({"quantizer": label, "speedup": sp.median, "p10": sp.p10, "p90": sp.p90,
                     "rel_l2": fid.rel_l2, "drop": drop, "drop_metric": metric,
                     "ops": c})
        print(rows[-1], flush=True)
    docs.append({"quantizer": "float", "ops": counts["float"]})
    pre = (f"Static int8 on a YOLOv8n-style SiLU detector (models/yolo_style.py, "
           f"{args.size}x{args.size}, BN statistics set on photos; not a trained detector, so "
           f"fidelity here is the output error on 64 held-out photos, not detections), "
           f"{CALIB} calibration photos. Speedup vs fp32, ORT CPU, 1 thread, batch 1, "
           f"interleaved. Ops: the graph ONNX Runtime runs after its own fusions "
           f"(ORT_ENABLE_ALL); 'float ops' counts the watched ops still in float "
           f"(a MaxPool / Resize / Split / Concat between quantize and dequantize nodes runs "
           f"on uint8). Float model ops: "
           + ", ".join(f"{op} {n}" for op, n in sorted(counts["float"].items())) + ".\n\n")
    out = write("int8_silu", ["quantizer", "speedup vs fp32", "rel L2 (held-out)",
                              "fidelity.bound", "Q / DQ nodes", "integer kernels",
                              "float ops"], rows, docs, pre)
    print(out.read_text())


if __name__ == "__main__":
    main()
