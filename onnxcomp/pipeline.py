"""Run a recipe of passes in order, verifying the model after every pass."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxcomp import runtime, verify
from onnxcomp.model import QUANTIZED_OPS
from onnxcomp.passbase import PassConfig, PassError, Report, SkipReason

if TYPE_CHECKING:
    from onnxcomp.calibrate import Calibration
    from onnxcomp.passbase import Pass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Step:
    """One pass of a recipe with its configuration."""

    name: str
    config: PassConfig


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did and what it cost in fidelity (vs the model before the step)."""

    name: str
    lossless: bool
    report: Report
    fidelity: verify.Fidelity
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "pass": self.name,
            "lossless": self.lossless,
            "seconds": round(self.seconds, 3),
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "steps": [s.to_dict() for s in self.steps],
            "fidelity_vs_original": self.fidelity.to_dict(),
            "synthetic_calibration": self.synthetic_calibration,
        }


def model_outputs(model: onnx.ModelProto, calib: Calibration) -> tuple[list[str], list[np.ndarray]]:
    """The model's outputs on every calibration batch (ORT CPU, fusions off), concatenated."""
    session = runtime.make_session(model, "cpu", threads=1, optimize=False)
    names = runtime.output_names(session)
    return names, runtime.concat_outputs(runtime.run_batches(session, calib.batches, names))


def run_pipeline(
    model: onnx.ModelProto,
    steps: Sequence[Step],
    calib: Calibration,
    registry: Mapping[str, Pass[Any]] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run ``steps`` in order on ``model``; verify after each; never mutate ``model``.

    After every pass: the interface (output names, types, static dims) is unchanged, the model
    passes the checker and loads in ONNX Runtime, and its outputs on the calibration batches are
    compared with the pre-pass model's. A lossless pass outside tolerance raises
    :class:`PassError`; a lossy pass's error is recorded.
    """
    if registry is None:
        from onnxcomp.passes import REGISTRY

        registry = REGISTRY
    names, original = model_outputs(model, calib)
    previous = original
    current = model
    results: list[StepResult] = []
    for step in steps:
        pass_ = registry[step.name]
        if on_step is not None:
            on_step(step.name)
        start = time.perf_counter()
        result = pass_(current, step.config, calib)
        seconds = time.perf_counter() - start
        if result.model is current:
            raise PassError(f"pass '{step.name}' returned its input model object")
        verify.check_interface(current, result.model)
        if result.modified:
            _, outputs = model_outputs(result.model, calib)
        else:
            outputs = previous
        fidelity = verify.compare_outputs(names, previous, outputs)
        if pass_.lossless and not fidelity.within(verify.LOSSLESS_RTOL, verify.LOSSLESS_ATOL):
            raise PassError(
                f"lossless pass '{step.name}' changed the outputs "
                f"(relative L2 error {fidelity.rel_l2:.3g})"
            )
        result.report.metrics.setdefault("rel_l2_error", fidelity.rel_l2)
        _note_quantized(current, result.report)
        log.info("%s: %d applied, %d skipped, rel error %.3g", step.name,
                 len(result.report.applied), len(result.report.skipped), fidelity.rel_l2)
        results.append(StepResult(step.name, pass_.lossless, result.report, fidelity, seconds))
        current = result.model
        previous = outputs
    final = verify.compare_outputs(names, original, previous)
    return PipelineResult(current, tuple(results), final, calib.synthetic)


def _note_quantized(model: onnx.ModelProto, report: Report) -> None:
    """Record already-quantized nodes as left alone (no pass rewrites integer ops)."""
    seen = {s.node for s in report.skipped}
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type in QUANTIZED_OPS and name not in seen:
            report.skip(name, node.op_type, SkipReason.QUANTIZED, "integer op left alone")
