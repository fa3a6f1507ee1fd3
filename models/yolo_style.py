"""A YOLOv8n-style detector built in code (SiLU everywhere, C2f, SPPF, PAN neck, DFL head).

Usage::

    python models/yolo_style.py [--size 320]   # writes yolo_style.onnx into the cache

No weights ship with a package we may use, so the network is initialized from a seed and its
BatchNormalization statistics are then set on real photos (train-mode forward passes over the
calibration crops, momentum None: the cumulative mean), before BN is folded into the convs and
the model is exported. Its decisions are not a trained detector's, but every activation has
the spread a trained network's has, which is what int8 ranges, kernels and the layout of the
quantized graph depend on. It stands for the class the int8 issue measured ORT's quantizer
faster on: SiLU (Sigmoid and Mul) after every conv, Split and Concat in every C2f block,
MaxPools in SPPF, nearest Resize and Concat in the neck, and one output [1, 4 + classes,
anchors] that concatenates decoded boxes (DFL: Softmax over 16 bins and a fixed 1x1 conv)
with sigmoid class scores.

Layout (width 0.25, depth 0.33 of YOLOv8, 80 classes): stem Conv 3->16 s2, Conv 16->32 s2,
C2f(32), Conv s2, C2f(64) x2, Conv s2, C2f(128) x2, Conv s2, C2f(256), SPPF(256); neck up
(Resize x2, Concat, C2f) twice, down (Conv s2, Concat, C2f) twice; a head per level.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("yolo_style")

CLASSES = 80
BINS = 16
SEED = 0


class Conv(nn.Sequential):
    """Conv -> BN -> SiLU (the BN folds away at export)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 conv, Split in two, n bottlenecks on the second half, Concat of all, 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, cout)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        c = cin // 2
        self.cv1, self.cv2 = Conv(cin, c), Conv(4 * c, cout)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """Per level: a box branch (4 x BINS logits) and a class branch; DFL-decoded distances."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        c2, c3 = max(16, channels[0] // 4, 4 * BINS), max(channels[0], min(CLASSES, 100))
        self.box = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3),
                                               nn.Conv2d(c2, 4 * BINS, 1)) for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3),
                                               nn.Conv2d(c3, CLASSES, 1)) for c in channels)
        self.dfl = nn.Conv2d(BINS, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(BINS, dtype=torch.float32).view(1, BINS, 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        outs = [torch.cat((b(x), c(x)), 1).flatten(2) for x, b, c in
                zip(feats, self.box, self.cls, strict=True)]
        y = torch.cat(outs, 2)  # [1, 4 * BINS + CLASSES, anchors]
        box, cls = y.split((4 * BINS, CLASSES), 1)
        n, _, a = box.shape
        dist = self.dfl(box.view(n, 4, BINS, a).transpose(2, 1).softmax(1)).view(n, 4, a)
        return torch.cat((dist, cls.sigmoid()), 1)


class YoloStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b0 = nn.Sequential(Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32, 32, 1, True),
                                Conv(32, 64, 3, 2), C2f(64, 64, 2, True))  # P3, stride 8
        self.b1 = nn.Sequential(Conv(64, 128, 3, 2), C2f(128, 128, 2, True))  # P4
        self.b2 = nn.Sequential(Conv(128, 256, 3, 2), C2f(256, 256, 1, True),
                                SPPF(256, 256))  # P5
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.n1, self.n2 = C2f(384, 128), C2f(192, 64)
        self.d1, self.n3 = Conv(64, 64, 3, 2), C2f(192, 128)
        self.d2, self.n4 = Conv(128, 128, 3, 2), C2f(384, 256)
        self.detect = Detect((64, 128, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b0(x)
        p4 = self.b1(p3)
        p5 = self.b2(p4)
        h4 = self.n1(torch.cat((self.up(p5), p4), 1))
        o3 = self.n2(torch.cat((self.up(h4), p3), 1))
        o4 = self.n3(torch.cat((self.d1(o3), h4), 1))
        o5 = self.n4(torch.cat((self.d2(o4), p5), 1))
        return self.detect([o3, o4, o5])


def fold_batchnorms(module: nn.Module) -> None:
    """Fold every Conv -> BatchNorm pair of ``Conv`` blocks into the conv (BN becomes Identity)."""
    for block in module.modules():
        if isinstance(block, Conv):
            conv, bn = block[0], block[1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                              conv.stride, conv.padding, bias=True)
            fused.weight.data = conv.weight.data * scale.view(-1, 1, 1, 1)
            fused.bias.data = bn.bias.data - bn.running_mean * scale
            block[0], block[1] = fused, nn.Identity()


def build(images: np.ndarray) -> nn.Module:
    """The network with BN statistics set on ``images`` ([N, 3, S, S] float, 0-1), folded."""
    torch.manual_seed(SEED)
    net = YoloStyle()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches
            m.weight.data.uniform_(0.5, 1.5)  # trained BN scales spread around 1
            m.bias.data.uniform_(-0.5, 0.5)
    net.train()
    with torch.no_grad():
        for i in range(0, len(images), 8):
            net(torch.from_numpy(images[i:i + 8]))
    net.eval()
    fold_batchnorms(net)
    return net


def photo_batch(split: str, size: int) -> np.ndarray:
    """Photo crops resized to ``size``, NCHW float32 in [0, 1] (YOLO's preprocessing)."""
    import photos
    from PIL import Image

    images = photos.load_photos(split)
    out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                    for im in images])
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0


def export(path: Path, size: int) -> Path:
    """Build on the calibration photos, export at opset 17 and check it against torch."""
    import onnx
    import onnxruntime as ort

    net = build(photo_batch("calib", size))
    x = torch.from_numpy(photo_batch("heldout", size)[:2])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (x[:1],), str(path), input_names=["images"],
                      output_names=["output0"], opset_version=17, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    with torch.no_grad():
        want = net(x[:1]).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x[:1].numpy()})[0]
    if not np.allclose(got, want, atol=1e-3, rtol=1e-3):
        raise RuntimeError(f"exported model differs from torch by "
                           f"{float(np.abs(got - want).max()):.3g}")
    return path


def main() -> None:
    import paths

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export(args.output or paths.cache_dir() / "yolo_style.onnx", args.size)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
