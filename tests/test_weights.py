"""Weights kept on disk (onnxcomp/weights.py) for models over the protobuf limit.

The limit and the spill size are lowered so that small models take the large-model path; the
>2 GB model itself is tests/test_large.py (marked large).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from builders import assert_equivalent, calibration, conv_bn_model, random_feeds, run
from onnx import TensorProto, numpy_helper

from onnxcomp import api, lowrank, weights
from onnxcomp import model as model_io
from onnxcomp.errors import InputError


@pytest.fixture
def small_limits(monkeypatch):
    """Every model counts as large; every tensor of 64 bytes or more is spilled."""
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(weights, "SPILL_BYTES", 64)


def _saved(tmp_path, model=None):
    model = model or conv_bn_model(c_in=16, c_out=32)
    path = tmp_path / "in" / "m.onnx"
    model_io.save(model, path, external_data=True)
    return model, path


def test_a_large_model_loads_with_its_weights_on_disk(tmp_path, small_limits):
    model, path = _saved(tmp_path)
    data = path.parent / "m.onnx.data"
    before = (path.read_bytes(), data.read_bytes(), data.stat().st_mtime_ns)
    loaded = model_io.load(path)
    assert weights.on_disk(loaded)
    big = [t for t in loaded.graph.initializer if weights.is_external(t)]
    assert big and all(not t.raw_data for t in big)
    for t in big:  # the values read back from the store equal the original ones
        want = next(i for i in model.graph.initializer if i.name == t.name)
        np.testing.assert_array_equal(weights.to_array(t), numpy_helper.to_array(want))
    assert before == (path.read_bytes(), data.read_bytes(), data.stat().st_mtime_ns)
    assert_equivalent(model, weights.materialize(loaded), 0, 0)


def test_passes_on_a_disk_model_match_the_in_memory_run(tmp_path, small_limits, monkeypatch):
    model, path = _saved(tmp_path)
    calib = calibration(model)
    steps = ["canonicalize", "fold_bn", ("svd", {"rank": 4, "refit": False, "min_macs": 0}),
             ("quantize", {"mode": "weight", "min_params": 0})]
    on_disk, report = api.optimize(path, passes=steps, calib=calib,
                                   output=tmp_path / "out.onnx", latency_check=False)
    assert weights.on_disk(on_disk)
    assert not any(n.op_type == "BatchNormalization" for n in on_disk.graph.node)
    assert (tmp_path / "out.onnx.data").exists()  # over the (lowered) limit: external data
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 2**31 - 2**24)
    in_memory, _ = api.optimize(model, passes=steps, calib=calib, latency_check=False)
    assert not weights.on_disk(in_memory)
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert_equivalent(in_memory, saved, 1e-5, 1e-6)
    assert_equivalent(in_memory, weights.materialize(on_disk), 1e-5, 1e-6)
    feeds = random_feeds(model, 0)
    assert np.abs(run(model, feeds)[0] - run(saved, feeds)[0]).max() > 0  # lossy steps ran
    assert [s["report"]["applied"] != [] for s in report["steps"]] == [False, True, True, True]


def test_spill_and_write_external_keep_values(tmp_path, small_limits):
    model = conv_bn_model(c_in=16, c_out=32)
    copy = model_io.copy_model(model)
    moved = weights.spill(copy)
    assert moved > 0 and weights.on_disk(copy)
    weights.write_external(copy, tmp_path / "w.onnx", "w.onnx.data")
    back = onnx.load(str(tmp_path / "w.onnx"))
    for a, b in zip(model.graph.initializer, back.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    offsets = [int(e.value) for t in onnx.load(str(tmp_path / "w.onnx"),
                                                load_external_data=False).graph.initializer
               for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % weights.ALIGN == 0 for o in offsets)


def test_bad_external_data_is_an_input_error(tmp_path, small_limits):
    _, path = _saved(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    cases = {"outside": "../elsewhere.data", "missing": "gone.data"}
    for kind, location in cases.items():
        bad = onnx.ModelProto()
        bad.CopyFrom(proto)
        tb = next(x for x in bad.graph.initializer if x.name == t.name)
        next(e for e in tb.external_data if e.key == "location").value = location
        target = path.parent / f"{kind}.onnx"
        target.write_bytes(bad.SerializeToString())
        with pytest.raises(InputError, match="outside|cannot be read"):
            model_io.load(target)
    short = path.parent / "short.onnx"
    data = (path.parent / "m.onnx.data").read_bytes()
    (path.parent / "short.onnx.data").write_bytes(data[: len(data) // 2])
    relinked = onnx.ModelProto()
    relinked.CopyFrom(proto)
    for tensor in relinked.graph.initializer:
        for e in tensor.external_data:
            if e.key == "location":
                e.value = "short.onnx.data"
    short.write_bytes(relinked.SerializeToString())
    with pytest.raises(InputError, match="past the end"):
        model_io.load(short)
    assert sorted(os.listdir(path.parent)) == sorted(
        ["m.onnx", "m.onnx.data", "outside.onnx", "missing.onnx", "short.onnx",
         "short.onnx.data"])


@pytest.mark.parametrize("shape", [(12, 300), (300, 12)])
def test_gram_svd_matches_the_full_svd(shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((shape[0], 5)) @ rng.standard_normal((5, shape[1]))
         + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    full = lowrank.truncate_svd(*np.linalg.svd(w.astype(np.float64), full_matrices=False), 4)
    lean = lowrank.gram_svd(w, 4, block_bytes=1000)
    np.testing.assert_allclose(lean[0] @ lean[1], full[0] @ full[1], atol=1e-9)
    assert lean[2] == pytest.approx(full[2], rel=1e-9)
