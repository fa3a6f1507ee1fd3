"""What a rewrite costs in fidelity, measured one way everywhere.

Every decision that weighs fidelity (``--rank auto``'s bounds, ``quantize --max-drop``, the
sensitivity of a layer, the final report) compares a candidate model with a reference model
on calibration data through a :class:`Reference`: both run in one session configuration, as
deployed (ONNX Runtime's graph optimizations on, so a QDQ model runs its fused integer
kernels; every core, since this is compile-time work). The measures are
:func:`onnxcomp.verify.compare_outputs`'s: the worst output's relative L2 error, and the share
of samples whose decisions (:func:`onnxcomp.verify.decision_outputs`) are all kept.

(The pipeline's check that a lossless pass changed nothing runs with the optimizations off
instead: that is verification of equivalence, not a fidelity measure.)
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx

from onnxcomp import capture, verify
from onnxcomp.calibration import Calibration


def run(model: onnx.ModelProto, calib: Calibration) -> list[np.ndarray]:
    """``model``'s outputs on every calibration batch, as deployed (concatenated)."""
    return capture.run_model(model, calib, threads=os.cpu_count() or 1, optimize=True)


def drop(fid: verify.Fidelity) -> float:
    """One number for "how much was lost", the larger the worse.

    1 - the share of samples whose decisions are all kept when the model has decision
    outputs; else 1 - top-1 agreement for a classifier-like output (2-D, several classes);
    else the relative L2 error of the outputs.
    """
    kept = fid.decision_agreement if fid.decision_agreement is not None else fid.top1_agreement
    return 1.0 - kept if kept is not None else fid.rel_l2


@dataclasses.dataclass
class Reference:
    """A reference model's outputs on calibration data, to compare candidates with."""

    model: onnx.ModelProto
    calib: Calibration
    names: list[str]
    outputs: list[np.ndarray]
    decisions: list[tuple[int, int]]
    _prepared: verify.PreparedReference | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def of(cls, model: onnx.ModelProto, calib: Calibration) -> Reference:
        """Run ``model`` once on ``calib``; decisions come from its outputs' producers."""
        return cls(model, calib, [o.name for o in model.graph.output], run(model, calib),
                   verify.calibrated_decisions(model, calib))

    def compare(self, candidate: onnx.ModelProto) -> verify.Fidelity:
        """The candidate's fidelity against the reference on the same samples."""
        return self.compare_outputs(run(candidate, self.calib))

    def compare_outputs(self, outputs: list[np.ndarray]) -> verify.Fidelity:
        """The fidelity of outputs computed elsewhere on the same samples."""
        if self._prepared is None:  # the reference converted and measured once
            self._prepared = verify.PreparedReference.of(self.names, self.outputs,
                                                         self.decisions)
        return self._prepared.compare(outputs)

    def first(self, samples: int) -> Reference:
        """The reference on the first ``samples`` samples (whole batches, the last one cut)."""
        sub = self.calib.first(samples)
        n = sub.num_samples
        if all(r.ndim and r.shape[0] == self.calib.num_samples for r in self.outputs):
            outputs = [r[:n] for r in self.outputs]  # batch-first: no need to run again
        else:
            outputs = run(self.model, sub)
        return Reference(self.model, sub, self.names, outputs, self.decisions)
