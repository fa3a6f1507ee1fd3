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
import math
from typing import Any

import numpy as np
import onnx

from onnxcomp import capture, runtime, verify
from onnxcomp import outputs as kinds
from onnxcomp.calibration import Calibration
from onnxcomp.errors import InputError
from onnxcomp.judge import Judge


def run(model: onnx.ModelProto, calib: Calibration) -> list[np.ndarray]:
    """``model``'s outputs on every calibration batch, as deployed (concatenated)."""
    return capture.run_model(model, calib, threads=runtime.compute_threads(), optimize=True)


def bound(fid: verify.Fidelity) -> tuple[float, str]:
    """How much was lost (the larger the worse) and by which measure.

    Where the model's outputs decide something (onnxcomp/outputs.py), the worst of: 1 - the
    share of samples whose argmax decisions are all kept (``decisions``), 1 - the mean F1 of
    the above-threshold score sets (``scores``), and the relative error of the outputs beside
    them (``regression``: boxes next to class scores). Otherwise 1 - top-1 agreement for a
    classifier-like output (``top1``), else the relative L2 error (``rel_l2``). The user's
    terms (onnxcomp/judge.py) count too: 1 - the ``--metric`` score (``metric``), the drop in
    labelled accuracy (``labels``).
    """
    parts: list[tuple[float, str]] = []
    if fid.metric_score is not None:
        parts.append((1.0 - fid.metric_score, "metric"))
    if fid.label_accuracy is not None:
        parts.append((max(0.0, fid.label_accuracy[0] - fid.label_accuracy[1]), "labels"))
    if fid.decision_agreement is not None:
        parts.append((1.0 - fid.decision_agreement, "decisions"))
    if fid.score_agreement is not None:
        parts.append((1.0 - fid.score_agreement, "scores"))
    if parts and fid.regression_rel_l2 is not None:
        parts.append((fid.regression_rel_l2, "regression"))
    if not parts:
        parts.append((1.0 - fid.top1_agreement, "top1") if fid.top1_agreement is not None
                     else (fid.rel_l2, "rel_l2"))
    return max(parts, key=lambda p: p[0])


def drop(fid: verify.Fidelity) -> float:
    """One number for "how much was lost", the larger the worse (see :func:`bound`)."""
    return bound(fid)[0]


def agreement(fid: verify.Fidelity) -> float | None:
    """The share of what the outputs decide that is kept: the worse of decisions and scores.

    None when the model decides nothing (no argmax or score output).
    """
    kept = [a for a in (fid.decision_agreement, fid.score_agreement) if a is not None]
    return min(kept) if kept else None


@dataclasses.dataclass
class Reference:
    """A reference model's outputs on calibration data, to compare candidates with."""

    model: onnx.ModelProto
    calib: Calibration
    names: list[str]
    outputs: list[np.ndarray]
    decisions: list[tuple[int, int]]
    scores: list[kinds.ScoreOutput] = dataclasses.field(default_factory=list)
    judge: Judge = dataclasses.field(default_factory=Judge)
    _prepared: verify.PreparedReference | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def of(cls, model: onnx.ModelProto, calib: Calibration, judge: Judge | None = None
           ) -> Reference:
        """Run ``model`` once on ``calib``; what its outputs decide comes from their producers.

        ``judge``: the run's terms (score threshold, the user's metric, labels).
        """
        judge = judge or Judge()
        if judge.labels is not None and len(judge.labels) != calib.num_samples:
            raise InputError(f"--labels has {len(judge.labels)} labels for "
                             f"{calib.num_samples} calibration samples")
        return cls(model, calib, [o.name for o in model.graph.output], run(model, calib),
                   verify.calibrated_decisions(model, calib),
                   verify.calibrated_scores(model, calib), judge)

    def compare(self, candidate: onnx.ModelProto) -> verify.Fidelity:
        """The candidate's fidelity against the reference on the same samples."""
        return self.compare_outputs(run(candidate, self.calib))

    def compare_outputs(self, outputs: list[np.ndarray]) -> verify.Fidelity:
        """The fidelity of outputs computed elsewhere on the same samples."""
        if self._prepared is None:  # the reference converted and measured once
            self._prepared = verify.PreparedReference.of(self.names, self.outputs,
                                                         self.decisions, self.scores,
                                                         self.judge.score_threshold)
        fid = self._prepared.compare(outputs)
        extra: dict[str, Any] = {}
        if self.judge.metric is not None:
            extra["metric_score"] = float(np.mean([
                self.judge.score(ref, got) for ref, got in zip(
                    self._batches(self.outputs), self._batches(outputs), strict=True)]))
        if self.judge.labels is not None:
            extra["label_accuracy"] = (self._accuracy(self.outputs), self._accuracy(outputs))
        return dataclasses.replace(fid, **extra) if extra else fid

    def _batches(self, outputs: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Concatenated outputs cut back into the calibration batches."""
        sizes = [len(next(iter(b.values()))) for b in self.calib.batches]
        cuts = np.cumsum(sizes)[:-1]
        per_output = [np.split(o, cuts) if o.ndim and o.shape[0] == sum(sizes)
                      else [o] * len(sizes) for o in outputs]
        return [list(parts) for parts in zip(*per_output, strict=True)]

    def _accuracy(self, outputs: list[np.ndarray]) -> float:
        """Labelled accuracy of the first classifier-like output (argmax over axis 1)."""
        assert self.judge.labels is not None
        index = self.decisions[0][0] if self.decisions else 0
        out = np.asarray(outputs[index])
        if out.ndim < 2 or out.shape[0] != len(self.judge.labels):
            raise InputError(f"--labels: output '{self.names[index]}' of shape {out.shape} "
                             f"has no class axis for {len(self.judge.labels)} labels")
        guess = out.reshape(out.shape[0], out.shape[1], -1)[:, :, 0].argmax(axis=1)
        return float(np.mean(guess == self.judge.labels))

    def first(self, samples: int) -> Reference:
        """The reference on the first ``samples`` samples (whole batches, the last one cut)."""
        sub = self.calib.first(samples)
        n = sub.num_samples
        if all(r.ndim and r.shape[0] == self.calib.num_samples for r in self.outputs):
            outputs = [r[:n] for r in self.outputs]  # batch-first: no need to run again
        else:
            outputs = run(self.model, sub)
        judge = self.judge.first(n)
        return Reference(self.model, sub, self.names, outputs, self.decisions, self.scores,
                         judge)


# The confidence of the loss bounds said about held-back samples.
CONFIDENCE = 0.95
# Losses that count samples: each sample kept or changed.
COUNTED = ("decisions", "top1")


def loss_upper_bound(changed: int, samples: int, confidence: float = CONFIDENCE) -> float:
    """The most a model could change on new data, given ``changed`` of ``samples`` changed.

    One-sided Clopper-Pearson bound: the change rate ``p`` at which seeing ``changed`` or
    fewer in ``samples`` has probability ``1 - confidence``. None of 16 changed still allows
    17 %; none of 59 allows 5 %.
    """
    if samples <= 0 or changed >= samples:
        return 1.0

    def at_most(p: float) -> float:  # P(X <= changed), X ~ Binomial(samples, p), in logs
        whole = math.lgamma(samples + 1)
        return sum(math.exp(whole - math.lgamma(i + 1) - math.lgamma(samples - i + 1)
                            + i * math.log(p) + (samples - i) * math.log1p(-p))
                   for i in range(changed + 1))

    lo, hi = changed / samples, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at_most(mid) > 1 - confidence else (lo, mid)
    return hi


def samples_to_confirm(budget: float, confidence: float = CONFIDENCE) -> int:
    """Samples that, none of them changed, bound the loss on new data under ``budget``."""
    if budget >= 1:
        return 1
    if budget <= 0:
        raise ValueError("a zero budget is never confirmed by counting samples")
    return math.ceil(math.log(1 - confidence) / math.log(1 - budget))


def unconfirmed(loss: float, metric: str, samples: int, budget: float, held_back: int = 1
                ) -> str:
    """What a counted loss on ``samples`` leaves open about new data ("" when it confirms).

    ``held_back``: calibration samples per sample judged (so the advice counts what to give).
    """
    if metric not in COUNTED or samples <= 0 or budget <= 0:
        return ""
    changed = round(loss * samples)
    upper = loss_upper_bound(changed, samples)
    if upper <= budget:
        return ""
    need = samples_to_confirm(budget)
    return (f"{changed} of the {samples} samples judged changed: on new data the loss may be "
            f"up to {upper:.2g} ({CONFIDENCE:.0%} confidence), which does not confirm "
            f"--max-drop {budget:g} ({need * held_back} calibration samples, none of the "
            f"{need} judged changed, would)")


# Every CHECK_EVERY-th calibration sample is held back to judge what was compiled on the
# others (refits and sensitivities fit the samples they see: --auto's plans), when there are
# at least MIN_CHECK_SAMPLES.
CHECK_EVERY = 4
MIN_CHECK_SAMPLES = 16


def split_check(calib: Calibration, judge: Judge) -> tuple[Calibration, Calibration | None,
                                                          Judge, Judge]:
    """(fit, check, fit judge, check judge): every CHECK_EVERY-th sample held back.

    Too few samples, or synthetic ones: everything is fit, nothing held back (check None).
    """
    n = calib.num_samples
    if calib.synthetic or n < MIN_CHECK_SAMPLES:
        return calib, None, judge, judge
    arrays = {k: np.concatenate([b[k] for b in calib.batches]) for k in calib.input_names}
    held = np.arange(n) % CHECK_EVERY == CHECK_EVERY - 1
    size = max(calib.batch_sizes())

    def part(mask: np.ndarray, what: str) -> Calibration:
        sel = {k: v[mask] for k, v in arrays.items()}
        m = int(mask.sum())
        return Calibration([{k: v[i:i + size] for k, v in sel.items()} for i in range(0, m, size)],
                           False, f"{calib.source} ({what})")

    def labels(mask: np.ndarray) -> Judge:
        return judge if judge.labels is None else dataclasses.replace(
            judge, labels=judge.labels[mask])

    return (part(~held, "compile samples"), part(held, "held-back samples"), labels(~held),
            labels(held))
