"""Helpers shared by the benchmark scripts: pipeline runs, interleaved timing, tables."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp import benchmark as bench
from onnxcomp import cost, pipeline
from onnxcomp.calibration import Calibration
from onnxcomp.passes import REGISTRY
from onnxcomp.report import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def calibration(inputs: dict[str, np.ndarray], n: int, batch: int = 8,
                fixed_batch: int | None = None) -> Calibration:
    """The first ``n`` samples as a calibration set."""
    b = fixed_batch or batch
    n = min(n, min(len(v) for v in inputs.values()))  # as many as there are
    batches = []
    for start in range(0, n, b):
        batches.append({k: v[start:min(start + b, n)] for k, v in inputs.items()})
    return Calibration(batches, False, "benchmark")


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The model's fixed batch dim, if any."""
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def optimize(model: onnx.ModelProto, steps: Sequence[tuple[str, dict[str, Any]]],
             calib: Calibration) -> tuple[pipeline.PipelineResult, float]:
    """Run passes through the pipeline; return the result and the compile seconds."""
    start = time.perf_counter()
    recipe = [pipeline.Step(name, REGISTRY[name].config_cls.from_options(opts))
              for name, opts in steps]
    result = pipeline.run_pipeline(model, recipe, calib)
    return result, time.perf_counter() - start


def speed(a: onnx.ModelProto, b: onnx.ModelProto, inputs: dict[str, np.ndarray],
          runs: int = 60, threads: int = 1) -> dict[str, float]:
    """Interleaved A/B timing at batch 1: medians and the per-round speedup a/b."""
    feeds = {k: v[:1] for k, v in inputs.items()}
    res = bench.benchmark([a, b], bench.BenchConfig(threads=threads, runs=runs, warmup=5),
                          inputs=feeds)
    sp = res.speedups[0]
    return {"ms_before": res.models[0].median_ms, "ms_after": res.models[1].median_ms,
            "speedup": sp.median, "speedup_p10": sp.p10, "speedup_p90": sp.p90}


def macs(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> int:
    """MACs at batch 1."""
    return cost.model_cost(model, {k: (1, *v.shape[1:]) for k, v in inputs.items()}).macs


def params(model: onnx.ModelProto) -> int:
    """Parameters."""
    return cost.model_cost(model).params


def write(name: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
          doc: Any, preamble: str = "") -> Path:
    """Write ``results/<name>.md`` (a table) and ``results/<name>.json``."""
    RESULTS.mkdir(exist_ok=True)
    md = RESULTS / f"{name}.md"
    md.write_text(preamble + (markdown_table(headers, rows) if headers else ""))
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str))
    return md
