"""Weight quantization file sizes and fidelity on real models.

    python benchmarks/quantize.py

Writes benchmarks/results/quantize.md and .json: per model and setting, the serialized model
size vs the original (after fold_bn), the Huffman-coded size of k-means indices (Deep
Compression's storage figure: codebooks + Huffman-coded indices + everything that was not
quantized) and fidelity on held-out inputs. Latency is unchanged by design (ONNX Runtime folds
the constant dequantization at load), so it is not timed here.
"""

from __future__ import annotations

from typing import Any

from cases import CASES, fmnist_accuracy, run
from common import calibration, fixed_batch, optimize, write

SETTINGS: list[dict[str, Any]] = [
    {"mode": "weight", "bits": 8}, {"mode": "weight", "bits": 4},
    {"mode": "kmeans", "bits": 8}, {"mode": "kmeans", "bits": 4},
    {"mode": "binary"},  # experimental: BWN without training
]
MODELS = ("fashion_mnist_vgg", "efficientnet_lite0", "mobilenetv2", "ppocrv4_det", "ppocrv4_rec")


def main() -> None:
    rows, docs = [], []
    for name in MODELS:
        case = CASES[name]
        model = case.load()
        calib = calibration(case.inputs("calib"), 8, fixed_batch=fixed_batch(model))
        base, _ = optimize(model, [("fold_bn", {})], calib)
        base_size = base.model.ByteSize()
        held = case.inputs("heldout")
        ref = run(model, held)
        for opts in SETTINGS:
            result, seconds = optimize(model, [("fold_bn", {}), ("quantize", dict(opts))],
                                       calib)
            report = result.steps[-1].report
            size = result.model.ByteSize()
            fid = case.fidelity(ref, run(result.model, held))
            huff = ""
            if opts["mode"] == "kmeans":
                saved = sum(c.details["bytes_after"] - c.details["huffman_bytes"]
                            - c.details["centroids"] * 4 for c in report.applied)
                huff = f"{(size - saved) / 1e6:.2f} MB ({base_size / (size - saved):.1f}x)"
            if opts["mode"] == "binary":  # the signs packed 8 per byte
                saved = sum(c.details["bytes_after"] - c.details["packed_bytes"]
                            for c in report.applied)
                huff = f"{(size - saved) / 1e6:.2f} MB ({base_size / (size - saved):.1f}x)"
            metric = f"{case.metric} {fid[case.metric]:.1%}"
            if name == "fashion_mnist_vgg":
                metric = f"acc {fmnist_accuracy(result.model):.2%}; {metric}"
            setting = f"{opts['mode']} {opts.get('bits', 1)}-bit"
            notes = "; ".join(report.notes)
            rows.append([name, setting, len(report.applied), f"{base_size / 1e6:.2f} MB",
                         f"{size / 1e6:.2f} MB ({base_size / size:.1f}x)", huff or "-",
                         metric, f"{fid['rel_l2']:.4f}", notes or "-"])
            docs.append({"model": name, **opts, "size": size, "base_size": base_size,
                         "fidelity": fid, "seconds": seconds, "notes": report.notes,
                         "applied": len(report.applied)})
            print(rows[-1], flush=True)
    pre = ("quantize after fold_bn: serialized size vs the fp32 model (BN folded); fidelity on "
           "held-out inputs. k-means: the size with Huffman-coded indices; binary "
           "(experimental, no training): the size with the signs packed 8 per byte (the file "
           "stores them as int8).\n\n")
    path = write("quantize", ["model", "setting", "layers", "fp32", "quantized",
                              "Huffman-coded / 1-bit packed", "fidelity (held-out)", "rel L2",
                              "notes"],
                 rows, docs, pre)
    print(path.read_text())


if __name__ == "__main__":
    main()
