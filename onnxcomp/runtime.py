"""onnxruntime sessions: provider names, session options, running on calibration batches."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp import model as model_io
from onnxcomp import weights
from onnxcomp.errors import InputError, OnnxcompError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# Threads for compile-time work (captures, probes, fidelity runs): every core unless a
# process of a worker pool was given its share (onnxcomp/executor.py).
COMPUTE_THREADS_ENV = "ONNXCOMP_COMPUTE_THREADS"


def compute_threads() -> int:
    """Threads a session doing compile-time work (not a latency measurement) may use."""
    share = os.environ.get(COMPUTE_THREADS_ENV, "")
    return int(share) if share.isdigit() and int(share) > 0 else (os.cpu_count() or 1)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty when they cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def channel_block(provider: str) -> int:
    """The channel count a provider's conv kernels work in blocks of.

    ONNX Runtime's CPU provider runs convs in a blocked layout (NCHWc) of 16 channels on
    AVX-512 CPUs and 8 on AVX2; a layer of 40 channels then costs what 48 do. Pruning and
    rank rounding keep channel counts a multiple of this. 8 elsewhere (GPU tensor cores
    want multiples of 8).
    """
    if provider == "cpu" and "avx512f" in cpu_flags():
        return 16
    return 8


def provider_list(provider: str) -> list[str]:
    """ORT provider names for a short name; raise :class:`InputError` when unavailable."""
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    full = PROVIDERS[provider]
    available = ort.get_available_providers()
    if full not in available:
        raise InputError(
            f"provider '{provider}' is not available in this onnxruntime build "
            f"(available: {', '.join(available)})"
        )
    chain = [full]
    if provider == "tensorrt" and PROVIDERS["cuda"] in available:
        chain.append(PROVIDERS["cuda"])
    if full != PROVIDERS["cpu"]:
        chain.append(PROVIDERS["cpu"])
    return chain


def session_options(threads: int = 1, optimize: bool = True) -> ort.SessionOptions:
    """Session options: ``threads`` intra-op threads; ORT fusions on or all off."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    return opts


def make_session(
    model: onnx.ModelProto,
    provider: str = "cpu",
    threads: int = 1,
    optimize: bool = True,
) -> ort.InferenceSession:
    """An inference session for an in-memory model (large models go through a temp file)."""
    opts = session_options(threads, optimize)
    providers = provider_list(provider)
    try:
        if weights.on_disk(model):
            # Weights in the store: ONNX Runtime maps their files. Without prepacking, which
            # would hold a second, packed copy of every weight (timings of such a model are
            # then without it too, on both sides of a comparison).
            opts.add_session_config_entry("session.disable_prepacking", "1")
            with weights.path_for(model) as stored:
                return ort.InferenceSession(str(stored), opts, providers=providers)
        if not model_io.is_large(model):
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory() as tmp:
            path = model_io.serialize_for_session(model, Path(tmp))
            return ort.InferenceSession(path, opts, providers=providers)
    except Exception as exc:  # a fault of the model ONNX Runtime names: the user's input
        text = str(exc)
        if "ValidateOpsetForDomain" in text or "opset" in text.lower() and (
                "is under development" in text or "not supported" in text):
            support = text[text.find("Current official support"):].strip() or text[-200:]
            raise InputError(f"ONNX Runtime {ort.__version__} cannot load this model's "
                             f"opset: {support}") from None
        raise


@contextlib.contextmanager
def input_model(what: str = "the input model") -> Iterator[None]:
    """Failures of ONNX Runtime on the user's own model are input errors, in one line.

    Wrap the first load and run of a model onnxcomp was given (not of one it wrote: there a
    failure is onnxcomp's bug). Custom ops ONNX Runtime does not know, type errors the checker
    let through, shapes a node refuses at run time all land here.
    """
    try:
        yield
    except OnnxcompError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        text = " ".join(str(exc).split())
        if text.startswith("[ONNXRuntimeError]"):  # "[ONNXRuntimeError] : 1 : FAIL : why"
            text = text.split(":", 3)[-1].strip()
        raise InputError(f"{what} does not run in ONNX Runtime {ort.__version__}: "
                         f"{text[:300]}") from None


def output_names(session: ort.InferenceSession) -> list[str]:
    """Names of the session's outputs in graph order."""
    return [o.name for o in session.get_outputs()]


def run_batches(
    session: ort.InferenceSession,
    batches: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str] | None = None,
) -> list[list[np.ndarray]]:
    """Run the session on every batch; return the outputs (in ``names`` order) per batch."""
    wanted = list(names) if names is not None else output_names(session)
    input_names = {i.name for i in session.get_inputs()}
    results = []
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in input_names}
        results.append(session.run(wanted, feeds))
    return results


def concat_outputs(per_batch: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Concatenate per-batch outputs along the batch axis (scalars are stacked)."""
    if not per_batch:
        return []
    out = []
    for i in range(len(per_batch[0])):
        parts = [np.asarray(b[i]) for b in per_batch]
        if parts[0].ndim == 0:
            out.append(np.stack(parts))
        else:
            out.append(np.concatenate(parts, axis=0))
    return out
