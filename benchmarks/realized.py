"""How much of a decomposition's MAC cut turns into speed, on ResNet-18-sized layers.

    python benchmarks/realized.py [--size 224] [--runs 30]

Writes benchmarks/results/realized.md and .json. The Fashion-MNIST VGG's layers are small
(28x28 and less, 32-128 channels): timed alone, CP chains realize about 0.7 of their MAC cut
there (in context, 0.8-0.95). This script builds a
ResNet-18-shaped network (random He-initialized weights: speed does not depend on the values,
so no fidelity is reported) at batch 1 and rewrites every 3x3 conv with each method at fixed
rank fractions, no refit, the layer micro-benchmarks on (a layer not measured >= 1.05x faster
is left alone). ``realized`` = measured speedup / MAC reduction, for the whole model and per
rewritten layer (from the pass's micro-benchmarks, in context and timed alone). Latency: ORT
CPU, 1 intra-op thread, original and rewritten interleaved, median of per-round ratios.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import numpy as np
import onnx
from common import calibration, macs, optimize, speed, write
from onnx import TensorProto, helper, numpy_helper

# (method, --rank fraction): cp and svd fractions are of the break-even rank, tucker's of
# (C, O).
ROWS: list[tuple[str, float]] = [("cp", 0.1), ("cp", 0.25), ("tucker", 0.25), ("tucker", 0.5),
                                 ("svd", 0.25), ("svd", 0.5)]


def resnet18(size: int, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18's layer shapes (basic blocks, 64-512 channels) with random weights."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True) -> str:
        count[0] += 1
        name = f"conv{count[0]}"
        w = rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}_w"))
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), f"{name}_b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], name=name,
                                      pads=[k // 2] * 4, strides=[stride, stride]))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}_r"], name=f"{name}_relu"))
        return f"{name}_r"

    x = conv("x", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1, 1, 1, 1]))
    x, c = "pool", 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = conv(conv(x, c, width, 3, stride), width, width, 3, relu=False)
            short = x if stride == 1 and c == width else conv(x, c, width, 1, stride, False)
            add = f"add{stage}_{block}"
            nodes.append(helper.make_node("Add", [y, short], [add], name=add))
            nodes.append(helper.make_node("Relu", [add], [f"{add}_r"], name=f"{add}_relu"))
            x, c = f"{add}_r", width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    fc = rng.standard_normal((1000, 512)) * np.sqrt(1.0 / 512)
    inits.append(numpy_helper.from_array(fc.astype(np.float32), "fc_w"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet18_shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    model = resnet18(args.size)
    inputs = {"x": np.random.default_rng(1).standard_normal(
        (8, 3, args.size, args.size)).astype(np.float32)}
    calib = calibration(inputs, 8, fixed_batch=1)
    rows, docs = [], []
    for method, fraction in ROWS:
        start = time.perf_counter()
        opts: dict[str, Any] = {"rank": fraction, "refit": False}
        result, _ = optimize(model, [(method, opts)], calib)
        compile_s = time.perf_counter() - start
        sp = speed(model, result.model, inputs, runs=args.runs)
        mac_ratio = macs(model, inputs) / max(macs(result.model, inputs), 1)
        report = result.steps[-1].report
        # Per layer in context (the edge cost of a one-layer model taken off, see
        # decompose.realized) and timed alone.
        layers = sorted(c.details["realized"] for c in report.applied
                        if c.details.get("realized"))
        alone = sorted(c.details["realized_alone"] for c in report.applied
                       if c.details.get("realized_alone"))
        skipped = sum(s.reason.name == "NO_LATENCY_WIN" for s in report.skipped)
        doc = {"method": method, "rank": fraction, "applied": len(report.applied),
               "skipped_no_latency_win": skipped, "macs_ratio": mac_ratio,
               "realized": sp["speedup"] / mac_ratio, "layer_realized": layers,
               "layer_realized_alone": alone,
               "compile_s": compile_s, **sp}
        docs.append(doc)
        spread = f"{layers[len(layers) // 2]:.2f} ({layers[0]:.2f}-{layers[-1]:.2f})" if (
            layers) else "-"
        spread_alone = f"{alone[len(alone) // 2]:.2f}" if alone else "-"
        rows.append([method, fraction, len(report.applied), skipped,
                     f"{sp['speedup']:.2f}x ({sp['speedup_p10']:.2f}-{sp['speedup_p90']:.2f})",
                     f"{mac_ratio:.2f}x", f"{doc['realized']:.2f}", spread, spread_alone,
                     f"{compile_s:.0f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    pre = (f"ResNet-18-shaped network (random weights), {args.size}x{args.size}, batch 1, every "
           f"conv rewritten at a fixed rank fraction without refit; ORT CPU 1 thread, "
           f"{args.runs} interleaved rounds; {platform.machine()} "
           f"({platform.processor() or 'cpu'}). Base latency "
           f"{docs[0]['ms_before']:.1f} ms.\n\n")
    path = write("realized", ["method", "--rank", "layers rewritten",
                              "left alone (no latency win)", "model speedup (p10-p90)",
                              "MACs ratio", "realized (model)",
                              "realized per layer, in context: median (min-max)",
                              "per layer timed alone: median", "compile s"],
                 rows, docs, pre)
    print(path.read_text())


if __name__ == "__main__":
    main()
