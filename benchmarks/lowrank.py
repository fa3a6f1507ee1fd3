"""Low-rank decomposition (cp, tucker, svd) on real models: speed, MACs, fidelity, compile time.

    python benchmarks/lowrank.py                       # every row (about 15 minutes here)
    python benchmarks/lowrank.py --only fashion_mnist_vgg --methods cp
    python benchmarks/lowrank.py --sharing             # kernel sharing vs separable vs cp

Writes benchmarks/results/lowrank.md and .json. Every row: canonicalize + fold_bn + fold_affine
(lossless) + the method with ``--rank auto`` and the row's setting, in one run (a speed target
is for the whole run, so the method aims at what the front leaves to reach), calibrated on the
model's ``calib`` inputs; fidelity on ``heldout`` inputs never seen by the compiler (Fashion-
MNIST: accuracy on all 10 000 test images). Latency: ORT CPU, 1 intra-op thread, batch 1,
original and optimized interleaved in one process, median of the per-round ratios (p10-p90).
``realized`` is the measured speedup divided by the MAC reduction (1.0: every MAC saved is time
saved), for the whole model (the method's speedup over the lossless front, whose own gain is a
column of its own; untouched layers dilute it) and the median over the rewritten layers' micro-
benchmarks."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

from cases import CASES, fmnist_accuracy, run
from common import RESULTS, calibration, fixed_batch, macs, optimize, params, write

from onnxcomp import benchmark as bench

# (model, method, options, calibration samples)
ROWS: list[tuple[str, str, dict[str, Any], int]] = [
    *[("fashion_mnist_vgg", m, {"target_speedup": 2.0}, 256) for m in ("cp", "tucker", "svd")],
    ("fashion_mnist_vgg", "cp", {"target_speedup": 2.0, "cp_depthwise": "separate"}, 256),
    ("fashion_mnist_vgg", "tucker", {"target_speedup": 2.0, "basis": "weights"}, 256),
    *[("ppocrv4_rec", m, {"target_speedup": 1.5}, 94) for m in ("cp", "tucker", "svd")],
    # What the decision-agreement floor (default 0.97 on the calibration crops) holds back.
    *[("ppocrv4_rec", "svd", {"target_speedup": 1.5, "min_agreement": a}, 94)
      for a in (0.9, 0.0)],
    ("ppocrv4_rec", "svd", {"target_speedup": 1.5, "min_agreement": 0.0, "sensitivity": False},
     94),
    ("ppocrv4_rec", "svd", {"max_error": 0.03, "min_agreement": 0.0}, 94),
    *[("ppocrv4_det", m, {"target_speedup": 1.5}, 16) for m in ("cp", "svd")],
    *[("ppocrv4_det", m, {"target_speedup": 1.5, "sensitivity": False}, 16)
      for m in ("cp", "svd")],
    ("ppocrv4_det", "cp", {"target_speedup": 1.5, "cp_depthwise": "separate"}, 16),
    *[(name, m, {}, 64) for name in ("efficientnet_lite0", "mobilenetv2")
      for m in ("cp", "tucker", "svd")],
    *[(name, "svd", {"max_error": 0.3, **floor}, 64)
      for name in ("efficientnet_lite0", "mobilenetv2")
      for floor in ({}, {"min_agreement": 0.0})],
    *[("mtcnn_onet", m, {}, 64) for m in ("cp", "svd")],
]

# Kernel sharing vs depthwise-separable vs cp at the same measured-speedup target.
SHARING: list[tuple[str, str, dict[str, Any], int]] = [
    # Every method at the same speed target: no decision-agreement floor (it would stop each
    # at a different speed).
    (name, method, {**opts, "target_speedup": target, "min_agreement": 0.0}, n)
    for name, target, n in (("fashion_mnist_vgg", 2.0, 256), ("mtcnn_rnet", 1.5, 64),
                            ("mtcnn_onet", 1.5, 64))
    for method, opts in (("kernel_sharing", {"weighted": False}),
                         ("kernel_sharing", {"weighted": True}),
                         ("depthwise_separable", {}),
                         ("depthwise_separable", {"share_groups": 16}),
                         ("cp", {}))
]


def _setting(opts: dict[str, Any]) -> str:
    if not opts:
        return "auto (default bound)"
    return ", ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v))}" if isinstance(v, list)
                     else f"--{k.replace('_', '-')} {v}" for k, v in opts.items())


def bench_row(name: str, method: str, opts: dict[str, Any], n_calib: int,
              runs: int) -> tuple[list[Any], dict[str, Any]]:
    case = CASES[name]
    model = case.load()
    calib = calibration(case.inputs("calib"), n_calib, fixed_batch=fixed_batch(model))
    front_steps = [("canonicalize", {}), ("fold_bn", {}), ("fold_affine", {})]
    front, _ = optimize(model, front_steps, calib)
    # One run of front and method, as a user would write it: the speed target is for the whole
    # run (vs the original), so the method aims at what the front leaves to reach.
    result, compile_s = optimize(model, [*front_steps, (method, dict(opts))], calib)
    held = case.inputs("heldout")
    fid = case.fidelity(run(model, held), run(result.model, held))
    # Original, lossless front and result interleaved: the speedup is vs the original; the
    # method's own share (vs the front) is what its MAC cut should be compared with.
    feeds = {k: v[:1] for k, v in held.items()}
    res = bench.benchmark([model, front.model, result.model],
                          bench.BenchConfig(threads=1, runs=runs, warmup=5), inputs=feeds)
    total = res.speedups[1]
    sp = {"ms_before": res.models[0].median_ms, "ms_front": res.models[1].median_ms,
          "ms_after": res.models[2].median_ms, "speedup": total.median,
          "speedup_p10": total.p10, "speedup_p90": total.p90,
          "front_speedup": res.speedups[0].median,
          "method_speedup": res.models[1].median_ms / res.models[2].median_ms}
    mac_ratio = macs(front.model, held) / max(macs(result.model, held), 1)
    report = result.steps[-1].report
    doc: dict[str, Any] = {
        "model": name, "method": method, "options": opts, "calib_samples": n_calib,
        "compile_s": compile_s, "macs_ratio": mac_ratio,
        "params_ratio": params(model) / max(params(result.model), 1),
        "realized": sp["method_speedup"] / mac_ratio, "fidelity": fid, **sp,
        "applied": [c.to_dict() for c in report.applied], "notes": report.notes,
        "metrics": report.metrics,
    }
    if name == "fashion_mnist_vgg":
        doc["accuracy"] = {"before": fmnist_accuracy(model),
                           "after": fmnist_accuracy(result.model)}
    # Per layer, in context (what a one-layer model pays at its edges taken off both timings).
    doc["layer_realized"] = sorted(c.details["realized"] for c in report.applied
                                   if c.details.get("realized"))
    return row_of(doc), doc


def row_of(doc: dict[str, Any]) -> list[Any]:
    """One table row from a result document."""
    metric = CASES[doc["model"]].metric
    fidelity = f"{metric} {doc['fidelity'][metric]:.1%}"
    if "string_match_text" in doc["fidelity"]:
        fidelity += (f" (text crops {doc['fidelity']['string_match_text']:.1%} of "
                     f"{doc['fidelity']['text_crops']:.0f}")
        if "string_match_nospace" in doc["fidelity"]:
            fidelity += f"; ignoring spaces {doc['fidelity']['string_match_nospace']:.1%}"
        fidelity += ")"
    if "accuracy" in doc:
        acc = doc["accuracy"]
        fidelity = f"acc {acc['before']:.2%} -> {acc['after']:.2%}; {fidelity}"
    lr = doc.get("layer_realized") or []
    median_layer = f"{lr[len(lr) // 2]:.2f}" if lr else "-"
    return [doc["model"], doc["method"], _setting(doc["options"]), len(doc["applied"]),
            f"{doc['speedup']:.2f}x ({doc['speedup_p10']:.2f}-{doc['speedup_p90']:.2f})",
            f"{doc.get('front_speedup', 1.0):.2f}x",
            f"{doc['macs_ratio']:.2f}x", f"{doc['params_ratio']:.2f}x",
            f"{doc['realized']:.2f} / {median_layer}", fidelity,
            f"{doc['fidelity']['rel_l2']:.3f}", f"{doc['compile_s']:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--only", nargs="*", help="model names")
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--sharing", action="store_true",
                        help="the kernel-sharing comparison (results/sharing.md) instead")
    parser.add_argument("--render", action="store_true",
                        help="re-render the Markdown table from the saved JSON only")
    args = parser.parse_args()
    rows, docs = [], []
    if args.render:
        docs = json.loads((RESULTS / f"{'sharing' if args.sharing else 'lowrank'}.json")
                          .read_text())
        rows = [row_of(d) for d in docs]
    for name, method, opts, n in ([] if args.render else SHARING if args.sharing else ROWS):
        if (args.only and name not in args.only) or (args.methods and method not in args.methods):
            continue
        row, doc = bench_row(name, method, opts, n, args.runs)
        rows.append(row)
        docs.append(doc)
        print(" | ".join(str(c) for c in row), flush=True)
    pre = ("Low-rank passes with `--rank auto`, after canonicalize + fold_bn + fold_affine "
           "in the same run (lossless; speedups are vs the original, so they include what "
           "those bring: see spine.md; a speed target is for the whole run, so the method "
           "aims at what the clean-up leaves). Sensitivity weighting is on unless the row "
           "says `--sensitivity False`. Fidelity on "
           "held-out inputs; latency ORT CPU 1 thread batch 1, interleaved, "
           f"{args.runs} rounds; {platform.machine()} ({platform.processor() or 'cpu'}).\n\n")
    headers = ["model", "method", "setting", "layers", "speedup (p10-p90)",
               "of which lossless front", "MACs ratio",
               "params ratio", "realized model / layers", "fidelity (held-out)",
               "rel L2 (held-out)", "compile s"]
    name = "sharing" if args.sharing else "lowrank"
    if args.only or args.methods:
        name += "_partial"  # a filtered run never replaces the full table
    path = write(name, headers, rows, docs, pre)
    print(path.read_text())


if __name__ == "__main__":
    main()
