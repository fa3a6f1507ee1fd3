"""canonicalize + fold_bn + fold_affine on every real model: validity, fidelity, speed.

    python benchmarks/spine.py [--runs 60]

Writes benchmarks/results/spine.md. Latency: ORT CPU, 1 intra-op thread, batch 1, original
and optimized runs interleaved in one process; the speedup is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
from cases import CASES, run
from common import calibration, fixed_batch, optimize, speed, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    rows, doc = [], {}
    for name, case in CASES.items():
        if args.only and name not in args.only:
            continue
        model = case.load()
        calib_in = case.inputs("calib")
        calib = calibration(calib_in, 8, fixed_batch=fixed_batch(model))
        result, seconds = optimize(model, [("canonicalize", {}), ("fold_bn", {}),
                                                  ("fold_affine", {})], calib)
        held = case.inputs("heldout")
        ref, got = run(model, held), run(result.model, held)
        rel = max(float(np.linalg.norm(g - r) / np.linalg.norm(r))
                  for r, g in zip(ref, got, strict=True))
        bn_before = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        bn_after = sum(n.op_type == "BatchNormalization" for n in result.model.graph.node)
        sp = speed(model, result.model, held, runs=args.runs)
        applied = {s.name: len(s.report.applied) for s in result.steps}
        fused = sum(c.op_type == "HardSwish" for c in result.steps[0].report.applied)
        rows.append([name, applied["canonicalize"], fused, f"{bn_before} -> {bn_after}",
                     applied["fold_affine"],
                     f"{rel:.1e}", f"{sp['ms_before']:.2f}", f"{sp['ms_after']:.2f}",
                     f"{sp['speedup']:.2f}x ({sp['speedup_p10']:.2f}-{sp['speedup_p90']:.2f})",
                     f"{seconds:.1f}"])
        doc[name] = {"applied": applied, "bn": [bn_before, bn_after], "rel_l2_heldout": rel,
                     **sp, "compile_s": seconds}
        print(rows[-1], flush=True)
    pre = (f"canonicalize + fold_bn + fold_affine, held-out real inputs; ORT CPU 1 thread batch 1, "
           f"{args.runs} interleaved rounds; {platform.machine()}, {platform.processor()}\n\n")
    path = write("spine", ["model", "canonicalize changes", "HardSwish fused",
                           "BatchNormalization", "Mul/Add folded",
                           "rel L2 error (held-out)", "ms before", "ms after",
                           "speedup (p10-p90)", "compile s"], rows, doc, pre)
    print(path.read_text())


if __name__ == "__main__":
    main()
