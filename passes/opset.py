"""Upgrade the model's default-domain opset with onnx's version converter (lossless).

Reference: the ONNX version converter (onnx.version_converter), which rewrites each op to its
form at the target opset.

Before: a model at opset N < target. After: the same graph at opset ``target`` (ops rewritten
where their signature changed, e.g. Clip's bounds become inputs at 11, Split's sizes at 13).

Why: per-channel DequantizeLinear (its ``axis`` attribute) needs opset 13, and per-tensor
weights cost much fidelity; ``quantize --mode static`` runs this first on older models. The
pipeline verifies the outputs did not change.

Skipped, with a reason: a model already at or past the target, or one the converter cannot
convert (an op with no adapter, a custom domain it does not know); the model is left as it is.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx
from onnx import version_converter

from onnxcomp import passbase as pb
from onnxcomp.calibration import Calibration
from onnxcomp.errors import ConfigError
from onnxcomp.model import check_model, copy_model, default_opset

# The oldest and newest opsets this pass converts to (the converter's own range is wider).
MIN_TARGET, MAX_TARGET = 11, 21


@dataclasses.dataclass(frozen=True)
class OpsetConfig(pb.PassConfig):
    """Options of ``opset``."""

    target_opset: int = pb.option(13, 'opset: the default-domain opset to convert to.')

    def __post_init__(self) -> None:
        if not MIN_TARGET <= self.target_opset <= MAX_TARGET:
            raise ConfigError(f"--target-opset must be in [{MIN_TARGET}, {MAX_TARGET}], got "
                              f"{self.target_opset}")


def convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto | str:
    """``model`` at opset ``target``, or why the converter could not do it."""
    try:
        out = version_converter.convert_version(model, target)
        check_model(out)
    except Exception as exc:  # noqa: BLE001 - any converter failure: the model stays as it is
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return out


class Opset(pb.PassBase, name="opset", lossless=True, config=OpsetConfig):
    """The ``opset`` pass."""

    tags_new_nodes: ClassVar[bool] = False  # the converter rewrites ops

    def call(self, model: onnx.ModelProto, config: pb.PassConfig,
             calib: Calibration | None, ctx: pb.RunContext) -> pb.PassResult:
        """A copy of ``model`` at ``config.target_opset``."""
        assert isinstance(config, OpsetConfig)
        report = pb.Report(self.name)
        now = default_opset(model) or 0
        target = config.target_opset
        if now >= target:
            report.add_skip(pb.Skip("<model>", "opset", pb.SkipReason.NOT_NEEDED,
                                 f"opset {now} >= {target}"))
            return pb.PassResult(copy_model(model), report)
        out = convert(model, target)
        if isinstance(out, str):
            report.add_skip(pb.Skip("<model>", "opset", pb.SkipReason.UNSUPPORTED_ATTRIBUTE,
                                 f"the onnx version converter could not go from {now} to "
                                 f"{target}: {out}"))
            return pb.PassResult(copy_model(model), report)
        report.apply(pb.Change(node="<model>", op_type="opset", what=f"opset {now} -> {target}",
                            error=0.0, details={"from": now, "to": target}))
        return pb.PassResult(out, report)


PASS = Opset()
