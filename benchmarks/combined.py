"""Structural passes followed by static int8, on the Fashion-MNIST net, next to each alone.

    python benchmarks/combined.py

Writes benchmarks/results/combined.md and .json. Every row starts from the same fp32 model
and the same 256 calibration images; each structural pass aims at a measured 2x (one more
row: CP aimed at 1.6x), then
``quantize --mode static`` (percentile) runs on its output, with activation ranges calibrated
on the compressed graph, once on every layer and once with ``--max-drop 0.01`` (the most
sensitive layers stay in float until at most 1 % of the calibration images change class).
Latency: ORT CPU, 1 thread, batch 1, interleaved with the original
in one process (median of per-round ratios). Accuracy on the 10 000 test images.
"""

from __future__ import annotations

from cases import CASES, fmnist_accuracy
from common import calibration, fixed_batch, optimize, params, speed, write

NAME = "fashion_mnist_vgg"
STATIC = ("quantize", {"mode": "static"})
GUARDED = ("quantize", {"mode": "static", "max_drop": 0.01})
STRUCTURAL = {
    "cp": ("cp", {"rank": "auto", "target_speedup": 2.0}),
    "tucker": ("tucker", {"rank": "auto", "target_speedup": 2.0}),
    "prune_channels": ("prune_channels", {"target_speedup": 2.0}),
}
# int8 multiplies what the structural pass saved: a lighter CP (aimed at 1.6x) then int8
# lands past 2.5x with less of the chains' int8 loss than CP aimed at 2x.
LIGHT_CP = ("cp", {"rank": "auto", "target_speedup": 1.6})
RECIPES = [("int8 static", [STATIC])] + [
    row for label, step in STRUCTURAL.items()
    for row in ((label, [step]), (f"{label} + int8 static", [step, STATIC]),
                (f"{label} + int8 static --max-drop 0.01", [step, GUARDED]))] + [
    ("cp (aimed at 1.6x) + int8 static", [LIGHT_CP, STATIC])]


def main() -> None:
    case = CASES[NAME]
    model = case.load()
    calib = calibration(case.inputs("calib"), 256, fixed_batch=fixed_batch(model))
    held = case.inputs("heldout")
    base_acc = fmnist_accuracy(model)
    rows = [["fp32 original", "1.00x", "1.00", f"{base_acc:.2%}", "0.00"]]
    docs = [{"recipe": "original", "accuracy": base_acc}]
    for label, steps in RECIPES:
        result, seconds = optimize(model, [("fold_bn", {}), *steps], calib)
        out = result.model
        sp = speed(model, out, held, runs=80)
        acc = fmnist_accuracy(out)
        size = out.ByteSize() / model.ByteSize()
        rows.append([label, f"{sp['speedup']:.2f}x ({sp['speedup_p10']:.2f}-"
                     f"{sp['speedup_p90']:.2f})", f"{size:.3f}", f"{acc:.2%}",
                     f"{(acc - base_acc) * 100:+.2f}"])
        docs.append({"recipe": label, **sp, "size_ratio": size, "accuracy": acc,
                     "params": params(out), "compile_s": seconds})
        print(rows[-1], flush=True)
    pre = ("Fashion-MNIST VGG-style net: structural pass (measured target 2x), static int8, "
           "and both in sequence. Speedup vs the fp32 original (ORT CPU, 1 thread, batch 1, "
           "interleaved; p10-p90 of the per-round ratio), size as a share of the original "
           "file, accuracy on the 10 000 test images.\n\n")
    path = write("combined", ["recipe", "speedup", "size", "accuracy", "loss (points)"],
                 rows, docs, pre)
    print(path.read_text())


if __name__ == "__main__":
    main()
