"""What a model's outputs decide, so fidelity is judged on what its users read from them.

- **decisions**: argmax over a class axis (softmax / log-softmax outputs, or logits from a
  linear layer when there is no softmax), at every other position;
- **scores**: sigmoid outputs (probability maps of segmenters and text detectors, class
  scores of detectors), whose decision is "above a threshold"; also the sigmoid part of an
  output that concatenates boxes and scores (``[1, 4 + C, anchors]``);
- everything else is a **regression** output (boxes, landmarks, embeddings), judged by its
  relative error.

Scores are compared per sample as the F1 (Dice) of the two above-threshold sets: the share
of a detector's confident cells that both models agree on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx

from onnxcomp import model as model_io
from onnxcomp.judge import SCORE_THRESHOLD  # noqa: F401 - the default "confident" threshold
from onnxcomp.ops import DECISION_PASS_THROUGH

# Ops a whole-tensor score may be read through (elementwise thresholding ignores layout).
_SCORE_PASS_THROUGH = DECISION_PASS_THROUGH | {"Transpose"}
_SIGMOIDS = ("Sigmoid",)


@dataclasses.dataclass(frozen=True)
class ScoreOutput:
    """The score part of output ``index``: all of it, or ``[start, stop)`` along ``axis``."""

    index: int
    axis: int | None = None
    start: int = 0
    stop: int = 0

    def part(self, value: np.ndarray) -> np.ndarray:
        """The scores of ``value`` (that output), one row per sample."""
        if self.axis is not None:
            value = np.take(value, np.arange(self.start, self.stop), axis=self.axis)
        return value.reshape(value.shape[0], -1) if value.ndim else value.reshape(1, -1)

    def rest(self, value: np.ndarray) -> np.ndarray:
        """What ``value`` holds besides the scores (the boxes of a boxes + scores output)."""
        if self.axis is None:
            return value[:0]
        keep = [i for i in range(value.shape[self.axis]) if not self.start <= i < self.stop]
        return np.take(value, keep, axis=self.axis)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _is_sigmoid(name: str, producer: dict[str, onnx.NodeProto],
                through: frozenset[str] | set[str]) -> bool:
    node = producer.get(name)
    while node is not None and node.op_type in through and node.input:
        node = producer.get(node.input[0])
    return node is not None and node.op_type in _SIGMOIDS


def _static_shape(value: onnx.ValueInfoProto) -> list[int | None] | None:
    tt = value.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]


def probability_maps(model: onnx.ModelProto) -> list[ScoreOutput]:
    """Two-class softmax maps (face / no face per position: MTCNN's PNet) as score maps.

    The positive class's probability per position is judged like a sigmoid map. A softmax
    output of rank 3 or more whose class axis has 2 classes; the score is class 1.
    """
    producer = _producers(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    found = []
    for i, out in enumerate(model.graph.output):
        node = producer.get(out.name)
        while node is not None and node.op_type in ("Identity", "Cast") and node.input:
            node = producer.get(node.input[0])
        shape = _static_shape(out)
        if node is None or node.op_type != "Softmax" or shape is None or len(shape) < 3:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"),
                    -1 if opset >= 13 else 1) % len(shape)
        if shape[axis] == 2:
            found.append(ScoreOutput(i, int(axis), 1, 2))
    return found


def score_outputs(model: onnx.ModelProto) -> list[ScoreOutput]:
    """The score outputs of ``model`` (see the module docstring).

    An output computed by a Sigmoid (through reshapes, casts, transposes) is all scores. An
    output computed by a Concat of sigmoid and other inputs holds scores in the sigmoid
    inputs' ranges along the concat axis, when shape inference gives every input's size on
    that axis; otherwise it is left to the regression error. Two-class softmax maps count
    too (:func:`probability_maps`).
    """
    producer = _producers(model)
    found: list[ScoreOutput] = probability_maps(model)
    sized: dict[str, int | None] | None = None
    for i, out in enumerate(model.graph.output):
        if _is_sigmoid(out.name, producer, _SCORE_PASS_THROUGH):
            found.append(ScoreOutput(i))
            continue
        node = producer.get(out.name)
        while node is not None and node.op_type in ("Identity", "Cast") and node.input:
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Concat":
            continue
        sig = [_is_sigmoid(x, producer, DECISION_PASS_THROUGH - {"Flatten", "Reshape"})
               for x in node.input]
        if not any(sig) or all(sig):
            if all(sig):
                found.append(ScoreOutput(i))
            continue
        if sized is None:
            sized = _axis_sizes(model)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        spans: list[tuple[int, int]] = []
        offset = 0
        for x, is_score in zip(node.input, sig, strict=True):
            size = sized.get(f"{x}@{axis}")
            if size is None:
                spans = []
                break
            if is_score:
                spans.append((offset, offset + size))
            offset += size
        # one contiguous block of scores (boxes first, then classes, as detectors export)
        if len(spans) == 1:
            found.append(ScoreOutput(i, int(axis), *spans[0]))
    return found


def _axis_sizes(model: onnx.ModelProto) -> dict[str, int | None]:
    """``"tensor@axis" -> static size`` of every inferred tensor (all axes, both signs)."""
    inferred = model_io.infer_shapes(model)
    g = inferred.graph
    out: dict[str, int | None] = {}
    for value in [*g.input, *g.value_info, *g.output]:
        tt = value.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tt.shape.dim
        for k, d in enumerate(dims):
            size = int(d.dim_value) if d.HasField("dim_value") else None
            out[f"{value.name}@{k}"] = size
            out[f"{value.name}@{k - len(dims)}"] = size
    return out


def above(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Per sample, which scores are above ``threshold`` (bool, one row per sample)."""
    return np.asarray(scores > threshold)


def f1_per_sample(ref_above: np.ndarray, got_above: np.ndarray) -> np.ndarray:
    """F1 (Dice) of two above-threshold sets per row; 1 where both are empty."""
    both = np.logical_and(ref_above, got_above).sum(axis=1)
    total = ref_above.sum(axis=1) + got_above.sum(axis=1)
    return np.where(total == 0, 1.0, 2.0 * both / np.maximum(total, 1))


def regression_outputs(count: int, decisions: Sequence[tuple[int, int]],
                       scores: Sequence[ScoreOutput]) -> list[int]:
    """Outputs (of ``count``) that are neither decisions nor wholly scores."""
    judged = {i for i, _ in decisions} | {s.index for s in scores if s.axis is None}
    return [i for i in range(count) if i not in judged]
