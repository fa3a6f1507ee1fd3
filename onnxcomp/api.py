"""onnxcomp from Python: optimize a model, or compile model files one or many at once.

:func:`optimize` does what ``onnxcomp optimize`` does; :func:`optimize_file` compiles one
model file and :func:`many` several, over an executor.

    import onnxcomp
    model, report = onnxcomp.optimize("models/fashion_mnist_vgg.onnx",
                                      passes=["fold_bn", "svd"],
                                      calib="models/fashion_mnist_calib.npz")

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

import onnx

from onnxcomp import auto as auto_mod
from onnxcomp import benchmark as bench_mod
from onnxcomp import calibration, cost, executor, fidelity, pipeline, synthetic
from onnxcomp import model as model_io
from onnxcomp.errors import ConfigError, OnnxcompError
from onnxcomp.passbase import RunContext

# optimize()'s own keywords that are also pass options: handed to every pass that has them.
RUN_OPTIONS = ("target_speedup", "max_drop", "provider", "threads", "latency_cache")


def optimize(model: str | Path | onnx.ModelProto, passes: Sequence[str | tuple[str, dict[
             str, Any]]] = (), *, recipe: str | Path | None = None, auto: bool = False,
             calib: Any = None, target_speedup: float | None = None,
             max_drop: float | None = None, provider: str = "cpu", threads: int = 1,
             latency_cache: str | Path | None = None, jobs: int = 1, output: str | Path | None
             = None, **options: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Rewrite ``model`` and return ``(optimized model, report)``; the input is not changed.

    Args:
        model: an ONNX file path or a ``ModelProto``.
        passes: pass names (run in order), or ``(name, {option: value})`` pairs; ``options``
            (``rank="auto"``, ``exclude=(...)``, ...) go to every pass that has them, and an
            option no chosen pass has is an error.
        recipe: a recipe file instead of ``passes``.
        auto: choose the passes (``--auto``) for ``target_speedup`` within ``max_drop``.
        target_speedup: ``--target-speedup`` (for ``auto`` and every pass that has it).
        max_drop: ``--max-drop`` (the same).
        provider: where latencies are measured (``cpu``, ``cuda``, ``tensorrt``).
        threads: intra-op threads latencies are measured with.
        latency_cache: ``--latency-cache`` file.
        calib: an .npz / .npy / image folder path, a :class:`Calibration`, a dict of arrays
            (input name -> samples), or None for synthetic inputs (the report says so).
        jobs: ``--auto``'s plans compiled in this many worker processes.
        output: also write the model there (atomically).
        **options: pass options by their config field names.

    The report is the JSON ``onnxcomp optimize --report`` writes (steps, fidelity, timing,
    ``auto``), without the benchmark: time with :func:`onnxcomp.benchmark.benchmark`.

    """
    from onnxcomp import passbase
    from onnxcomp import recipe as recipe_mod
    from onnxcomp.passes import REGISTRY

    if sum([recipe is not None, bool(passes), auto]) != 1:
        raise ConfigError("give one of passes=, recipe= and auto=True")
    original = model if isinstance(model, onnx.ModelProto) else model_io.load(model)
    data = _calibration(original, calib)
    cache = str(latency_cache) if latency_cache else None
    run = {"target_speedup": target_speedup, "max_drop": max_drop, "provider": provider,
           "threads": threads, "latency_cache": cache}
    context = RunContext(executor=executor.make("local", jobs))
    chosen = None
    if auto:
        if options:
            raise ConfigError(f"unknown option '{next(iter(options))}' for auto=True")
        chosen = auto_mod.run_auto(original, data, auto_mod.AutoConfig(
            target_speedup=target_speedup,
            max_drop=auto_mod.DEFAULT_MAX_DROP if max_drop is None else max_drop,
            provider=provider, threads=threads, latency_cache=cache),
            context=context)
        result = chosen.result
    else:
        if recipe is not None:
            steps = recipe_mod.load(Path(recipe)).steps(
                REGISTRY, {k: v for k, v in run.items() if v is not None})
        else:
            steps = []
            for item in passes:
                name, own = (item, {}) if isinstance(item, str) else item
                if name not in REGISTRY:
                    raise ConfigError(passbase.unknown_option(name, REGISTRY, "passes")
                                      .replace("option", "pass", 1))
                cls = REGISTRY[name].config_cls
                fields = {f.name for f in dataclasses.fields(cls)}
                shared = {k: v for k, v in {**run, **options}.items() if k in fields}
                steps.append(pipeline.Step(name, cls.from_options({**shared, **own},
                                                                  strict=True)))
            known = {f.name for s in steps for f in dataclasses.fields(type(s.config))}
            stray = sorted(set(options) - known)
            if stray:
                raise ConfigError(passbase.unknown_option(
                    stray[0], known, "the chosen passes"))
        result = pipeline.run_pipeline(original, steps, data, context=context)
    if output is not None:
        model_io.save(result.model, output)
    report = {**result.to_dict(), **({"auto": chosen.to_dict()} if chosen else {}),
              "calibration": {"source": data.source, "synthetic": data.synthetic,
                              "samples": data.num_samples}}
    return result.model, report


def bench(models: Sequence[str | Path | onnx.ModelProto], inputs: Any = None,
          shapes: dict[str, Sequence[int]] | None = None, provider: str = "cpu",
          threads: int = 1, runs: int = 50) -> dict[str, Any]:
    """Time ``models`` interleaved (the first is the baseline), as ``onnxcomp bench`` does.

    ``inputs``: a dict of arrays or a data path (its first sample); ``shapes``: random inputs
    of these shapes, for symbolic dims. Returns the JSON ``bench --json`` prints.
    """
    loaded = [m if isinstance(m, onnx.ModelProto) else model_io.load(m) for m in models]
    feeds = None
    if inputs is not None:
        data = _calibration(loaded[0], inputs)
        feeds = {k: v[:1] for k, v in data.batches[0].items()}
    elif shapes:
        feeds = synthetic.random_feeds(loaded[0], shapes)
    config = bench_mod.BenchConfig(provider=provider, threads=threads, batch=1, runs=runs)
    return bench_mod.benchmark(loaded, config, feeds).to_dict()


def diff(a: str | Path | onnx.ModelProto, b: str | Path | onnx.ModelProto,
         shapes: dict[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """What changed from ``a`` to ``b`` by original node (``onnxcomp diff --json``'s list)."""
    from onnxcomp import changes as diff_mod

    ma, mb = (m if isinstance(m, onnx.ModelProto) else model_io.load(m) for m in (a, b))
    return [g.to_dict() for g in diff_mod.diff(ma, mb, shapes)]


def _calibration(model: onnx.ModelProto, calib: Any) -> calibration.Calibration:
    if calib is None:
        return synthetic.synthetic_calibration(model, num_samples=8)
    if isinstance(calib, calibration.Calibration):
        return calib
    if isinstance(calib, dict):
        n = min(len(v) for v in calib.values())
        return calibration.Calibration(
            [{k: v[i:i + 8] for k, v in calib.items()} for i in range(0, n, 8)], False,
            "arrays")
    path = Path(calib)
    options = calibration.ImageOptions() if path.is_dir() else None
    return calibration.load_calibration(path, model, options)


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
