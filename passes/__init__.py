"""The registry of passes: file name = registry key = report name = CLI name."""

from __future__ import annotations

from typing import Any

from onnxcomp.passbase import Pass
from onnxcomp.passes import (
    canonicalize,
    cp,
    depthwise_separable,
    equalize,
    factorize,
    fold_affine,
    fold_bn,
    kernel_sharing,
    opset,
    prune_channels,
    prune_layers,
    quantize,
    svd,
    tucker,
)

REGISTRY: dict[str, Pass[Any]] = {
    canonicalize.PASS.name: canonicalize.PASS,
    fold_bn.PASS.name: fold_bn.PASS,
    fold_affine.PASS.name: fold_affine.PASS,
    equalize.PASS.name: equalize.PASS,
    opset.PASS.name: opset.PASS,
    cp.PASS.name: cp.PASS,
    tucker.PASS.name: tucker.PASS,
    svd.PASS.name: svd.PASS,
    kernel_sharing.PASS.name: kernel_sharing.PASS,
    depthwise_separable.PASS.name: depthwise_separable.PASS,
    factorize.PASS.name: factorize.PASS,
    prune_channels.PASS.name: prune_channels.PASS,
    prune_layers.PASS.name: prune_layers.PASS,
    quantize.PASS.name: quantize.PASS,
}
