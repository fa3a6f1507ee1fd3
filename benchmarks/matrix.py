"""Every pass on every real model: valid output, every candidate accounted for, fidelity, time.

    python benchmarks/matrix.py [--cheap | --search] [--only MODEL ...] [--passes NAME ...]

A cell is one pass (after nothing else: what a user gets from ``--pass NAME`` alone) on one
model of benchmarks/cases.py, on 16 calibration samples. Each cell records:

- ``valid``: the output passes ``onnx.checker`` (full check) and ONNX Runtime loads and runs
  it on held-out inputs;
- the report: layers applied, skipped (each skip must carry a reason), notes; a cell that
  changes nothing and says nothing is a *silent no-op* (a bug);
- fidelity on held-out inputs (the case's metric) and the relative output error;
- compile seconds.

``--cheap`` (what CI runs, through tests/test_matrix.py): fixed ranks and ratios, no latency
searches. Without it the ``--rank auto --target-speedup`` / ``--target-speedup`` variants of
the passes that have them run too; ``--search`` runs only those (results/matrix_search.md).
A crash is a row that says so (and a bug to fix). Writes results/matrix.md and .json
(``_partial`` with --only / --passes).
"""

from __future__ import annotations

import argparse
import platform
import time
import traceback
from typing import Any

import numpy as np
import onnx
from cases import CASES, run
from common import calibration, fixed_batch, optimize, write

# (label, pass, options): the cheap cells, fixed ranks / ratios.
CHEAP: list[tuple[str, str, dict[str, Any]]] = [
    ("canonicalize", "canonicalize", {}),
    ("fold_bn", "fold_bn", {}),
    ("fold_affine", "fold_affine", {}),
    ("equalize", "equalize", {}),
    ("opset 17", "opset", {"target_opset": 17}),
    ("cp rank 0.5", "cp", {"rank": 0.5}),
    ("tucker rank 0.5", "tucker", {"rank": 0.5}),
    ("svd rank 0.5", "svd", {"rank": 0.5}),
    ("kernel_sharing rank 0.5", "kernel_sharing", {"rank": 0.5}),
    ("depthwise_separable rank 0.5", "depthwise_separable", {"rank": 0.5}),
    ("factorize macs 0.7", "factorize", {"rank": "auto", "target_macs": 0.7,
                                         "latency_check": False}),
    ("prune_channels ratio 0.25", "prune_channels", {"ratio": 0.25}),
    ("prune_layers 1", "prune_layers", {"layers": 1}),
    ("quantize static", "quantize", {"mode": "static"}),
    ("quantize weight 8", "quantize", {"mode": "weight", "bits": 8}),
    ("quantize weight 4", "quantize", {"mode": "weight", "bits": 4}),
    ("quantize kmeans 4", "quantize", {"mode": "kmeans", "bits": 4}),
]
# The searching variants (full run only).
SEARCH: list[tuple[str, str, dict[str, Any]]] = [
    *((f"{p} auto 1.5x", p, {"rank": "auto", "target_speedup": 1.5})
      for p in ("cp", "tucker", "svd", "kernel_sharing", "depthwise_separable", "factorize")),
    ("prune_channels 1.3x", "prune_channels", {"target_speedup": 1.3}),
    ("prune_layers 1.1x", "prune_layers", {"target_speedup": 1.1}),
]
CALIB_SAMPLES, HELDOUT_SAMPLES = 16, 16


def cell(name: str, label: str, pass_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """One pass on one model: what the matrix records."""
    case = CASES[name]
    model = case.load()
    calib = calibration(case.inputs("calib"), CALIB_SAMPLES, fixed_batch=fixed_batch(model))
    held = {k: v[:HELDOUT_SAMPLES] for k, v in case.inputs("heldout").items()}
    doc: dict[str, Any] = {"model": name, "cell": label, "pass": pass_name, "options": options}
    start = time.perf_counter()
    try:
        result, _ = optimize(model, [(pass_name, options)], calib)
    except Exception as exc:  # noqa: BLE001 - a crash is what the matrix is there to find
        doc.update(status="crash", error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(), seconds=time.perf_counter() - start)
        return doc
    doc["seconds"] = time.perf_counter() - start
    report = result.steps[-1].report
    doc["applied"] = len(report.applied)
    doc["skipped"] = len(report.skipped)
    doc["skips_without_reason"] = [s.node for s in report.skipped
                                   if not (s.detail or "").strip() and not s.reason]
    doc["notes"] = [str(n) for n in report.notes]
    doc["silent_no_op"] = not report.applied and not report.skipped and not report.notes
    try:
        onnx.checker.check_model(result.model, full_check=True)
        ref, got = run(model, held), run(result.model, held)
        doc["valid"] = True
    except Exception as exc:  # noqa: BLE001 - an invalid output is a finding, not a crash
        doc.update(status="invalid", valid=False, error=f"{type(exc).__name__}: {exc}")
        return doc
    fid = case.fidelity(ref, got)
    doc["fidelity"] = {case.metric: fid[case.metric], "rel_l2": fid["rel_l2"]}
    doc["status"] = "silent no-op" if doc["silent_no_op"] else (
        "skip without reason" if doc["skips_without_reason"] else "ok")
    return doc


def row(d: dict[str, Any]) -> list[Any]:
    """One table row."""
    if d["status"] in ("crash", "invalid"):
        return [d["model"], d["cell"], f"**{d['status']}**", "-", "-", "-",
                f"{d.get('seconds', 0):.1f}", d["error"][:120]]
    case = CASES[d["model"]]
    fid = d["fidelity"]
    return [d["model"], d["cell"], d["status"], d["applied"], d["skipped"],
            f"{case.metric} {fid[case.metric]:.1%}; rel L2 {fid['rel_l2']:.3g}",
            f"{d['seconds']:.1f}", (d["notes"][0][:90] if d["notes"] else "")]


def run_matrix(models: list[str], cells: list[tuple[str, str, dict[str, Any]]],
               log: bool = True) -> list[dict[str, Any]]:
    """Every cell on every model."""
    docs = []
    for name in models:
        for label, pass_name, options in cells:
            doc = cell(name, label, pass_name, options)
            docs.append(doc)
            if log:
                print(" | ".join(str(v) for v in row(doc)), flush=True)
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cheap", action="store_true")
    ap.add_argument("--search", action="store_true")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--passes", nargs="*")
    args = ap.parse_args()
    models = args.only or list(CASES)
    cells = CHEAP if args.cheap else SEARCH if args.search else [*CHEAP, *SEARCH]
    if args.passes:
        cells = [c for c in cells if c[1] in args.passes]
    docs = run_matrix(models, cells)
    bad = [d for d in docs if d["status"] != "ok"]
    counts = {s: sum(d["status"] == s for d in docs) for s in sorted({d["status"] for d in docs})}
    pre = (f"Every pass alone on every model ({len(models)} models x {len(cells)} cells = "
           f"{len(docs)}), {CALIB_SAMPLES} calibration samples, fidelity on {HELDOUT_SAMPLES} "
           f"held-out samples; `python benchmarks/matrix.py"
           f"{' --cheap' if args.cheap else ' --search' if args.search else ''}`"
           f" on {platform.machine()}. Outcomes: {counts}. A cell is ok when its output "
           f"passes the full ONNX check and runs in ONNX Runtime, every skip has a reason, "
           f"and it did not change nothing silently. Columns: layers applied / skipped; the "
           f"last column is the report's first note.\n\n")
    if bad:
        pre += "Not ok: " + "; ".join(f"{d['model']} {d['cell']}: {d['status']}" for d in bad)
        pre += "\n\n"
    stem = "matrix_search" if args.search else "matrix"
    if args.only or args.passes:
        stem += "_partial"
    path = write(stem, ["model", "cell", "status", "applied", "skipped", "held-out fidelity",
                        "compile s", "note"], [row(d) for d in docs], docs, pre)
    print(path.read_text()[:2000])
    if any(d["status"] in ("crash", "invalid") for d in docs):
        raise SystemExit(1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
