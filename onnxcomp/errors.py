"""The errors onnxcomp raises on purpose (a leaf module: it imports nothing of onnxcomp).

The CLI maps them to exit codes: :class:`InputError` / :class:`PreconditionError` /
:class:`ConfigError` are the user's (exit 1, or 2 for usage), :class:`PassError` is a bug (3).
"""

from __future__ import annotations


class OnnxcompError(Exception):
    """Base class of every error onnxcomp raises on purpose."""


class InputError(OnnxcompError):
    """Bad user input: a file that is not an ONNX model, a mismatched calibration set, ..."""


class PreconditionError(OnnxcompError):
    """The model as a whole is not supported by a pass (raised before any work is done)."""


class PassError(OnnxcompError):
    """An invariant broke after a rewrite: a bug in onnxcomp, never caught and ignored."""


class ConfigError(OnnxcompError):
    """A pass configuration value is out of range or inconsistent."""
