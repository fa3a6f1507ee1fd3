"""onnxcomp: an ONNX graph-rewriting compiler that makes CNNs smaller and faster.

``onnxcomp.optimize(model, passes=[...] | recipe=... | auto=True, calib=...)`` returns the
optimized model and its report (see :func:`onnxcomp.api.optimize`); ``onnxcomp.bench`` and
``onnxcomp.diff`` do what the commands of those names do; ``onnxcomp.Calibration``
(``Calibration.from_folder``) and ``onnxcomp.load_calibration`` build calibration sets.
Imported on first use, so that ``import onnxcomp`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"optimize": ("onnxcomp.api", "optimize"),
         "bench": ("onnxcomp.api", "bench"),
         "diff": ("onnxcomp.api", "diff"),
         "Calibration": ("onnxcomp.calibration", "Calibration"),
         "load_calibration": ("onnxcomp.calibration", "load_calibration")}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'onnxcomp' has no attribute '{name}'")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
