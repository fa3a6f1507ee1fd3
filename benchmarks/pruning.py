"""Channel pruning on real models: speed, size, fidelity, criteria.

    python benchmarks/pruning.py                   # every channel table (about 10 minutes)
    python benchmarks/pruning.py --tables layers    # prune_layers (about 5 minutes)

Writes benchmarks/results/pruning.md and .json with three channel-pruning tables, and
benchmarks/results/prune_layers.md and .json (whole layers removed: Fashion-MNIST VGG test
accuracy, MobileNetV2 / EfficientNet-Lite0 residual branches on held-out photos):

1. Fashion-MNIST VGG: ``--target-speedup`` 1.5 / 2 / 2.5 and a ratio sweep (test accuracy on
   all 10 000 test images; the model-size ratio reached at <= 2 % accuracy loss);
2. EfficientNet-Lite0 and MobileNetV2 at ``--ratio 0.2``, every criterion (top-1 agreement
   with the original on held-out photo crops);
3. every real model at ``--ratio 0.3`` (reconstruction criterion): valid output, what was
   pruned, what was blocked and why.

Calibration: the model's ``calib`` inputs; fidelity on ``heldout`` inputs. Latency: ORT CPU,
1 intra-op thread, batch 1, interleaved with the original, median of per-round ratios.
"""

from __future__ import annotations

import argparse
import collections
import platform
import time
from typing import Any

from cases import CASES, fmnist_accuracy, run
from common import calibration, fixed_batch, macs, optimize, params, speed, write

from onnxcomp import runtime


def prune_row(name: str, opts: dict[str, Any], n_calib: int, runs: int,
              pass_name: str = "prune_channels") -> dict[str, Any]:
    case = CASES[name]
    model = case.load()
    calib = calibration(case.inputs("calib"), n_calib, fixed_batch=fixed_batch(model))
    start = time.perf_counter()
    result, _ = optimize(model, [("canonicalize", {}), ("fold_bn", {}),
                                 (pass_name, opts)], calib)
    seconds = time.perf_counter() - start
    held = case.inputs("heldout")
    fid = case.fidelity(run(model, held), run(result.model, held))
    sp = speed(model, result.model, held, runs=runs)
    report = result.steps[-1].report
    blocked = collections.Counter(s.detail.split(";")[0] for s in report.skipped)
    doc = {
        "model": name, "options": opts, "compile_s": seconds, "fidelity": fid, **sp,
        "macs_ratio": macs(model, held) / max(macs(result.model, held), 1),
        "params_ratio": params(model) / max(params(result.model), 1),
        "size_ratio": result.model.ByteSize() / model.ByteSize(),
        "groups_pruned": len(report.applied), "skipped": dict(blocked),
        "removed": [c.node for c in report.applied],
        "metrics": report.metrics, "notes": report.notes,
    }
    if name == "fashion_mnist_vgg":
        doc["accuracy"] = {"before": fmnist_accuracy(model), "after": fmnist_accuracy(
            result.model)}
    return doc


def _speed(d: dict[str, Any]) -> str:
    return f"{d['speedup']:.2f}x ({d['speedup_p10']:.2f}-{d['speedup_p90']:.2f})"


def _setting(opts: dict[str, Any]) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in opts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--tables", nargs="*", default=["fmnist", "criteria", "all"],
                        help="fmnist, criteria, all (-> pruning.md); layers (-> prune_layers.md)")
    args = parser.parse_args()
    md, docs = [], {}
    if "fmnist" in args.tables:
        rows = []
        settings = [{"target_speedup": t} for t in (1.5, 2.0, 2.5)] + [
            {"ratio": r} for r in (0.2, 0.3, 0.4, 0.5, 0.6)]
        docs["fmnist"] = []
        for opts in settings:
            d = prune_row("fashion_mnist_vgg", opts, 256, args.runs)
            docs["fmnist"].append(d)
            acc = d["accuracy"]
            rows.append([_setting(opts), _speed(d), f"{d['macs_ratio']:.2f}x",
                         f"{d['size_ratio']:.1%}", f"{acc['before']:.2%} -> {acc['after']:.2%}",
                         f"{d['compile_s']:.0f}"])
            print(rows[-1], flush=True)
        ok = [d for d in docs["fmnist"]
              if d["accuracy"]["before"] - d["accuracy"]["after"] <= 0.02]
        best = min(ok, key=lambda d: d["size_ratio"]) if ok else None
        md.append("### Fashion-MNIST VGG (prune_channels, reconstruction criterion)\n\n")
        md.append(_table(["setting", "speedup (p10-p90)", "MACs ratio", "model size",
                          "test accuracy", "compile s"], rows))
        if best is not None:
            md.append(f"\nSmallest model within 2 % accuracy loss: {best['size_ratio']:.1%} of "
                      f"the original size ({_setting(best['options'])}; the seed thesis "
                      f"reports 28.6 % for VGG16 on CIFAR-10, with fine-tuning).\n\n")
    if "criteria" in args.tables:
        rows = []
        docs["criteria"] = []
        for name in ("efficientnet_lite0", "mobilenetv2"):
            for crit in ("reconstruction", "activation", "bn_scale", "l2", "l1"):
                d = prune_row(name, {"ratio": 0.2, "criterion": crit}, 64, args.runs)
                docs["criteria"].append(d)
                rows.append([name, crit, _speed(d), f"{d['macs_ratio']:.2f}x",
                             f"{d['fidelity']['top1_agreement']:.1%}",
                             f"{d['fidelity']['rel_l2']:.3f}"])
                print(rows[-1], flush=True)
        md.append("### Criteria at --ratio 0.2 (refit on, 64 calibration photos)\n\n")
        md.append(_table(["model", "criterion", "speedup (p10-p90)", "MACs ratio",
                          "top-1 agreement", "rel L2"], rows))
    if "all" in args.tables:
        rows = []
        docs["all"] = []
        for name in CASES:
            if name in ("efficientnet_lite0_bn", "mobilenetv2_bn"):
                continue
            d = prune_row(name, {"ratio": 0.3}, 16, args.runs)
            docs["all"].append(d)
            metric = CASES[name].metric
            skipped = "; ".join(f"{k} ({v})" for k, v in list(d["skipped"].items())[:3])
            rows.append([name, d["groups_pruned"], d["metrics"].get("channels_removed", "-"),
                         _speed(d), f"{d['macs_ratio']:.2f}x",
                         f"{metric} {d['fidelity'][metric]:.1%}", skipped or "-"])
            print(rows[-1], flush=True)
        md.append("### Every real model at --ratio 0.3 (16 calibration samples)\n\n")
        md.append(_table(["model", "groups pruned", "channels removed", "speedup", "MACs ratio",
                          "fidelity (held-out)", "blocked groups (why)"], rows))
    if "layers" in args.tables:
        layers_table(args.runs)
    if not md:
        return
    pre = (f"prune_channels after canonicalize + fold_bn; ORT CPU 1 thread batch 1, "
           f"{args.runs} interleaved rounds; {platform.machine()}, channels rounded to "
           f"multiples of {runtime.channel_block('cpu')} (the CPU's conv block).\n\n")
    path = write("pruning", [], [], docs, pre + "".join(md))
    print(path.read_text())


def layers_table(runs: int) -> None:
    """prune_layers: Fashion-MNIST VGG (test accuracy) and residual branches of MobileNetV2 /
    EfficientNet-Lite0 (top-1 agreement on held-out photos)."""
    rows, docs = [], []
    for name, n_calib, opts in (("fashion_mnist_vgg", 256, {"layers": 1}),
                                ("fashion_mnist_vgg", 256, {"layers": 2}),
                                ("mobilenetv2", 64, {"layers": 1}),
                                ("efficientnet_lite0", 64, {"layers": 1})):
        d = prune_row(name, opts, n_calib, runs, pass_name="prune_layers")
        docs.append(d)
        metric = CASES[name].metric
        fidelity = f"{metric} {d['fidelity'][metric]:.1%}"
        if "accuracy" in d:
            acc = d["accuracy"]
            fidelity = (f"acc {acc['before']:.2%} -> {acc['after']:.2%} "
                        f"({(acc['after'] - acc['before']) * 100:+.2f}); {fidelity}")
        rows.append([name, _setting(opts), ", ".join(d["removed"]) or "-", _speed(d),
                     f"{d['macs_ratio']:.2f}x", fidelity, f"{d['compile_s']:.0f}"])
        print(rows[-1], flush=True)
    pre = (f"prune_layers after canonicalize + fold_bn (importance measured after the refit; "
           f"three levels of downstream layers refit); ORT CPU 1 thread batch 1, {runs} "
           f"interleaved rounds; {platform.machine()}. Fidelity on held-out data (Fashion-MNIST: "
           f"the 10 000 test images).\n\n")
    path = write("prune_layers", ["model", "setting", "removed", "speedup (p10-p90)",
                                  "MACs ratio", "fidelity (held-out)", "compile s"], rows,
                 docs, pre)
    print(path.read_text())


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    from onnxcomp.report import markdown_table

    return markdown_table(headers, rows) + "\n"


if __name__ == "__main__":
    main()
