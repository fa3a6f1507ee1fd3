"""A VGG-style CNN trained on Fashion-MNIST: a small real model that is committed to the repo.

Usage::

    python models/fashion_mnist.py train      # train on CPU, export, evaluate, write artifacts
    python models/fashion_mnist.py evaluate   # accuracy of the committed ONNX on the test split
    python models/fashion_mnist.py sample     # rewrite fashion_mnist_sample.npz only

Architecture (widths ``w1, w2, w3``, 3x3 convs with padding 1, no conv bias)::

    [Conv-BN-ReLU] x2 (w1) -> MaxPool 2    28x28 -> 14x14
    [Conv-BN-ReLU] x2 (w2) -> MaxPool 2    14x14 -> 7x7
    [Conv-BN-ReLU] x2 (w3) -> MaxPool 2    7x7   -> 3x3
    Flatten -> Gemm(9*w3, 256) -> ReLU -> (Dropout while training) -> Gemm(256, 10)

The ONNX file keeps BatchNormalization as separate nodes (so fold_bn has real work to do) and
has a dynamic batch dimension ``batch``. Input: ``input`` float32 [batch, 1, 28, 28] computed as
``(pixel / 255 - MEAN) / STD``; output: ``logits`` float32 [batch, 10].

The data set comes from the Debian package ``dataset-fashion-mnist``. Loading it and evaluating
the ONNX file need only numpy and onnxruntime; torch is imported only to train.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import paths

log = logging.getLogger("fashion_mnist")

MEAN = 0.2860  # mean of the 60 000 training images, pixel / 255
STD = 0.3530  # standard deviation of the same
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SEED = 20240613
WIDTHS = (32, 64, 128)
EPOCHS = 13
BATCH_SIZE = 128
MAX_LR = 0.1
WEIGHT_DECAY = 5e-4
THREADS = 2
N_SAMPLE_TEST = 512
N_SAMPLE_CALIB = 256


def load_fashion_mnist(
    split: str, root: Path = paths.FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Read a split (``"train"`` or ``"test"``) as uint8 images [N, 28, 28] and uint8 labels [N]."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    image_file = root / f"{prefix}-images-idx3-ubyte.gz"
    label_file = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not image_file.exists():
        raise FileNotFoundError(
            f"{image_file} is missing; install the Debian package dataset-fashion-mnist"
        )
    with gzip.open(image_file, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise ValueError(f"{image_file}: bad magic {magic}")
        images = np.frombuffer(f.read(), dtype=np.uint8).reshape(n, rows, cols)
    with gzip.open(label_file, "rb") as f:
        magic, n_labels = struct.unpack(">II", f.read(8))
        if magic != 2049 or n_labels != n:
            raise ValueError(f"{label_file}: bad header ({magic}, {n_labels})")
        labels = np.frombuffer(f.read(), dtype=np.uint8)
    return images, labels


def preprocess(images: np.ndarray) -> np.ndarray:
    """Turn uint8 images [N, 28, 28] into the model input: float32 [N, 1, 28, 28], normalized."""
    x = images.astype(np.float32)[:, None, :, :] / 255.0
    return (x - np.float32(MEAN)) / np.float32(STD)


def evaluate_onnx(
    path: Path = paths.FASHION_MNIST_ONNX, batch_size: int = 1000, threads: int = 1
) -> float:
    """Return the top-1 accuracy of an ONNX model on the 10 000 Fashion-MNIST test images."""
    import onnxruntime as ort

    images, labels = load_fashion_mnist("test")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start : start + batch_size])
        logits = session.run(None, {name: x})[0]
        correct += int(np.sum(logits.argmax(axis=1) == labels[start : start + batch_size]))
    return correct / len(images)


def write_sample(path: Path = paths.FASHION_MNIST_SAMPLE, seed: int = SEED) -> None:
    """Write a seeded sample: test images/labels and training images/labels for calibration."""
    rng = np.random.default_rng(seed)
    test_x, test_y = load_fashion_mnist("test")
    train_x, train_y = load_fashion_mnist("train")
    test_idx = np.sort(rng.choice(len(test_x), N_SAMPLE_TEST, replace=False))
    calib_idx = np.sort(rng.choice(len(train_x), N_SAMPLE_CALIB, replace=False))
    np.savez_compressed(
        path,
        images=test_x[test_idx],
        labels=test_y[test_idx],
        test_indices=test_idx.astype(np.int32),
        calib_images=train_x[calib_idx],
        calib_labels=train_y[calib_idx],
        calib_indices=calib_idx.astype(np.int32),
    )
    log.info("wrote %s", path)
    write_calib()


def write_calib(
    sample: Path = paths.FASHION_MNIST_SAMPLE, path: Path = paths.FASHION_MNIST_CALIB
) -> None:
    """Write the sample's calibration images preprocessed, ready for ``onnxcomp --calib``."""
    with np.load(sample) as data:
        images = data["calib_images"]
    x = preprocess(images)
    np.savez_compressed(path, input=x.astype(np.float32))
    log.info("wrote %s %s", path, x.shape)


def build_vgg(widths: tuple[int, int, int] = WIDTHS, dropout: float = 0.3) -> Any:
    """Build the (untrained) torch module described in the module docstring."""
    from collections import OrderedDict

    import torch.nn as nn

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    in_ch = 1
    for stage, width in enumerate(widths, start=1):
        for conv in (1, 2):
            tag = f"s{stage}c{conv}"
            layers[f"{tag}_conv"] = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
            layers[f"{tag}_bn"] = nn.BatchNorm2d(width)
            layers[f"{tag}_relu"] = nn.ReLU(inplace=True)
            in_ch = width
        layers[f"s{stage}_pool"] = nn.MaxPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(in_ch * 3 * 3, 256)
    layers["fc1_relu"] = nn.ReLU(inplace=True)
    layers["dropout"] = nn.Dropout(dropout)
    layers["fc2"] = nn.Linear(256, 10)
    return nn.Sequential(layers)


def _augment(batch: Any, generator: Any) -> Any:
    """Random horizontal flip and a random shift of up to 2 pixels (zero fill), uint8 in/out."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    n = batch.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None], batch.flip(2), batch)
    padded = F.pad(batch, (2, 2, 2, 2))
    dy = torch.randint(0, 5, (n,), generator=generator)
    dx = torch.randint(0, 5, (n,), generator=generator)
    ar = torch.arange(28)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]


def _to_input(batch: Any) -> Any:
    """Convert a uint8 tensor [N, 28, 28] into the normalized float input [N, 1, 28, 28]."""
    import torch

    x = batch.to(torch.float32).unsqueeze(1) / 255.0
    return ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def _torch_accuracy(model: Any, images: Any, labels: Any) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 1000):
            logits = model(_to_input(images[start : start + 1000]))
            correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / len(images)


def train(epochs: int = EPOCHS, widths: tuple[int, int, int] = WIDTHS) -> dict[str, Any]:
    """Train the network on CPU, export it, evaluate it and write the committed artifacts."""
    import onnx_export
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(SEED)
    train_x, train_y = (torch.from_numpy(a.copy()) for a in load_fashion_mnist("train"))
    test_x, test_y = (torch.from_numpy(a.copy()) for a in load_fashion_mnist("test"))
    train_y, test_y = train_y.long(), test_y.long()

    model = build_vgg(widths).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=MAX_LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    steps_per_epoch = (len(train_x) + BATCH_SIZE - 1) // BATCH_SIZE
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=MAX_LR, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    history = []
    start_time = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        epoch_start = time.time()
        order = torch.randperm(len(train_x), generator=generator)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            x = _to_input(_augment(train_x[idx], generator))
            y = train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        test_acc = _torch_accuracy(model, test_x, test_y)
        record = {
            "epoch": epoch,
            "train_loss": round(loss_sum / len(train_x), 4),
            "train_acc": round(correct / len(train_x), 4),
            "test_acc": round(test_acc, 4),
            "seconds": round(time.time() - epoch_start, 1),
        }
        history.append(record)
        log.info("%s", record)
    train_seconds = time.time() - start_time

    model = model.to(memory_format=torch.contiguous_format).eval()
    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache / "fashion_mnist_vgg.pt")
    doc = "VGG-style CNN trained on Fashion-MNIST by onnxcomp models/fashion_mnist.py"
    onnx_export.export_onnx(
        model,
        torch.zeros(1, 1, 28, 28),
        paths.FASHION_MNIST_ONNX,
        keep_bn=True,
        dynamic_batch=True,
        doc=doc,
    )
    sample = preprocess(load_fashion_mnist("test")[0][:64])
    diff = onnx_export.max_abs_diff_vs_torch(paths.FASHION_MNIST_ONNX, model, sample)
    onnx_accuracy = evaluate_onnx(paths.FASHION_MNIST_ONNX, threads=THREADS)
    torch_accuracy = _torch_accuracy(model, test_x, test_y)
    log.info(
        "torch acc %.4f, onnxruntime acc %.4f, max |diff| %.2e", torch_accuracy, onnx_accuracy, diff
    )
    metadata = {
        "model": "fashion_mnist_vgg.onnx",
        "description": "VGG-style CNN for Fashion-MNIST; BatchNormalization kept unfolded",
        "input": {
            "name": "input",
            "shape": ["batch", 1, 28, 28],
            "dtype": "float32",
            "layout": "NCHW",
            "channels": "grayscale",
        },
        "output": {"name": "logits", "shape": ["batch", 10], "classes": list(CLASSES)},
        "preprocessing": {
            "scale": 1 / 255,
            "mean": MEAN,
            "std": STD,
            "formula": "(uint8_pixel * scale - mean) / std",
        },
        "batchnorm": "unfolded (separate BatchNormalization nodes, inference mode)",
        "opset": onnx_export.OPSET,
        "test_accuracy": onnx_accuracy,
        "test_accuracy_evaluated_with": "onnxruntime CPU on the 10000 test images",
        "torch_test_accuracy": torch_accuracy,
        "max_abs_diff_onnx_vs_torch": diff,
        "training": {
            "data": "Fashion-MNIST train split (60000 images), Debian dataset-fashion-mnist",
            "widths": list(widths),
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "optimizer": f"SGD momentum 0.9 nesterov, weight decay {WEIGHT_DECAY}",
            "schedule": f"OneCycleLR max_lr {MAX_LR}",
            "augmentation": "random horizontal flip, random shift up to 2 px (zero fill)",
            "dropout": 0.3,
            "seed": SEED,
            "threads": THREADS,
            "torch": torch.__version__,
            "seconds": round(train_seconds, 1),
            "history": history,
        },
    }
    paths.FASHION_MNIST_JSON.write_text(json.dumps(metadata, indent=2) + "\n")
    write_sample()
    return metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train", "evaluate", "sample", "calib"])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "train":
        metadata = train(epochs=args.epochs)
        print(
            f"test accuracy (onnxruntime): {metadata['test_accuracy']:.4f}, "
            f"training took {metadata['training']['seconds']:.0f} s"
        )
    elif args.command == "evaluate":
        print(f"test accuracy (onnxruntime): {evaluate_onnx():.4f}")
    elif args.command == "calib":
        write_calib()
    else:
        write_sample()


if __name__ == "__main__":
    main()
