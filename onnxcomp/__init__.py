"""onnxcomp: an ONNX graph-rewriting compiler that makes CNNs smaller and faster."""

from __future__ import annotations

__version__ = "0.1.0"
