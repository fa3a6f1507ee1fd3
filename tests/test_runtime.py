from __future__ import annotations

import platform

import numpy as np
import onnxruntime as ort
import pytest
from builders import conv_bn_model, random_feeds, run

from onnxcomp import runtime
from onnxcomp.passbase import InputError


def test_unknown_and_unavailable_providers():
    with pytest.raises(InputError, match="unknown provider"):
        runtime.provider_list("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match="not available"):
            runtime.provider_list("cuda")
    assert runtime.provider_list("cpu") == ["CPUExecutionProvider"]


def test_session_runs_batches_and_concatenates():
    model = conv_bn_model(batch="N")
    session = runtime.make_session(model, optimize=False)
    batches = [random_feeds(model, s, batch=2) for s in range(3)]
    outs = runtime.concat_outputs(runtime.run_batches(session, batches))
    assert outs[0].shape[0] == 6
    np.testing.assert_allclose(outs[0][:2], run(model, batches[0])[0], rtol=1e-6)


def test_large_model_goes_through_a_file(monkeypatch):
    from onnxcomp import model as model_io

    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 100)
    model = conv_bn_model()
    session = runtime.make_session(model)
    feeds = random_feeds(model, 0, 1)
    np.testing.assert_allclose(session.run(None, feeds)[0], run(model, feeds)[0], rtol=1e-4,
                               atol=1e-5)


def test_channel_block_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert runtime.channel_block("cpu") == 16
    assert runtime.channel_block("cuda") == 8
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    assert runtime.channel_block("cpu") == 8


def test_cpu_flags_reads_this_machine():
    flags = runtime.cpu_flags()
    assert isinstance(flags, set)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "sse2" in flags
