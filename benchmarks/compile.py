"""Compile time of the passes on real and synthetic models, with a breakdown.

    python benchmarks/compile.py [--cases a,b,...] [--tree DIR --label before]

Each case runs in a fresh process (``onnxcomp.pipeline`` under cProfile) and reports the wall
time and where it went: capture (running models for activations), solve (decompositions and
least-squares fits), measure (latency measurements), verify (the pipeline's checks after each
pass), other. ``--tree DIR`` runs another checkout of onnxcomp (e.g. a ``git worktree`` of an
older commit) on the same cases, so before/after are measured on this machine, one after the
other. Results go to ``results/compile.md`` / ``.json`` (merged by label).

Machine noise: this is wall time on a shared 2-core box; cases are timed once each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# (case, model, calibration samples, passes with options)
CASES: dict[str, tuple[str, int, list[tuple[str, dict]]]] = {
    "readme_cp": ("fashion_mnist_vgg", 256,
                  [("fold_bn", {}), ("cp", {"rank": "auto", "target_speedup": 2.0})]),
    "det_cp_fixed": ("ppocrv4_det", 64, [("cp", {"rank": 0.5})]),
    "det_cp": ("ppocrv4_det", 64, [("cp", {"rank": "auto", "target_speedup": 1.5})]),
    "det_svd": ("ppocrv4_det", 64, [("svd", {"rank": "auto", "target_speedup": 1.5})]),
    "det_tucker": ("ppocrv4_det", 64, [("tucker", {"rank": "auto", "target_speedup": 1.5})]),
    "rec_cp": ("ppocrv4_rec", 64, [("cp", {"rank": "auto", "target_speedup": 1.5})]),
    "rec_svd": ("ppocrv4_rec", 64, [("svd", {"rank": "auto", "target_speedup": 1.5})]),
    "rec_tucker": ("ppocrv4_rec", 64, [("tucker", {"rank": "auto", "target_speedup": 1.5})]),
    "det_prune": ("ppocrv4_det", 64, [("prune_channels", {"target_speedup": 1.5})]),
    "det_ksc": ("ppocrv4_det", 64, [("kernel_sharing", {"groups": "auto",
                                                        "target_speedup": 1.3})]),
    "det_dws": ("ppocrv4_det", 64, [("depthwise_separable", {"target_speedup": 1.3})]),
    "vgg16bn_cp": ("vgg16bn", 16, [("fold_bn", {}), ("cp", {"rank": "auto",
                                                             "target_speedup": 2.0})]),
    "vgg16bn_svd": ("vgg16bn", 16, [("fold_bn", {}), ("svd", {"rank": "auto",
                                                               "target_speedup": 2.0})]),
    "vgg8_cp": ("vgg:8", 16, [("cp", {"rank": 0.5})]),
    "vgg16_cp": ("vgg:16", 16, [("cp", {"rank": 0.5})]),
    "vgg32_cp": ("vgg:32", 16, [("cp", {"rank": 0.5})]),
}

# Functions whose cumulative time is a phase (outermost match wins).
PHASES = {
    "capture": ("_stream", "_run_segment", "run_model", "capture"),
    "measure": ("benchmark", "measure_plan", "edge_ms", "layer_edges_ms", "_time_models"),
    "verify": ("model_outputs", "_check_lossless", "check_interface"),
    "solve": ("refit_solution", "shrunk_solve", "parafac", "cp_als", "tucker2", "plan",
              "_factor", "svd"),
}

RUNNER = textwrap.dedent("""
    import cProfile, json, pstats, sys, time, importlib.util
    root, spec_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, root)
    import onnxcomp
    assert onnxcomp.__file__.startswith(root), onnxcomp.__file__
    s = importlib.util.spec_from_file_location(
        "onnxcomp.passes", root + "/passes/__init__.py",
        submodule_search_locations=[root + "/passes"])
    m = importlib.util.module_from_spec(s); sys.modules["onnxcomp.passes"] = m
    s.loader.exec_module(m)
    import numpy as np, onnx
    from onnxcomp import pipeline
    from onnxcomp.calibration import Calibration
    spec = json.load(open(spec_path))
    model = onnx.load(spec["model"])
    data = np.load(spec["calib"])
    arrays = {k: data[k] for k in data.files}
    n = len(next(iter(arrays.values())))
    b = spec["batch"]
    calib = Calibration([{k: v[i:i + b] for k, v in arrays.items()} for i in range(0, n, b)],
                        False, "compile benchmark")
    steps = [pipeline.Step(name, m.REGISTRY[name].config_cls.from_options(opts))
             for name, opts in spec["steps"]]
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    pipeline.run_pipeline(model, steps, calib)
    prof.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(prof).stats
    cum = {}
    for (file, line, func), (_, _, _, ct, _) in stats.items():
        cum.setdefault(func, 0.0)
        cum[func] = max(cum[func], ct)
    json.dump({"wall": wall, "cumulative": cum}, open(out, "w"))
""")


def vgg_model(convs: int, width: int = 64, size: int = 64):
    """A VGG-style stack: ``convs`` 3x3 convs of ``width`` channels (Relu), no pooling."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(convs)
    nodes, inits = [], []
    x = "x"
    for i in range(convs):
        cin = 3 if i == 0 else width
        w = (rng.standard_normal((width, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}",
                                      pads=[1] * 4))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "vgg", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 3, size, size])], [helper.make_tensor_value_info(
            x, TensorProto.FLOAT, ["n", width, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": np.random.default_rng(0).uniform(0, 1, (64, 3, size, size))
                   .astype(np.float32)}


def vgg16bn_model(size: int = 224):
    """VGG16-BN's 13 convs (64-512 channels, BN, Relu, 5 MaxPools) at ``size``: ~15 GMACs.

    Random weights (speed does not depend on them); BN statistics random but sane.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(16)
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    nodes, inits = [], []
    x, c = "x", 3
    for i, v in enumerate(cfg):
        if v == "M":
            nodes.append(helper.make_node("MaxPool", [x], [f"p{i}"], kernel_shape=[2, 2],
                                          strides=[2, 2]))
            x = f"p{i}"
            continue
        w = (rng.standard_normal((v, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.uniform(0.5, 1.5, v).astype(np.float32), f"g{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(v)).astype(np.float32),
                                          f"b{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(v)).astype(np.float32),
                                          f"m{i}"),
                  numpy_helper.from_array(rng.uniform(0.5, 2.0, v).astype(np.float32), f"v{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}",
                                   pads=[1] * 4),
                  helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}",
                                                          f"v{i}"], [f"n{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}")]
        x, c = f"r{i}", v
    graph = helper.make_graph(nodes, "vgg16bn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 3, size, size])], [helper.make_tensor_value_info(
            x, TensorProto.FLOAT, ["n", 512, size // 16, size // 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": np.random.default_rng(1).uniform(0, 1, (16, 3, size, size))
                   .astype(np.float32)}


def phases(cumulative: dict[str, float], wall: float) -> dict[str, float]:
    """Seconds per phase: the largest cumulative time among each phase's functions."""
    out = {}
    for phase, funcs in PHASES.items():
        out[phase] = max((cumulative.get(f, 0.0) for f in funcs), default=0.0)
    out["other"] = max(0.0, wall - sum(out.values()))
    return out


def prepare(case: str, tmp: Path) -> Path:
    import onnx
    from cases import CASES as REAL
    from common import fixed_batch

    source, samples, steps = CASES[case]
    if source == "vgg16bn":
        model, inputs = vgg16bn_model()
        batch = 4
    elif source.startswith("vgg:"):
        model, inputs = vgg_model(int(source.split(":")[1]))
        batch = 8
    else:
        real = REAL[source]
        model = real.load()
        inputs = real.inputs("calib")
        batch = fixed_batch(model) or 8
    model_path = tmp / f"{case}.onnx"
    onnx.save(model, model_path)
    calib_path = tmp / f"{case}.npz"
    np.savez(calib_path, **{k: v[:samples] for k, v in inputs.items()})
    spec = tmp / f"{case}.json"
    spec.write_text(json.dumps({"model": str(model_path), "calib": str(calib_path),
                                "batch": batch, "steps": steps}))
    return spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tree", default=str(ROOT))
    ap.add_argument("--label", default="after")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    results_json = HERE / "results" / "compile.json"
    doc = json.loads(results_json.read_text()) if results_json.exists() else {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        runner = tmp / "runner.py"
        runner.write_text(RUNNER)
        for case in args.cases.split(","):
            spec = prepare(case, tmp)
            out = tmp / f"{case}.out.json"
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            try:
                subprocess.run([sys.executable, str(runner), str(Path(args.tree).resolve()),
                                str(spec), str(out)], check=True, timeout=args.timeout,
                               env=env, cwd=tmp, capture_output=True)
                res = json.loads(out.read_text())
                entry = {"wall": round(res["wall"], 1),
                         **{k: round(v, 1) for k, v in phases(res["cumulative"],
                                                               res["wall"]).items()}}
            except subprocess.TimeoutExpired:
                entry = {"wall": None, "note": f"no result in {args.timeout:.0f} s"}
            except subprocess.CalledProcessError as exc:
                entry = {"wall": None, "note": exc.stderr.decode()[-300:]}
            doc.setdefault(case, {})[args.label] = entry
            print(case, args.label, entry, flush=True)
            results_json.write_text(json.dumps(doc, indent=2))
    write_table(doc)


def write_table(doc: dict) -> None:
    rows = []
    for case, by_label in doc.items():
        source, samples, steps = CASES.get(case, ("?", 0, []))
        passes = " + ".join(f"{n} " + " ".join(f"{k}={v}" for k, v in o.items())
                            for n, o in steps)
        for label in ("before", "after"):
            e = by_label.get(label)
            if e is None:
                continue
            if e.get("wall") is None:
                rows.append([case, source, samples, passes, label, e.get("note", "-"),
                             "-", "-", "-", "-", "-"])
                continue
            rows.append([case, source, samples, passes, label, f"{e['wall']:.1f}",
                         *(f"{e[k]:.1f}" for k in ("capture", "solve", "measure", "verify",
                                                    "other"))])
    from onnxcomp.report import markdown_table

    pre = ("Compile time (s, wall, this 2-core machine, one run each), `python "
           "benchmarks/compile.py`; breakdown from cProfile's cumulative times (capture: "
           "model runs for activations; solve: decompositions and least-squares fits; "
           "measure: latency measurements; verify: the pipeline's checks). `before`: the "
           "tree before the streamed calibration (`--tree` of that commit). The det "
           "calibration set held 16 document windows until the det `after` rows (64 since): "
           "its `before` rows ran on 16.\n\n")
    (HERE / "results" / "compile.md").write_text(pre + markdown_table(
        ["case", "model", "calib", "passes", "tree", "wall s", "capture", "solve", "measure",
         "verify", "other"], rows))


if __name__ == "__main__":
    main()
