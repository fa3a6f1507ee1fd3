"""Writing replacement chains into a graph, and one-layer models of them for timing.

Nodes a chain adds are named ``<pass>/<original node>`` (by :meth:`Graph.add_node`) and carry
the method and rank as provenance, so Netron shows where every node came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.graph import Graph
from onnxcomp.linear import ConvGeometry, Layer, Plan, Stage


def np_dtype(layer: Layer) -> np.dtype[Any]:
    """The numpy dtype of the layer's weights (what its chain is written in)."""
    return np.dtype(layer.dtype)


def build_chain(graph: Graph, layer: Layer, plan: Plan, ab: np.ndarray, pass_name: str) -> None:
    """Replace ``layer`` in ``graph`` by the plan's stages and a last stage ``ab``."""
    node = layer.node
    x, y = node.inputs[0], node.outputs[0]
    graph.retire([node])
    write_chain(graph, layer, plan, ab, x, y, pass_name)


def write_chain(graph: Graph, layer: Layer, plan: Plan, ab: np.ndarray, x: Any, y: Any,
                 pass_name: str) -> None:
    """Add the plan's stages and a last stage ``ab`` computing ``y`` from ``x``."""
    dtype = np_dtype(layer)
    props = {"method": plan.method, "rank": "x".join(str(r) for r in plan.ranks)}
    current = x
    for i, st in enumerate(plan.stages):
        out = graph.variable(f"{layer.node.name}_{st.suffix or i}", dtype=dtype)
        _add_stage(graph, layer, st, current, out, None, pass_name, props)
        current = out
    last_w = ab[:, :-1].reshape(plan.last_shape)
    last = Stage("conv" if layer.is_conv else "matmul", last_w, plan.last_attrs, "last")
    _add_stage(graph, layer, last, current, y, ab[:, -1], pass_name, props)


def _add_stage(graph: Graph, layer: Layer, st: Stage, x: Any, y: Any, bias: np.ndarray | None,
               pass_name: str, props: dict[str, Any]) -> None:
    dtype = np_dtype(layer)
    origin = layer.name
    if st.kind == "conv":
        inputs = [x, graph.constant(f"{origin}_{st.suffix}_W", st.weight.astype(dtype))]
        if bias is not None:
            inputs.append(graph.constant(f"{origin}_{st.suffix}_B", bias.astype(dtype)))
        attrs = dict(st.attrs)
        attrs.setdefault("kernel_shape", list(st.weight.shape[2:]))
        graph.add_node("Conv", inputs, [y], pass_name=pass_name, origin=origin, attrs=attrs,
                       props=props, suffix=st.suffix)
        return
    w = graph.constant(f"{origin}_{st.suffix}_W", st.weight.T.astype(dtype))  # [K, N]
    if bias is None:
        graph.add_node("MatMul", [x, w], [y], pass_name=pass_name, origin=origin, props=props,
                       suffix=st.suffix)
        return
    b = graph.constant(f"{origin}_{st.suffix}_B", bias.astype(dtype))
    if layer.op == "Gemm":
        graph.add_node("Gemm", [x, w, b], [y], pass_name=pass_name, origin=origin, props=props,
                       suffix=st.suffix)
        return
    mid = graph.variable(f"{origin}_{st.suffix}_mm", dtype=dtype)
    graph.add_node("MatMul", [x, w], [mid], pass_name=pass_name, origin=origin, props=props,
                   suffix=st.suffix)
    graph.add_node("Add", [mid, b], [y], pass_name=pass_name, origin=origin, props=props,
                   suffix=f"{st.suffix}_bias")


def standalone(layer: Layer, plan: Plan | None, ir_version: int, opsets: Sequence[Any],
               copies: int = 1) -> onnx.ModelProto:
    """A one-layer model (the original layer, or the plan's chain) for micro-benchmarks.

    ``copies`` > 1 (the original layer only, when its output has its input's shape) chains
    that many copies of it.
    """
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
    x = helper.make_tensor_value_info("x", elem, [1, *layer.in_shape])
    y = helper.make_tensor_value_info("y", elem, [1, *layer.out_shape])
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, shape: Sequence[int]) -> str:
        inits.append(numpy_helper.from_array(
            rng.standard_normal(shape).astype(np.float32) * 0.1, name))
        return name

    def add(kind: str, wshape: Sequence[int], attrs: dict[str, Any], src: str, dst: str,
            bias: bool, i: int) -> None:
        if kind == "conv":
            ins = [src, init(f"w{i}", wshape)] + ([init(f"b{i}", [wshape[0]])] if bias else [])
            nodes.append(helper.make_node("Conv", ins, [dst], **attrs))
        elif layer.op == "Gemm" and bias:
            nodes.append(helper.make_node("Gemm", [src, init(f"w{i}", wshape[::-1]),
                                                   init(f"b{i}", [wshape[0]])], [dst]))
        else:
            mid = dst if not bias else f"mm{i}"
            nodes.append(helper.make_node("MatMul", [src, init(f"w{i}", wshape[::-1])], [mid]))
            if bias:
                nodes.append(helper.make_node("Add", [mid, init(f"b{i}", [wshape[0]])], [dst]))

    if plan is None:
        attrs = _layer_attrs(layer)
        for i in range(copies):
            add("conv" if layer.is_conv else "matmul", layer.weight.shape, attrs,
                "x" if i == 0 else f"c{i - 1}", "y" if i == copies - 1 else f"c{i}", True, i)
    else:
        src = "x"
        for i, st in enumerate(plan.stages):
            dst = f"t{i}"
            attrs = dict(st.attrs)
            if st.kind == "conv":
                attrs.setdefault("kernel_shape", list(st.weight.shape[2:]))
            add(st.kind, st.weight.shape, attrs, src, dst, False, i)
            src = dst
        attrs = dict(plan.last_attrs)
        if layer.is_conv:
            attrs.setdefault("kernel_shape", list(plan.last_shape[2:]))
        add("conv" if layer.is_conv else "matmul", plan.last_shape, attrs, src, "y", True, 99)
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=list(opsets))
    model.ir_version = ir_version
    return model


def _layer_attrs(layer: Layer) -> dict[str, Any]:
    if not layer.is_conv:
        return {}
    g = layer.geom
    assert g is not None
    return {"kernel_shape": [g.kh, g.kw], "strides": [g.sh, g.sw], "dilations": [g.dh, g.dw],
            "pads": list(g.pads)}


def conv_hw(layer: Layer) -> tuple[tuple[int, int], tuple[int, int]]:
    """((H_in, W_in), (H_out, W_out)) of a conv layer."""
    return (layer.in_shape[1], layer.in_shape[2]), (layer.out_shape[1], layer.out_shape[2])


def vertical_attrs(g: ConvGeometry) -> dict[str, Any]:
    """Attributes of a ``kh x 1`` stage taking the vertical geometry."""
    return {"strides": [g.sh, 1], "dilations": [g.dh, 1], "pads": [g.pads[0], 0, g.pads[2], 0]}


def horizontal_attrs(g: ConvGeometry) -> dict[str, Any]:
    """Attributes of a ``1 x kw`` stage taking the horizontal geometry."""
    return {"strides": [1, g.sw], "dilations": [1, g.dw], "pads": [0, g.pads[1], 0, g.pads[3]]}


def full_attrs(g: ConvGeometry) -> dict[str, Any]:
    """Attributes of a stage taking the whole original geometry."""
    return {"strides": [g.sh, g.sw], "dilations": [g.dh, g.dw], "pads": list(g.pads)}


def write_linear(graph: Graph, name: str, w_cols: np.ndarray, bias: np.ndarray | None) -> None:
    """Write canonical ``[Y, X]`` weights (and a bias) into node ``name``'s own layout.

    Conv: ``[O, C, kh, kw]``; MatMul / Gemm: transposed as the node reads them, alpha and beta
    divided out. A bias is added as a new input when the node has none.
    """
    node = next(n for n in graph.nodes if n.name == name)
    w_t = graph.input(node, 1)
    w = graph.const_value(w_t)
    assert w is not None and w_t is not None
    dtype = w.dtype
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        new = w_cols.T.reshape(w.shape)
    else:
        new = w_cols.reshape(w.shape)
    graph.set_input_constant(node, 1, (new / alpha).astype(dtype))
    if bias is None:
        return
    b = (bias / (beta if beta else 1.0)).astype(dtype)
    if graph.input(node, 2) is None:
        const = graph.constant(f"{name}_bias", b)
        if len(node.inputs) > 2:  # an empty optional input
            node.inputs[2] = const
        else:
            node.inputs.append(const)
    else:
        graph.set_input_constant(node, 2, b)
