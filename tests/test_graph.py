from __future__ import annotations

import numpy as np
from builders import assert_equivalent, conv_bn_model, make_model, tensor
from onnx import helper, numpy_helper

from onnxcomp.graph import PROVENANCE_ORIGIN, PROVENANCE_PASS, Graph


def _model(ir_version: int = 8):
    w = np.ones([2, 2, 1, 1], dtype=np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], name="c",
                         value=numpy_helper.from_array(w, "w")),
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv1"),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2"),
        helper.make_node("Conv", ["a", "w2"], ["z"], name="conv3"),
    ]
    return make_model(nodes, [tensor("x", [1, 2, 4, 4])],
                      [tensor("y", [1, 2, 4, 4]), tensor("z", [1, 2, 4, 4])],
                      {"w2": 2 * w}, ir_version=ir_version, opset=17)


def test_queries():
    g = Graph(_model())
    conv1, conv2, conv3 = g.nodes_of("Conv")
    w = conv1.inputs[1]
    np.testing.assert_array_equal(g.const_value(w), np.ones([2, 2, 1, 1]))
    assert g.const_value(conv1.inputs[0]) is None  # graph input
    assert g.producer(conv2.inputs[0]) is conv1
    assert g.consumers(conv1.outputs[0]) == [conv2, conv3]
    w2 = conv2.inputs[1]
    assert g.is_shared(w2, [conv2])
    assert not g.is_shared(w2, [conv2, conv3])
    assert g.is_graph_output(conv2.outputs[0])
    assert g.shape(conv1.outputs[0]) == (1, 2, 4, 4)


def test_unique_names():
    g = Graph(_model())
    assert g.unique_name("conv1") == "conv1_1"
    assert g.unique_name("conv1") == "conv1_2"
    assert g.unique_name("fresh") == "fresh"


def _rewrite(ir_version: int):
    model = _model(ir_version)
    g = Graph(model)
    conv2 = g.nodes_of("Conv")[1]
    out = conv2.outputs[0]
    mid = g.variable("mid")
    g.add_node("Relu", [conv2.inputs[0]], [mid], pass_name="demo", origin=conv2.name)
    g.add_node("Conv", [mid, g.constant("w3", 2 * np.ones([2, 2, 1, 1], np.float32))], [out],
               pass_name="demo", origin=conv2.name, props={"rank": 4}, suffix="b")
    g.retire([conv2])
    return model, g.export()


def test_provenance_ir10_metadata_props():
    model, out = _rewrite(10)
    new = [n for n in out.graph.node if n.name.startswith("demo/")]
    assert [n.name for n in new] == ["demo/conv2", "demo/conv2/b"]
    props = {p.key: p.value for p in new[1].metadata_props}
    assert props[PROVENANCE_PASS] == "demo"
    assert props[PROVENANCE_ORIGIN] == "conv2"
    assert props["onnxcomp.rank"] == "4"
    assert out.ir_version == 10


def test_provenance_old_ir_in_doc_string():
    model, out = _rewrite(8)
    new = next(n for n in out.graph.node if n.name == "demo/conv2/b")
    assert "onnxcomp.pass=demo" in new.doc_string
    assert not new.metadata_props
    assert out.ir_version == 8
    assert [o.name for o in out.graph.output] == ["y", "z"]


def test_roundtrip_is_exact():
    model = conv_bn_model()
    assert_equivalent(model, Graph(model).export(), rtol=0, atol=0)
