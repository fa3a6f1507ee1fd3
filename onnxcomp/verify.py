"""Verification of a rewritten model: checker, ORT loads it, same outputs, measured fidelity."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxcomp import model as model_io
from onnxcomp import outputs as kinds
from onnxcomp import serial
from onnxcomp.errors import PassError
from onnxcomp.ops import DECISION_PASS_THROUGH

if TYPE_CHECKING:
    from onnxcomp.calibration import Calibration

LOSSLESS_RTOL = 1e-4
LOSSLESS_ATOL = 1e-5
# A lossless pass may move outputs up to this many times as far as ORT's own fusions move them.
NOISE_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class OutputFidelity(serial.Record):
    """How far one output of a model is from the reference model's output."""

    name: str
    rel_l2: float
    max_abs: float
    ref_max_abs: float
    top1_agreement: float | None = None


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Per-output fidelity; ``rel_l2`` is the worst output's relative L2 error."""

    outputs: tuple[OutputFidelity, ...]
    num_samples: int
    # Share of samples whose decisions are all unchanged (see decision_agreement); None when
    # the model has no decision output or none was named.
    decision_agreement: float | None = None
    # Mean over samples of the F1 of the above-threshold sets of the score outputs (the
    # worst score output per sample; see onnxcomp/outputs.py); None without score outputs.
    score_agreement: float | None = None
    # Worst relative error of the outputs that are neither decisions nor scores, when the
    # model also has decisions or scores (boxes beside class scores); else None.
    regression_rel_l2: float | None = None
    # The user's --metric (mean over batches, 1 = as good as the reference); None without one.
    metric_score: float | None = None
    # --labels: labelled accuracy of the reference and of the candidate; None without labels.
    label_accuracy: tuple[float, float] | None = None

    @property
    def rel_l2(self) -> float:
        """Worst relative L2 error over outputs."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def top1_agreement(self) -> float | None:
        """Top-1 agreement of the first classifier-like output, when there is one."""
        for o in self.outputs:
            if o.top1_agreement is not None:
                return o.top1_agreement
        return None

    def within(self, rtol: float = LOSSLESS_RTOL, atol: float = LOSSLESS_ATOL) -> bool:
        """True when every output satisfies max|a-b| <= atol + rtol * max|ref|."""
        return all(o.max_abs <= atol + rtol * o.ref_max_abs for o in self.outputs)

    def within_noise(self, noise: Fidelity, factor: float = NOISE_FACTOR) -> bool:
        """True when every output is within ``factor`` times ``noise``'s error, plus tolerance.

        ``noise`` compares the reference model with itself run another way (ORT's fusions on
        instead of off): float32 reassociation alone moves outputs that far on these inputs,
        so a lossless rewrite cannot be held to less.
        """
        floor = {o.name: o.max_abs for o in noise.outputs}
        return all(
            o.max_abs <= LOSSLESS_ATOL + LOSSLESS_RTOL * o.ref_max_abs + factor * floor[o.name]
            for o in self.outputs
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return serial.as_dict(self, "rel_l2", "top1_agreement")


@dataclasses.dataclass(frozen=True)
class PreparedReference:
    """Reference outputs with what every comparison needs of them computed once."""

    names: tuple[str, ...]
    outputs: tuple[np.ndarray, ...]  # float64
    norms: tuple[float, ...]
    max_abs: tuple[float, ...]
    top1: tuple[np.ndarray | None, ...]  # argmax over axis 1 of 2-D classifier-like outputs
    decisions: tuple[tuple[int, int], ...]
    decided: tuple[np.ndarray | None, ...]  # per decision: argmax over its axis
    scores: tuple[kinds.ScoreOutput, ...] = ()
    threshold: float = kinds.SCORE_THRESHOLD
    scored: tuple[np.ndarray, ...] = ()  # per score output: the reference's above-threshold

    @classmethod
    def of(cls, names: Sequence[str], reference: Sequence[np.ndarray],
           decisions: Sequence[tuple[int, int]] = (),
           scores: Sequence[kinds.ScoreOutput] = (),
           threshold: float = kinds.SCORE_THRESHOLD) -> PreparedReference:
        """Convert and measure ``reference`` once."""
        refs = tuple(np.asarray(r, dtype=np.float64) for r in reference)
        return cls(
            tuple(names), refs,
            tuple(float(np.linalg.norm(r)) for r in refs),
            tuple(float(np.max(np.abs(r))) if r.size else 0.0 for r in refs),
            tuple(r.argmax(axis=1) if r.ndim == 2 and r.shape[1] > 1 else None
                  for r in refs),
            tuple(decisions),
            tuple(_decided(refs[i], axis) for i, axis in decisions),
            tuple(scores), float(threshold),
            tuple(kinds.above(s.part(refs[s.index]), threshold) for s in scores))

    def compare(self, candidate: Sequence[np.ndarray]) -> Fidelity:
        """Fidelity of ``candidate`` outputs against this reference."""
        per_output = []
        samples = 0
        for k, (name, ref64) in enumerate(zip(self.names, self.outputs, strict=True)):
            got = np.asarray(candidate[k])
            if ref64.shape != got.shape:
                raise PassError(f"output '{name}' changed shape: {ref64.shape} -> {got.shape}")
            diff = np.subtract(got, ref64, dtype=np.float64)
            norm = self.norms[k]
            rel = float(np.linalg.norm(diff)) / norm if norm > 0 else float(
                np.linalg.norm(diff))
            top1 = None
            if self.top1[k] is not None:
                top1 = float(np.mean(self.top1[k] == got.argmax(axis=1)))
            samples = max(samples, ref64.shape[0] if ref64.ndim else 1)
            per_output.append(OutputFidelity(
                name=name, rel_l2=rel,
                max_abs=float(np.max(np.abs(diff))) if diff.size else 0.0,
                ref_max_abs=self.max_abs[k], top1_agreement=top1))
        agreement = None
        if self.decisions:
            agree: np.ndarray | None = None
            for (index, axis), ref_decided in zip(self.decisions, self.decided, strict=True):
                if ref_decided is None:
                    continue
                got = np.asarray(candidate[index])
                if got.shape != self.outputs[index].shape:
                    continue
                same = (ref_decided == got.argmax(axis=axis % got.ndim)).reshape(
                    got.shape[0], -1).all(axis=1)
                agree = same if agree is None else agree & same
            agreement = None if agree is None else float(agree.mean())
        score_agreement = None
        if self.scores:
            f1 = np.min([kinds.f1_per_sample(ref_above, kinds.above(
                s.part(np.asarray(candidate[s.index])), self.threshold))
                for s, ref_above in zip(self.scores, self.scored, strict=True)], axis=0)
            score_agreement = float(np.mean(f1))
        regression = None
        if self.decisions or self.scores:
            split = {s.index: s for s in self.scores if s.axis is not None}
            errors = []
            for i in kinds.regression_outputs(len(per_output), self.decisions, self.scores):
                if i in split:  # boxes beside scores: the boxes alone
                    ref_rest = split[i].rest(self.outputs[i])
                    got_rest = split[i].rest(np.asarray(candidate[i], dtype=np.float64))
                    norm = float(np.linalg.norm(ref_rest))
                    diff = float(np.linalg.norm(got_rest - ref_rest))
                    errors.append(diff / norm if norm > 0 else diff)
                else:
                    errors.append(per_output[i].rel_l2)
            regression = max(errors, default=None)
        return Fidelity(tuple(per_output), samples, agreement, score_agreement, regression)


def _decided(ref: np.ndarray, axis: int) -> np.ndarray | None:
    """The reference's decisions (argmax over ``axis``), or None when it decides nothing."""
    if ref.ndim < 2:
        return None
    axis %= ref.ndim
    if axis == 0 or ref.shape[axis] < 2:
        return None
    return np.asarray(ref.argmax(axis=axis))


def compare_outputs(
    names: Sequence[str], reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
    decisions: Sequence[tuple[int, int]] = (),
) -> Fidelity:
    """Fidelity of ``candidate`` outputs against ``reference`` outputs.

    ``decisions``: the decision outputs (see :func:`decision_outputs`) whose agreement to
    measure. Comparing many candidates with one reference: :class:`PreparedReference`.
    """
    return PreparedReference.of(names, reference, decisions).compare(candidate)



def decision_outputs(model: onnx.ModelProto) -> list[tuple[int, int]]:
    """(output index, class axis) of the outputs that carry a decision (argmax of classes).

    Outputs computed by Softmax/LogSoftmax are the decisions (their ``axis``). A model with no
    such output reads linear-layer outputs (Gemm, MatMul, MatMul + Add) as logits over the last
    axis. Anything else (a probability map from Sigmoid or a two-class softmax, a box
    regression beside a softmax output) carries no argmax decision.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)

    def source(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        while node is not None and node.op_type in DECISION_PASS_THROUGH and node.input:
            node = producer.get(node.input[0])
        return node

    softmax: list[tuple[int, int]] = []
    logits: list[tuple[int, int]] = []
    maps = {s.index for s in kinds.probability_maps(model)}  # judged as score maps
    for i, out in enumerate(model.graph.output):
        node = source(out.name)
        if node is None or i in maps:
            continue
        if node.op_type in ("Softmax", "LogSoftmax"):
            axis = next((a.i for a in node.attribute if a.name == "axis"),
                        -1 if opset >= 13 else 1)
            softmax.append((i, int(axis)))
        elif node.op_type in ("Gemm", "MatMul") or (node.op_type == "Add" and any(
                (p := producer.get(x)) is not None and p.op_type == "MatMul"
                for x in node.input)):
            logits.append((i, -1))
    return softmax or logits


def calibrated_decisions(model: onnx.ModelProto, calib: Calibration) -> list[tuple[int, int]]:
    """:func:`decision_outputs` of ``model``, or none on synthetic data (random inputs)."""
    return [] if calib.synthetic else decision_outputs(model)


def calibrated_scores(model: onnx.ModelProto, calib: Calibration) -> list[kinds.ScoreOutput]:
    """:func:`onnxcomp.outputs.score_outputs` of ``model``, or none on synthetic data."""
    return [] if calib.synthetic else kinds.score_outputs(model)


def decision_agreement(decisions: Sequence[tuple[int, int]], reference: Sequence[np.ndarray],
                       candidate: Sequence[np.ndarray]) -> float | None:
    """Share of samples (axis 0) whose every decision is unchanged.

    A decision is the argmax over the class axis, at every other position (a CTC recognizer
    decides one character per step). None when ``decisions`` names no output with a batch
    axis and at least two classes.
    """
    if not decisions:
        return None
    names = [f"output {i}" for i in range(len(reference))]
    return PreparedReference.of(names, reference, decisions).compare(candidate
                                                                     ).decision_agreement


def check_interface(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Raise :class:`PassError` unless the outputs keep their names, types and static dims."""
    b_out = {o.name: o for o in before.graph.output}
    a_out = {o.name: o for o in after.graph.output}
    if list(b_out) != list(a_out):
        raise PassError(f"graph outputs changed: {list(b_out)} -> {list(a_out)}")
    for name, bo in b_out.items():
        ao = a_out[name]
        if bo.type.tensor_type.elem_type != ao.type.tensor_type.elem_type:
            raise PassError(f"output '{name}' changed element type")
        b_dims = _static_dims(bo)
        a_dims = _static_dims(ao)
        if b_dims is not None and a_dims is not None:
            if len(b_dims) != len(a_dims):
                raise PassError(f"output '{name}' changed rank: {b_dims} -> {a_dims}")
            for bd, ad in zip(b_dims, a_dims, strict=True):
                if isinstance(bd, int) and isinstance(ad, int) and bd != ad:
                    raise PassError(f"output '{name}' changed shape: {b_dims} -> {a_dims}")
    b_in = [i.name for i in before.graph.input]
    a_in = [i.name for i in after.graph.input]
    if [n for n in b_in if n in a_in] != [n for n in a_in if n in b_in] or not set(
        _real_inputs(before)
    ) <= set(a_in):
        raise PassError(f"graph inputs changed: {b_in} -> {a_in}")
    model_io.check_model(after, full=False)


def _real_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _static_dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    tt = value.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
