"""The Python API: onnxcomp.optimize mirrors `onnxcomp optimize`; unknown keys are errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import conv_model

import onnxcomp
from onnxcomp.errors import ConfigError


@pytest.fixture
def model_and_calib(tmp_path):
    w = np.random.default_rng(0).standard_normal([16, 8, 3, 3]).astype(np.float32)
    path = tmp_path / "in.onnx"
    onnx.save(conv_model(w, size=32, pads=[1, 1, 1, 1], batch="N"), path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal([8, 8, 32, 32]).astype("f4"))
    return path, calib


def test_optimize_returns_the_model_and_the_report(model_and_calib, tmp_path):
    path, calib = model_and_calib
    before = path.read_bytes()
    model, report = onnxcomp.optimize(path, passes=["fold_bn", ("quantize", {"mode": "weight"})],
                                      calib=calib, output=tmp_path / "out.onnx", bits=8)
    onnx.checker.check_model(model)
    assert [s["pass"] for s in report["steps"]] == ["fold_bn", "quantize"]
    assert report["steps"][1]["report"]["applied"]
    assert report["calibration"]["samples"] == 8 and not report["calibration"]["synthetic"]
    assert onnx.load(tmp_path / "out.onnx").SerializeToString() == model.SerializeToString()
    assert path.read_bytes() == before  # the input is never changed


def test_optimize_takes_arrays_and_a_model_proto(model_and_calib):
    path, _ = model_and_calib
    x = np.random.default_rng(1).standard_normal([8, 8, 32, 32]).astype("f4")
    model, report = onnxcomp.optimize(onnx.load(path), passes=["fold_bn"], calib={"x": x})
    assert report["calibration"]["samples"] == 8 and not report["calibration"]["synthetic"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"passes": ["svd"], "target_speed": 2}, "did you mean 'target_speedup'"),
    ({"passes": [("svd", {"rnak": 3})]}, "unknown option 'rnak'"),
    ({"passes": ["sdv"]}, "unknown pass 'sdv'"),
    ({}, "give one of"),
    ({"auto": True, "rank": 3}, "unknown option 'rank' for auto=True"),
])
def test_unknown_keys_and_missing_choices_are_errors(model_and_calib, kwargs, needle):
    path, _ = model_and_calib
    with pytest.raises(ConfigError, match=needle):
        onnxcomp.optimize(path, **kwargs)


def test_import_onnxcomp_stays_light():
    code = "import sys, onnxcomp; print('onnxruntime' in sys.modules, onnxcomp.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "False"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        onnxcomp.nope  # noqa: B018


def test_bench_diff_and_calibration_from_a_folder(model_and_calib, tmp_path):
    from PIL import Image

    path, calib = model_and_calib
    out, _ = onnxcomp.optimize(path, passes=[("quantize", {"mode": "weight"})], calib=calib)
    timed = onnxcomp.bench([path, out], inputs=calib, runs=5)
    assert len(timed["models"]) == 2 and timed["speedups"][0]["median"] > 0
    shaped = onnxcomp.bench([path], shapes={"x": (1, 8, 32, 32)}, runs=3)
    assert shaped["models"][0]["median_ms"] > 0
    changes = onnxcomp.diff(path, out)
    assert [c["origin"] for c in changes if "quantize" in c["passes"]] == ["conv"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full([40, 40, 3], 60 * i, np.uint8)).save(folder / f"{i}.png")
    model = onnx.load(path)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3  # an RGB model
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(
        np.ones([16, 3, 3, 3], np.float32), model.graph.initializer[0].name))
    data = onnxcomp.Calibration.from_folder(folder, model, size=(32, 32), mean=(0.5,) * 3,
                                            std=(0.5,) * 3)
    assert data.num_samples == 3 and data.batches[0]["x"].shape == (3, 3, 32, 32)
