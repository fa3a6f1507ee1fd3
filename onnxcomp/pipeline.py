"""Run a recipe of passes in order, verifying the model after every pass."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxcomp import benchmark as bench
from onnxcomp import cost, fidelity, provenance, runtime, verify, weights
from onnxcomp.errors import PassError
from onnxcomp.model import QUANTIZED_OPS, copy_model
from onnxcomp.passbase import PassConfig, PassResult, Report, RunContext, SkipReason
from onnxcomp.timing import Timer

if TYPE_CHECKING:
    from onnxcomp.calibration import Calibration
    from onnxcomp.passbase import Pass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Step:
    """One pass of a recipe with its configuration."""

    name: str
    config: PassConfig
    before: str | None = None  # run as a prerequisite of this pass
    prepared: bool = False  # its prerequisites have run


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did and what it cost in fidelity (vs the model before the step)."""

    name: str
    lossless: bool
    report: Report
    fidelity: verify.Fidelity
    seconds: float
    config: PassConfig | None = None  # as run (a pipeline target already divided)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "pass": self.name,
            "lossless": self.lossless,
            "seconds": round(self.seconds, 3),
            "config": dataclasses.asdict(self.config) if self.config is not None else None,
            "fidelity_vs_previous": self.fidelity.to_dict(),
            "report": self.report.to_dict(),
        }


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """The final model, each step's result and the fidelity of the final vs the original."""

    model: onnx.ModelProto
    steps: tuple[StepResult, ...]
    fidelity: verify.Fidelity
    synthetic_calibration: bool
    # What the run's timer spent (measurements, repeats for noise, memo hits, seconds).
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "steps": [s.to_dict() for s in self.steps],
            "fidelity_vs_original": self.fidelity.to_dict(),
            "synthetic_calibration": self.synthetic_calibration,
            "timing": dict(self.timing),
        }


def model_outputs(model: onnx.ModelProto, calib: Calibration) -> tuple[list[str], list[np.ndarray]]:
    """The model's outputs on every calibration batch (ORT CPU, fusions off), concatenated."""
    session = runtime.make_session(model, "cpu", threads=1, optimize=False)
    names = runtime.output_names(session)
    return names, runtime.concat_outputs(runtime.run_batches(session, calib.batches, names))


def _check_lossless(
    name: str,
    before: onnx.ModelProto,
    calib: Calibration,
    reference: Sequence[np.ndarray],
    fidelity: verify.Fidelity,
    report: Report,
) -> None:
    """Raise :class:`PassError` unless a lossless pass's change is float32 noise.

    Called when the outputs moved past the fixed tolerance. Some inputs drive a deep network
    into regions where float32 reassociation alone moves its outputs further (seen here: a
    scanned typewriter crop moves PP-OCRv4 rec's probabilities by 2.3e-4 between ORT's fusions
    on and off). The pre-pass model run with fusions on gives that noise floor on these inputs.
    """
    session = runtime.make_session(before, "cpu", threads=1, optimize=True)
    names = runtime.output_names(session)
    fused = runtime.concat_outputs(runtime.run_batches(session, calib.batches, names))
    noise = verify.compare_outputs(names, reference, fused)
    if not fidelity.within_noise(noise):
        raise PassError(
            f"lossless pass '{name}' changed the outputs (relative L2 error "
            f"{fidelity.rel_l2:.3g}; ORT's own float32 noise on these inputs: {noise.rel_l2:.3g})"
        )
    report.note(
        "within_float_noise",
        f"outputs moved by up to {max(o.max_abs for o in fidelity.outputs):.3g}, past the "
        f"fixed tolerance but within {verify.NOISE_FACTOR:g}x ORT's own float32 noise on these "
        f"inputs (fusions on vs off: {max(o.max_abs for o in noise.outputs):.3g})"
    )


def run_pipeline(
    model: onnx.ModelProto,
    steps: Sequence[Step],
    calib: Calibration,
    registry: Mapping[str, Pass[Any]] | None = None,
    on_step: Callable[[str], None] | None = None,
    context: RunContext | None = None,
) -> PipelineResult:
    """Run ``steps`` in order on ``model``; verify after each; never mutate ``model``.

    After every pass: the interface (output names, types, static dims) is unchanged, the model
    passes the checker and loads in ONNX Runtime, and its outputs on the calibration batches are
    compared with the pre-pass model's. A lossless pass outside tolerance raises
    :class:`PassError`; a lossy pass's error is recorded. Every pass gets the same
    ``context`` (one measurement service for the whole run).
    """
    ctx = context or RunContext()
    if registry is None:
        from onnxcomp.passes import REGISTRY

        registry = REGISTRY
    with runtime.input_model():
        names, original = model_outputs(model, calib)
    previous = original
    current = model
    results: list[StepResult] = []
    changed = False
    queue = list(steps)
    while queue:
        step = queue.pop(0)
        pass_ = registry[step.name]
        ask = getattr(pass_, "prerequisites", None)
        if ask is not None and not step.prepared:
            # Lossless passes this one wants run first (static int8: BN folded, opset 13,
            # equalized pairs): as steps of their own they are verified and reported like
            # any lossless pass; the pass then runs with the config they leave.
            pre, config_after = ask(current, step.config)
            queue[:0] = [*(Step(n, c, before=step.name) for n, c in pre),
                         Step(step.name, config_after, prepared=True)]
            continue
        if on_step is not None:
            on_step(step.name)
        start = time.perf_counter()
        config: PassConfig | None = step.config
        note: str | None = None
        so_far: float | None = None
        if changed:
            config, note, so_far = pipeline_target(step.config, model, current, calib,
                                                   ctx.timer)
        if config is None:
            result = PassResult(copy_model(current), Report(step.name))
        else:
            result = pass_(current, config, calib, ctx)
        if step.before is not None:
            result.report.note("prerequisite", f"run before {step.before}, which needs it",
                               first=True)
        if note is not None:
            result.report.note("pipeline_target" if config is not None
                               else "pipeline_target_reached", note, first=True)
            result.report.metrics["pipeline_speedup_before"] = round(float(so_far or 1.0), 3)
        seconds = time.perf_counter() - start
        if result.model is current:
            raise PassError(f"pass '{step.name}' returned its input model object")
        if weights.on_disk(current):
            weights.spill(result.model)  # a large model's new weights go to disk too
        verify.check_interface(current, result.model)
        if result.modified:
            _, outputs = model_outputs(result.model, calib)
        else:
            outputs = previous
        step_fidelity = verify.compare_outputs(names, previous, outputs)
        if pass_.lossless and not step_fidelity.within(verify.LOSSLESS_RTOL, verify.LOSSLESS_ATOL):
            _check_lossless(step.name, current, calib, previous, step_fidelity, result.report)
        result.report.metrics.setdefault("rel_l2_error", step_fidelity.rel_l2)
        _note_quantized(current, result.report)
        log.info("%s: %d applied, %d skipped, rel error %.3g", step.name,
                 len(result.report.applied), len(result.report.skipped), step_fidelity.rel_l2)
        results.append(StepResult(step.name, pass_.lossless, result.report, step_fidelity, seconds,
                                  config or step.config))
        changed = changed or result.modified
        current = result.model
        previous = outputs
    # What the user gets: the final model as deployed against the original (fidelity.py).
    final = fidelity.Reference.of(model, calib, ctx.judge).compare(current) if changed else \
        verify.compare_outputs(names, original, previous,
                               verify.calibrated_decisions(model, calib))
    if current is not model:  # the output records the run (onnxcomp/provenance.py)
        loss, measure = fidelity.bound(final)
        provenance.record_run(current, [(s.name, _changed_options(s.config)) for s in steps],
                              {"loss": round(loss, 6), "measure": measure,
                               "samples": calib.num_samples, "synthetic": calib.synthetic})
    return PipelineResult(current, tuple(results), final, calib.synthetic,
                          ctx.timer.spent.to_dict())


def _changed_options(config: PassConfig) -> dict[str, Any]:
    """The options of ``config`` that differ from its defaults (what a recipe would say)."""
    defaults = type(config)()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(defaults, f.name)
            and f.name != "latency_cache"}


def pipeline_target(config: PassConfig, original: onnx.ModelProto, current: onnx.ModelProto,
                    calib: Calibration, timer: Timer | None = None
                    ) -> tuple[PassConfig | None, str | None, float | None]:
    """The step's config with its targets turned into what is left of the pipeline's.

    ``target_speedup`` and ``target_macs`` are for the whole pipeline. Returns (config, note,
    speedup so far); config ``None`` when the earlier steps already reach every target (the
    step then leaves the model alone). The speedup so far is measured on the step's provider
    (interleaved, batch 1), or read from MACs when the step does not measure latency
    (``latency_check`` off).
    """
    target = getattr(config, "target_speedup", None)
    keep = getattr(config, "target_macs", None)
    if target is None and keep is None:
        return config, None, None
    timed = target is not None and getattr(config, "latency_check", True)
    mac_ratio = 1.0  # MACs now / MACs of the original
    if keep is not None or not timed:
        shapes = {k: (1, *v.shape[1:]) for k, v in calib.batches[0].items()}
        mac_ratio = (cost.model_cost(current, shapes).macs
                     / max(cost.model_cost(original, shapes).macs, 1))
    so_far = 1 / max(mac_ratio, 1e-12)
    if timed:
        feeds = {k: v[:1] for k, v in calib.batches[0].items()}
        cfg = bench.BenchConfig(provider=str(getattr(config, "provider", "cpu")),
                                threads=int(getattr(config, "threads", 1)), warmup=5,
                                runs=max(int(getattr(config, "bench_runs", 30)), 100))
        so_far = (timer or Timer()).compare([original, current], cfg, feeds).speedups[0].median
    what = "measured" if timed else "cut the MACs"
    changes: dict[str, float | None] = {}
    if target is not None and so_far > 1.0:
        changes["target_speedup"] = target / so_far if so_far < target else None
    if keep is not None and mac_ratio < 1.0:
        changes["target_macs"] = keep / mac_ratio if mac_ratio > keep else None
    if not changes:
        return config, None, None
    if all(v is None for v in changes.values()) and len(changes) == (target is not None) + (
            keep is not None):
        return None, (f"the targets are for the whole pipeline and the earlier passes {what} "
                      f"{so_far:.2f}x: nothing left to do"), so_far
    rest = ", ".join(f"--{k.replace('_', '-')} {v:.3g}" for k, v in changes.items()
                     if v is not None)
    note = (f"the targets are for the whole pipeline; the earlier passes {what} {so_far:.2f}x, "
            f"so this pass aims at {rest or 'the remaining target'}")
    return dataclasses.replace(config, **changes), note, so_far


def _note_quantized(model: onnx.ModelProto, report: Report) -> None:
    """Record already-quantized nodes as left alone (no pass rewrites integer ops)."""
    seen = {s.node for s in report.skipped}
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type in QUANTIZED_OPS and name not in seen:
            report.skip(name, node.op_type, SkipReason.QUANTIZED, "integer op left alone")
