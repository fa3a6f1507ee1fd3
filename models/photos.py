"""Real photographs and text crops for calibration and held-out evaluation, built offline.

Usage::

    python models/photos.py          # write the photo and text-crop sets into the cache

Sources are only images that ship inside installed packages (no downloads): scikit-image's
bundled ``skimage.data`` images (the ones stored in the package, not the pooch-fetched ones) and
scikit-learn's ``load_sample_images`` (china, flower).

Photo sets (224 x 224 RGB uint8, NHWC, key ``images``; plus ``sources``, the source of each crop):

* ``photos_calib_224.npz``: 64 crops of astronaut, coffee, rocket, china, motorcycle_left,
  hubble_deep_field, camera, coins.
* ``photos_heldout_224.npz``: 64 crops of *other* images: chelsea, flower, retina,
  immunohistochemistry, moon, brick. No source image is shared with the calibration set.
* ``photos_heldout512_224.npz``: 512 other crops of the held-out images (8x the counts above,
  seed 5679). 64 samples put a standard error of about 4.5 points on an agreement near 85 %
  (one sample is 1.6 points), more than most differences between int8 recipes; 512 cut it to
  about 1.6 (the crops of one image are not independent, so somewhat more in fact).
* ``photos_calib_dir/``: the first 16 calibration crops as 12 PNG and 4 JPEG files, for
  ``onnxcomp ... --calib <folder>``.

Each crop is a seeded random square-ish window (10-100 % of the largest square's area, aspect
3/4-4/3) resized to 224 x 224 with anti-aliasing. Grayscale sources are repeated to 3 channels.
:func:`to_nchw` turns a set into a model-ready float32 NCHW batch for given mean/std.

Text crops (for the PP-OCRv4 recognizer, 3 x 48 x W input):

* Words and groups of words cut from ``skimage.data.page()`` (a photographed book page), found
  with an ink mask and row/column projection profiles, plus a few windows of the handwriting in
  ``skimage.data.text()``. Lines 0, 2, 4, 6 of the page go to the calibration set, lines 1, 3, 5
  to the held-out set; text() windows from its left half to calibration, right half to held-out.
* Words and groups of words cut from two scanned pages in ocrmypdf's source distribution (its
  test resources, fetched once from PyPI's simple index and checked against a pinned sha256;
  their licences are in that package's REUSE.toml: ``linn.png``, a 1985 product brochure in
  English, (C) Forat Electronics; ``typewriter.png``, a typewritten Dutch recipe, (C) 2005
  Ellywa; CC-BY-SA-3.0 or GFDL). Every third crop of ``linn`` goes to the held-out set, every
  other crop of ``typewriter`` to the calibration set: no page is shared between the sets.
  Words are found at half resolution (150 dpi) by dilating the ink mask along rows by about
  one letter height and cutting the connected pieces at their column gaps.
* Each crop is resized to height 48 keeping its aspect ratio (width at most 320) and stored
  left-aligned in a [48, 320, 3] uint8 canvas; the rest of the canvas is 0 and ``widths`` holds
  the used width. :func:`text_batch` normalizes like PaddleOCR, ``(x / 255 - 0.5) / 0.5``, and
  sets the padding to 0 *after* normalization, exactly as rapidocr pads its batches.
  ``sources`` names the page of each crop (``page``, ``text``, ``linn``, ``typewriter``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import re
import tarfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import paths

log = logging.getLogger("photos")

SIZE = 224
TEXT_HEIGHT = 48
TEXT_WIDTH = 320
CALIB_SEED = 1234
HELDOUT_SEED = 5678
HELDOUT512_SEED = 5679
N_DIR_PNG = 12
N_DIR_JPEG = 4

# Version of the text sets: caches written by an older build are rebuilt.
TEXT_SETS_VERSION = 2
# Scanned pages (test resources of ocrmypdf's source distribution, fetched from PyPI).
SCANS_SDIST = "ocrmypdf-17.13.0.tar.gz"
SCANS_SHA256 = "151c35d810eb628fbc5cb9bbe80b834ecf094737efa0e7a2e9e1fac3c730ed49"
SCANS = ("linn", "typewriter")
SCAN_EVERY = {"linn": 3, "typewriter": 2}  # keep every n-th crop

# source image -> number of crops taken from it
CALIB_SOURCES: dict[str, int] = {
    "astronaut": 10, "coffee": 10, "rocket": 10, "china": 10,
    "motorcycle_left": 8, "hubble_deep_field": 6, "camera": 5, "coins": 5,
}  # fmt: skip
HELDOUT_SOURCES: dict[str, int] = {
    "chelsea": 16, "flower": 16, "retina": 8, "immunohistochemistry": 8, "moon": 8, "brick": 8,
}  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_source(name: str) -> np.ndarray:
    """Return a bundled image as uint8 RGB [H, W, 3] (grayscale repeated to 3 channels)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif name in ("motorcycle_left", "motorcycle_right"):
        import skimage.data

        left, right, _ = skimage.data.stereo_motorcycle()
        image = left if name == "motorcycle_left" else right
    else:
        import skimage.data

        loader: Callable[[], np.ndarray] = getattr(skimage.data, name)
        image = loader()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8:
        raise TypeError(f"{name}: expected uint8, got {image.dtype}")
    return np.ascontiguousarray(image[:, :, :3])


def _resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from skimage.transform import resize

    out = resize(image, (height, width), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def random_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Cut ``count`` random windows from ``image`` and resize each to 224 x 224 (uint8 RGB)."""
    h, w = image.shape[:2]
    side = min(h, w)
    crops = []
    for _ in range(count):
        area = rng.uniform(0.10, 1.0) * side * side
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        crops.append(_resize_uint8(image[top : top + ch, left : left + cw], SIZE, SIZE))
    return np.stack(crops)


def make_photo_set(sources: dict[str, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (crops [N, 224, 224, 3] uint8, source name of each crop)."""
    rng = np.random.default_rng(seed)
    crops, names = [], []
    for name, count in sources.items():
        crops.append(random_crops(load_source(name), count, rng))
        names += [name] * count
    return np.concatenate(crops), np.array(names)


def to_nchw(
    images: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: float = 1 / 255,
    bgr: bool = False,
) -> np.ndarray:
    """Turn uint8 RGB images [N, H, W, 3] into float32 [N, 3, H, W]: ``(x * scale - mean) / std``.

    With ``bgr=True`` the channels are reversed first, and ``mean``/``std`` apply to the
    reversed order.
    """
    x = images[..., ::-1] if bgr else images
    x = x.astype(np.float32) * np.float32(scale)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_photos(split: str) -> np.ndarray:
    """Load the cached ``"calib"``, ``"heldout"`` or ``"heldout512"`` photo set (uint8 NHWC)."""
    path = paths.data_path(f"photos_{split}_224.npz")
    with np.load(path) as data:
        return data["images"]


# --------------------------------------------------------------------------------------------
# Text crops
# --------------------------------------------------------------------------------------------


def _runs(mask: np.ndarray, min_gap: int = 1) -> list[tuple[int, int]]:
    """Return [start, stop) of the runs of True, merging runs separated by < min_gap False."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, value in enumerate(mask):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    merged: list[tuple[int, int]] = []
    for run in runs:
        if merged and run[0] - merged[-1][1] < min_gap:
            merged[-1] = (merged[-1][0], run[1])
        else:
            merged.append(run)
    return merged


def page_words() -> list[list[tuple[int, int, int, int]]]:
    """Find the words of ``skimage.data.page()``: one list of (top, bottom, left, right) per line.

    Ink is what is clearly darker than a heavily blurred copy of the page (the page is unevenly
    lit). Lines are runs of rows with enough ink; words are runs of inked columns separated by
    gaps of at least 5 columns.
    """
    import skimage.data
    from skimage.filters import gaussian

    page = skimage.data.page().astype(np.float32) / 255
    ink = page < gaussian(page, sigma=12) - 0.12
    lines = [(a, b) for a, b in _runs(ink.sum(axis=1) >= 12) if b - a >= 8]
    words = []
    for top, bottom in lines:
        pad = max(3, (bottom - top) // 4)  # room for ascenders and descenders
        top, bottom = max(0, top - pad), min(page.shape[0], bottom + pad)
        columns = ink[top:bottom].any(axis=0)
        words.append([(top, bottom, a, b) for a, b in _runs(columns, min_gap=5)])
    return words


def _line_crops(image: np.ndarray, words: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """Crop every word, and greedy groups of consecutive words that fit a 48 x 320 canvas."""
    top, bottom = min(w[0] for w in words), max(w[1] for w in words)
    max_width = (bottom - top) * TEXT_WIDTH // TEXT_HEIGHT
    margin = 3
    boxes = [(w[2], w[3]) for w in words]
    groups: list[tuple[int, int]] = []
    for left, right in boxes:
        if groups and right - groups[-1][0] <= max_width - 2 * margin:
            groups[-1] = (groups[-1][0], right)
        else:
            groups.append((left, right))
    spans = boxes + [g for g in groups if g not in boxes]
    return [image[top:bottom, max(0, left - margin) : right + margin] for left, right in spans]


def _text_windows(rng: np.random.Generator, count: int, half: int) -> list[np.ndarray]:
    """Random 5:1 windows over the handwriting in ``skimage.data.text()``.

    Each window is centered in the left (``half=0``) or right (``half=1``) half of the image.
    """
    import skimage.data

    image = skimage.data.text()
    h, w = image.shape
    crops = []
    for _ in range(count):
        height = int(rng.integers(32, 56))
        width = height * 5
        top = int(rng.integers(0, h - height + 1))
        center = int(rng.integers(half * w // 2, (half + 1) * w // 2))
        left = min(max(0, center - width // 2), w - width)
        crops.append(image[top : top + height, left : left + width])
    return crops


def to_text_canvas(crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Resize gray crops to height 48 (width <= 320) on a zero canvas; return (images, widths)."""
    images = np.zeros((len(crops), TEXT_HEIGHT, TEXT_WIDTH, 3), np.uint8)
    widths = np.zeros(len(crops), np.int32)
    for i, crop in enumerate(crops):
        width = min(TEXT_WIDTH, int(np.ceil(crop.shape[1] * TEXT_HEIGHT / crop.shape[0])))
        resized = _resize_uint8(crop, TEXT_HEIGHT, width)
        images[i, :, :width] = resized[:, :, None]
        widths[i] = width
    return images, widths


def fetch_scans(force: bool = False) -> dict[str, Path]:
    """The scanned pages as PNG files in the cache (downloaded and extracted once)."""
    folder = paths.data_path("scans")
    files = {name: folder / f"{name}.png" for name in SCANS}
    if not force and all(f.exists() for f in files.values()):
        return files
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    listing = urllib.request.urlopen(f"{index}/ocrmypdf/", timeout=120).read().decode()
    links = [h.replace("&amp;", "&") for h in re.findall(r'href="([^"]+)"', listing)
             if SCANS_SDIST in h]
    if not links:
        raise RuntimeError(f"{SCANS_SDIST} is not listed in {index}/ocrmypdf/")
    url = links[0] if "://" in links[0] else f"{index}/ocrmypdf/{links[0]}"
    log.info("downloading %s", url.split("#")[0])
    data = urllib.request.urlopen(url, timeout=300).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SCANS_SHA256:
        raise RuntimeError(f"{SCANS_SDIST}: sha256 {digest}, expected {SCANS_SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    root = SCANS_SDIST.removesuffix(".tar.gz")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name, path in files.items():
            member = tar.extractfile(f"{root}/tests/resources/{name}.png")
            if member is None:
                raise RuntimeError(f"{name}.png is not a file in {SCANS_SDIST}")
            tmp = path.with_suffix(".part")
            tmp.write_bytes(member.read())
            tmp.replace(path)
    return files


def scan_crops(name: str) -> list[np.ndarray]:
    """Words and groups of words of one scanned page, at half resolution, in reading order.

    Ink is what is darker than mid-gray. The letter height ``h`` is the median height of the
    ink's connected pieces; dilating the ink along rows by ``0.9 h`` joins the letters (and
    close words) of a line into pieces; pieces 1.2-4 ``h`` high and at least 2 ``h`` wide are
    text. Each is cut into words at column gaps of ``h / 2`` and cropped with
    :func:`_line_crops` (every word, and greedy groups that fit the canvas).
    """
    from PIL import Image
    from scipy import ndimage

    with Image.open(paths.data_path("scans") / f"{name}.png") as source:
        gray = source.convert("L")
        gray = gray.resize((gray.width // 2, gray.height // 2), Image.LANCZOS)
    image = np.asarray(gray)
    ink = image < 128
    labels, _ = ndimage.label(ink)
    heights = np.array([s[0].stop - s[0].start for s in ndimage.find_objects(labels)])
    letter = float(np.median(heights[heights >= 5]))
    joined, _ = ndimage.label(ndimage.binary_dilation(
        ink, np.ones((1, max(3, round(0.9 * letter))), bool)))
    crops: list[np.ndarray] = []
    for rows, cols in ndimage.find_objects(joined):
        top, bottom, left, right = rows.start, rows.stop, cols.start, cols.stop
        height = bottom - top
        if not 1.2 * letter <= height <= 4 * letter or right - left < 2 * letter:
            continue
        pad = max(2, height // 6)
        top, bottom = max(0, top - pad), min(image.shape[0], bottom + pad)
        inked = ink[rows, cols].any(axis=0)
        words = [(top, bottom, left + a, left + b)
                 for a, b in _runs(inked, min_gap=max(3, round(letter / 2)))]
        crops += _line_crops(image, words)
    return crops


def make_text_sets() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Return {"calib": ..., "heldout": ...} text crops as (images, widths, sources)."""
    import skimage.data

    page = skimage.data.page()
    lines = page_words()
    fetch_scans()
    sets = {}
    for split, parity, seed, scan in (("calib", 0, CALIB_SEED, "typewriter"),
                                      ("heldout", 1, HELDOUT_SEED, "linn")):
        named: list[tuple[str, np.ndarray]] = []
        for index, words in enumerate(lines):
            if index % 2 == parity:
                named += [("page", c) for c in _line_crops(page, words)]
        named += [("text", c) for c in _text_windows(np.random.default_rng(seed), 6, parity)]
        named += [(scan, c) for c in scan_crops(scan)[::SCAN_EVERY[scan]]]
        images, widths = to_text_canvas([c for _, c in named])
        sets[split] = (images, widths, np.array([n for n, _ in named]))
    return sets


def text_batch(
    images: np.ndarray, widths: np.ndarray, width: int = TEXT_WIDTH, bgr: bool = True
) -> np.ndarray:
    """Turn text canvases into the PP-OCR recognizer input [N, 3, 48, width], float32.

    ``(x / 255 - 0.5) / 0.5`` on the used columns, 0 on the padding (PaddleOCR's convention).
    """
    x = to_nchw(images[:, :, :width], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255, bgr=bgr)
    for i, used in enumerate(widths):
        x[i, :, :, used:] = 0.0
    return x


def load_text_crops(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load the cached ``"calib"`` or ``"heldout"`` text crops as (images, widths)."""
    with np.load(paths.data_path(f"text_crops_{split}.npz")) as data:
        return data["images"], data["widths"]


def text_crop_sources(split: str) -> np.ndarray:
    """The page each cached text crop of ``split`` was cut from."""
    with np.load(paths.data_path(f"text_crops_{split}.npz")) as data:
        return data["sources"]


def _text_sets_current(text_paths: list[Path]) -> bool:
    for path in text_paths:
        if not path.exists():
            return False
        with np.load(path) as data:
            if "version" not in data or int(data["version"]) != TEXT_SETS_VERSION:
                return False
    return True


# --------------------------------------------------------------------------------------------
# Writing the cache
# --------------------------------------------------------------------------------------------


def _write_dir(folder: Path, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images[: N_DIR_PNG + N_DIR_JPEG]):
        if i < N_DIR_PNG:
            Image.fromarray(image).save(folder / f"calib_{i:03d}.png")
        else:
            Image.fromarray(image).save(folder / f"calib_{i:03d}.jpg", quality=95)


def build(force: bool = False) -> list[Path]:
    """Write the photo sets, the image folder and the text sets into the cache (idempotent)."""
    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    written = []
    for split, sources, seed in (
        ("calib", CALIB_SOURCES, CALIB_SEED),
        ("heldout", HELDOUT_SOURCES, HELDOUT_SEED),
        ("heldout512", {k: 8 * v for k, v in HELDOUT_SOURCES.items()}, HELDOUT512_SEED),
    ):
        path = paths.data_path(f"photos_{split}_224.npz")
        if force or not path.exists():
            images, names = make_photo_set(sources, seed)
            np.savez_compressed(path, images=images, sources=names)
            log.info("wrote %s %s", path.name, images.shape)
        written.append(path)
    folder = paths.data_path("photos_calib_dir")
    if force or not folder.exists() or not any(folder.iterdir()):
        _write_dir(folder, load_photos("calib"))
        log.info("wrote %s/", folder.name)
    written.append(folder)
    text_paths = [paths.data_path(f"text_crops_{s}.npz") for s in ("calib", "heldout")]
    if force or not _text_sets_current(text_paths):
        for split, (images, widths, sources) in make_text_sets().items():
            path = paths.data_path(f"text_crops_{split}.npz")
            np.savez_compressed(path, images=images, widths=widths, sources=sources,
                                version=TEXT_SETS_VERSION)
            log.info("wrote %s %s", path.name, images.shape)
    written += [paths.data_path("scans"), *text_paths]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in build(force=args.force):
        if path.suffix == ".npz":
            with np.load(path) as data:
                print(f"{path.name:28s} images {data['images'].shape}")
        else:
            print(f"{path.name + '/':28s} {len(list(path.iterdir()))} files")


if __name__ == "__main__":
    main()
