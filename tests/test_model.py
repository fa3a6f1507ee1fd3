from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from builders import conv_bn_model, make_model, tensor
from onnx import helper

from onnxcomp import model as model_io
from onnxcomp.passbase import InputError


def test_load_missing(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        model_io.load(tmp_path / "nope.onnx")


def test_load_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        model_io.load(tmp_path)


def test_load_truncated(tmp_path):
    data = conv_bn_model().SerializeToString()
    p = tmp_path / "t.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a valid ONNX model|invalid ONNX model"):
        model_io.load(p)


def test_load_not_onnx(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_text("hello, I am not a model\n" * 10)
    with pytest.raises(InputError, match="ONNX"):
        model_io.load(p)


def test_load_old_opset(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    m = make_model(nodes, [tensor("x", [1])], [tensor("y", [1])], opset=9)
    p = tmp_path / "old.onnx"
    onnx.save(m, p)
    with pytest.raises(InputError, match="opset 9"):
        model_io.load(p)


def test_save_roundtrip_and_input_untouched(tmp_path):
    m = conv_bn_model()
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    before = src.read_bytes()
    loaded = model_io.load(src)
    out = model_io.save(loaded, tmp_path / "out.onnx")
    assert src.read_bytes() == before
    assert onnx.load(out).SerializeToString() == m.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


def test_save_external_data_roundtrip(tmp_path):
    m = conv_bn_model(c_in=16, c_out=32)
    out = model_io.save(m, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    back = model_io.load(out)
    w0 = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    w1 = {i.name: onnx.numpy_helper.to_array(i) for i in back.graph.initializer}
    assert w0.keys() == w1.keys()
    for k in w0:
        np.testing.assert_array_equal(w0[k], w1[k])
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]


def test_large_model_paths(tmp_path, monkeypatch):
    """Models over the protobuf limit go through files (limit lowered to test it cheaply)."""
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)
    m = conv_bn_model(c_in=16, c_out=32)
    assert model_io.is_large(m)
    model_io.check_model(m)
    inferred = model_io.infer_shapes(m)
    assert len(inferred.graph.value_info) >= 2
    out = model_io.save(m, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert len(model_io.load(out).graph.initializer) == len(m.graph.initializer)


def test_failed_save_leaves_old_output(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous good output")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        model_io.save(conv_bn_model(), target)
    assert target.read_bytes() == b"previous good output"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_infer_shapes_tolerates_symbolic_dims():
    m = conv_bn_model(batch="N")
    inferred = model_io.infer_shapes(m)
    dims = {v.name: v.type.tensor_type.shape.dim for v in inferred.graph.value_info}
    assert dims["c"][0].dim_param == "N"
    assert dims["c"][1].dim_value == 8


def test_quantized_nodes_detected():
    nodes = [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="ci")]
    m = make_model(nodes, [tensor("x", [1, 1, 3, 3], onnx.TensorProto.UINT8)],
                   [tensor("y", [1, 1, 1, 1], onnx.TensorProto.INT32)],
                   {"w": np.ones([1, 1, 3, 3], dtype=np.uint8)})
    assert model_io.quantized_nodes(m) == ["ci"]


def test_negative_dims_load_as_dynamic(tmp_path):
    """Exporters that write -1 for a dynamic batch: onnxcomp treats it as unknown."""
    from onnxcomp import benchmark as bench

    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    m = make_model(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 3])])
    for value in (m.graph.input[0], m.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    p = tmp_path / "neg.onnx"
    onnx.save(m, p)
    loaded = model_io.load(p)
    for value in (loaded.graph.input[0], loaded.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        assert not dim.HasField("dim_value") and not dim.dim_param
    assert value.type.tensor_type.shape.dim[1].dim_value == 3
    x = np.ones((4, 3), np.float32)
    res = bench.benchmark([loaded], bench.BenchConfig(runs=2, warmup=1), inputs={"x": x})
    assert res.models[0].median_ms > 0
