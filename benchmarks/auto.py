"""``--auto`` against every single method at the same target, on held-out data.

    python benchmarks/auto.py [--only NAME ...] [--runs 60] [--no-singles]

Per case: ``--auto`` (run_auto, as ``onnxcomp optimize --auto``) with the case's target and
budget, and, for the targets, each single method with the same target after the same
lossless clean-up. Fidelity on held-out inputs the compiler never saw (Fashion-MNIST: the
10 000 test images); latency ORT CPU, 1 intra-op thread, batch 1, every model of a case
timed interleaved with the original, one pair at a time (median and p10-p90 of the
per-round ratios). Writes results/auto.md and .json.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

from cases import CASES, fmnist_accuracy, run
from common import calibration, fixed_batch, optimize, write

from onnxcomp import benchmark as bench
from onnxcomp import fidelity
from onnxcomp.auto import AutoConfig, run_auto
from onnxcomp.judge import Judge
from onnxcomp.passbase import RunContext

CLEAN = [("canonicalize", {}), ("fold_bn", {}), ("fold_affine", {})]
# PAIRS: every row is timed in its own interleaved A/B pair with the original, as a
# deployment runs one model back to back. Timed all in one interleaved run, ten models evict
# each other from the caches between runs, which costs a small model's fast variant most:
# the Fashion-MNIST net (0.27 ms) measured int8 at 2.68x in a pair and 2.40-2.44x among ten
# models (its original 0.267 -> 0.301 ms), in the same process, twice each.
# (case, calibration samples, --target-speedup, --max-drop, --score-threshold)
RUNS: list[tuple[str, int, float | None, float, float]] = [
    ("fashion_mnist_vgg", 256, 2.0, 0.01, 0.5),
    ("fashion_mnist_vgg", 256, 3.0, 0.02, 0.5),
    ("ppocrv4_det", 64, 1.6, 0.03, 0.3),  # DB's binarization threshold
    ("ppocrv4_rec", 94, None, 0.05, 0.5),  # every calibration crop: 23 held back
    ("efficientnet_lite0", 64, None, 0.05, 0.5),
    ("mobilenetv2", 64, None, 0.05, 0.5),
    ("mtcnn_onet", 64, None, 0.05, 0.5),
]
SINGLES: list[tuple[str, dict[str, Any]]] = [
    ("cp", {}), ("svd", {}), ("tucker", {}), ("kernel_sharing", {}),
    ("depthwise_separable", {}), ("factorize", {}), ("prune_channels", {}),
]


def _fid(name: str, model: Any, out: Any, held: Any) -> dict[str, Any]:
    case = CASES[name]
    fid = case.fidelity(run(model, held), run(out, held))
    if name == "fashion_mnist_vgg":
        fid["accuracy"] = fmnist_accuracy(out)
    return fid


def one_case(name: str, n_calib: int, target: float | None, budget: float, threshold: float,
             runs: int, singles: bool) -> list[dict[str, Any]]:
    case = CASES[name]
    model = case.load()
    calib = calibration(case.inputs("calib"), n_calib, fixed_batch=fixed_batch(model))
    held = case.inputs("heldout")
    docs: list[dict[str, Any]] = []
    start = time.perf_counter()
    judge = Judge(score_threshold=threshold)
    chosen = run_auto(model, calib, AutoConfig(target_speedup=target, max_drop=budget),
                      context=RunContext(judge=judge))
    docs.append({"model": name, "run": "--auto", "target": target, "budget": budget,
                 "result": chosen.result.model, "compile_s": time.perf_counter() - start,
                 "chosen": chosen.chosen, "why": chosen.why, "outcome": chosen.code,
                 "plans": [p.to_dict() for p in chosen.plans]})
    clean, _ = optimize(model, CLEAN, calib)
    docs.append({"model": name, "run": "clean-up alone", "target": None, "budget": None,
                 "result": clean.model, "compile_s": 0.0})
    if singles and target is not None:
        for method, opts in SINGLES:
            options = {**opts, "target_speedup": target}
            try:
                res, seconds = optimize(model, [*CLEAN, (method, options)], calib)
            except Exception as exc:  # a method that cannot run here is a row that says so
                docs.append({"model": name, "run": method, "error": str(exc)})
                continue
            docs.append({"model": name, "run": method, "target": target, "budget": None,
                         "result": res.model, "compile_s": seconds})
        res, seconds = optimize(model, [*CLEAN, ("quantize", {"max_drop": budget})], calib)
        docs.append({"model": name, "run": "quantize (int8)", "target": None, "budget": budget,
                     "result": res.model, "compile_s": seconds})
    timed = [d for d in docs if "result" in d]
    reference = fidelity.Reference.of(model, calib, judge)  # every row's loss, judged alike
    for d in timed:
        d["calib_drop"] = fidelity.bound(reference.compare(d["result"]))
    feeds = {k: v[:1] for k, v in held.items()}
    cfg = bench.BenchConfig(threads=1, runs=runs, warmup=5)
    for d in timed:  # each row against the original, an interleaved pair (see PAIRS)
        s = bench.benchmark([model, d["result"]], cfg, inputs=feeds).speedups[0]
        d.update(speedup=s.median, p10=s.p10, p90=s.p90,
                 fidelity=_fid(name, model, d.pop("result"), held))
    return docs


def row(d: dict[str, Any]) -> list[Any]:
    if "error" in d:
        return [d["model"], d["run"], "-", "-", "-", "-", f"failed: {d['error'][:80]}", "-"]
    case = CASES[d["model"]]
    fid = d["fidelity"]
    held = f"{case.metric} {fid[case.metric]:.1%}"
    if "accuracy" in fid:
        held = f"acc {fid['accuracy']:.2%}; " + held
    setting = []
    if d.get("target"):
        setting.append(f"--target-speedup {d['target']:g}")
    if d.get("budget") is not None:
        setting.append(f"--max-drop {d['budget']:g}")
    calib = d.get("calib_drop")
    return [d["model"], d["run"] + (f" -> {d['chosen']}" if "chosen" in d else ""),
            ", ".join(setting) or "-",
            f"{d['speedup']:.2f}x ({d['p10']:.2f}-{d['p90']:.2f})",
            f"{calib[0]:.4f} ({calib[1]})" if calib else "-", held,
            d.get("outcome", ""), f"{d['compile_s']:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--no-singles", action="store_true")
    args = ap.parse_args()
    docs: list[dict[str, Any]] = []
    for name, n, target, budget, threshold in RUNS:
        if args.only and name not in args.only:
            continue
        docs += one_case(name, n, target, budget, threshold, args.runs, not args.no_singles)
        print("\n".join(" | ".join(map(str, row(d))) for d in docs[-3:]), flush=True)
    pre = ("`--auto` (onnxcomp optimize --auto) beside the clean-up alone and each single "
           "method at the same target (after the same clean-up). Loss on the calibration data "
           "is `fidelity.bound` (what --max-drop bounds; det's score sets at "
           "--score-threshold 0.3, DB's threshold); held-out fidelity on inputs the "
           "compiler never saw (Fashion-MNIST: the 10 000 test images, accuracy before "
           f"{fmnist_accuracy(CASES['fashion_mnist_vgg'].load()):.2%}). Latency ORT CPU 1 "
           f"thread batch 1, {args.runs} interleaved rounds per pair (each model against the "
           f"original); {platform.machine()}."
           "\n\n")
    headers = ["model", "run", "setting", "speedup (p10-p90)", "loss on calibration (metric)",
               "held-out fidelity", "outcome", "compile s"]
    path = write("_".join(["auto", *(args.only or [])]), headers, [row(d) for d in docs],
                 docs, pre)
    print(path.read_text())


if __name__ == "__main__":
    main()
