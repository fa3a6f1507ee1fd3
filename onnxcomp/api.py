"""Compile model files from Python: one model (:func:`optimize_file`) or many (:func:`many`).

``optimize-many`` is :func:`many` over an executor (onnxcomp/executor.py): each model's whole
compile (load, calibrate, passes or ``--auto``, verify, save, benchmark) is one task, so a
local pool or a Ray cluster compiles several models at once. A task never raises: its
summary says what failed, so one bad model does not cost the others.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxcomp import auto as auto_mod
from onnxcomp import bench as bench_mod
from onnxcomp import calibration, cost, executor, fidelity, pipeline, synthetic
from onnxcomp import model as model_io
from onnxcomp.errors import ConfigError, OnnxcompError
from onnxcomp.passbase import RunContext


@dataclasses.dataclass(frozen=True)
class Job:
    """One model to compile: where it is, where it goes, what to run, on what data."""

    model: Path
    output: Path
    steps: tuple[pipeline.Step, ...] = ()  # the passes (a recipe's steps), or
    auto: auto_mod.AutoConfig | None = None  # --auto with these aims
    calib: Path | None = None  # None: synthetic inputs (said in the summary)
    image: calibration.ImageOptions | None = None
    calib_batch: int = 8
    num_calib: int | None = None
    bench: bool = True
    provider: str = "cpu"
    threads: int = 1
    runs: int = 50
    report: Path | None = None  # the full JSON report of this model

    def __post_init__(self) -> None:
        if bool(self.steps) == (self.auto is not None):
            raise ConfigError("a job runs either passes or --auto")


def optimize_file(job: Job) -> dict[str, Any]:
    """Compile one model file; the summary of what happened (``error`` set when it failed)."""
    start = time.perf_counter()
    summary: dict[str, Any] = {"model": str(job.model), "output": str(job.output),
                               "measured_on": executor.where(), "error": None}
    try:
        summary.update(_compile(job))
    except OnnxcompError as exc:
        summary["error"] = str(exc)
    except Exception as exc:  # a bug: one line here, the traceback in the report's log
        summary["error"] = f"internal error ({type(exc).__name__}): {exc}"
        summary["traceback"] = traceback.format_exc()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _compile(job: Job) -> dict[str, Any]:
    model = model_io.load(job.model)
    if job.calib is None:
        calib = synthetic.synthetic_calibration(model, num_samples=job.num_calib or 8,
                                                batch_size=job.calib_batch)
    else:
        calib = calibration.load_calibration(job.calib, model, job.image,
                                             batch_size=job.calib_batch, limit=job.num_calib)
    chosen = None
    if job.auto is not None:
        chosen = auto_mod.run_auto(model, calib, job.auto, context=RunContext())
        result, steps = chosen.result, chosen.steps
    else:
        steps = list(job.steps)
        result = pipeline.run_pipeline(model, steps, calib, context=RunContext())
    model_io.save(result.model, job.output)
    shapes = {k: (1, *v.shape[1:]) for k, v in calib.batches[0].items()}
    before, after = cost.model_cost(model, shapes), cost.model_cost(result.model, shapes)
    loss, metric = fidelity.bound(result.fidelity)
    out: dict[str, Any] = {
        "passes": [s.name for s in steps], "synthetic_calibration": calib.synthetic,
        "params": [before.params, after.params], "macs": [before.macs, after.macs],
        "loss": round(loss, 5), "loss_metric": metric, "speedup": None,
        **({"auto": chosen.chosen, "auto_outcome": chosen.code} if chosen else {}),
    }
    if job.bench:
        first = {k: v[:1] for k, v in calib.batches[0].items()}
        config = bench_mod.BenchConfig(provider=job.provider, threads=job.threads, batch=1,
                                       runs=job.runs)
        res = bench_mod.benchmark([model, result.model], config, inputs=first,
                                  labels=["original", "optimized"])
        out["speedup"] = round(res.speedups[0].median, 3)
    if job.report is not None:
        doc = {**out, "input": str(job.model), "output": str(job.output),
               "measured_on": executor.where(), **result.to_dict(),
               **({"auto": chosen.to_dict()} if chosen else {})}
        tmp = job.report.with_name(f".{job.report.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(job.report)
    return out


def many(jobs: Sequence[Job], runner: Any = None) -> list[dict[str, Any]]:
    """Compile every job through ``runner``, an executor (None: here, one after the other).

    One summary per job, in the jobs' order.
    """
    names = [j.output.resolve() for j in jobs]
    if len(set(names)) != len(names):
        raise ConfigError("two models would be written to the same output file")
    return list((runner or executor.Serial()).map(optimize_file, list(jobs)))
