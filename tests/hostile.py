"""Seeded hostile copies of ONNX models: the broken files users hand a compiler.

Byte damage (truncations, flipped bytes, zeroed / duplicated / inserted spans) and structural
damage a parser accepts (initializers whose data does not match their shape or dtype, inputs
without shapes, cycles, dangling inputs, duplicated outputs, unknown domains and custom ops,
opsets 7-22 and unreleased ones, If / Loop subgraphs, NaN weights, external data missing or
in the wrong place), plus models of other kinds (1-D and 3-D convs). Each case is
``(kind, files)``: ``files`` maps a file name to its bytes; ``model.onnx`` is the one to open.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Case = tuple[str, dict[str, bytes]]


# ------------------------------------------------------------------ byte damage
def _truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(1, len(data)))]


def _flip(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for pos in rng.integers(0, len(out), size=int(rng.integers(1, 9))):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _zero_span(data: bytes, rng: np.random.Generator) -> bytes:
    start = int(rng.integers(0, len(data)))
    end = min(len(data), start + int(rng.integers(1, 256)))
    return data[:start] + bytes(end - start) + data[end:]


def _duplicate_span(data: bytes, rng: np.random.Generator) -> bytes:
    start = int(rng.integers(0, len(data)))
    end = min(len(data), start + int(rng.integers(1, 512)))
    return data[:end] + data[start:end] + data[end:]


def _insert_junk(data: bytes, rng: np.random.Generator) -> bytes:
    pos = int(rng.integers(0, len(data)))
    junk = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return data[:pos] + junk + data[pos:]


BYTE_DAMAGE: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "truncated": _truncate, "flipped_bytes": _flip, "zeroed_span": _zero_span,
    "duplicated_span": _duplicate_span, "inserted_junk": _insert_junk,
}


# ------------------------------------------------------------------ structural damage
def _pick(items: list, rng: np.random.Generator):
    return items[int(rng.integers(0, len(items)))]


def _weights(model: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in model.graph.initializer if len(t.dims) >= 1 and np.prod(t.dims) > 1]


def _init_length(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    t = _pick(_weights(model), rng)
    arr = numpy_helper.to_array(t)
    raw = arr.tobytes()
    cut = int(rng.integers(1, max(2, len(raw) // 2)))
    t.ClearField("float_data")
    t.ClearField("int64_data")
    t.ClearField("int32_data")
    t.raw_data = raw[:-cut] if rng.random() < 0.5 else raw + raw[:cut]


def _wrong_dtype(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    t = _pick(_weights(model), rng)
    t.data_type = int(_pick([TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16,
                             TensorProto.INT8, TensorProto.STRING, TensorProto.BOOL], rng))


def _no_input_shape(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in inits:
            value.type.tensor_type.ClearField("shape")


def _cycle(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    nodes = model.graph.node
    if len(nodes) < 2:
        nodes[0].input[0] = nodes[0].output[0]
        return
    i = int(rng.integers(0, len(nodes) - 1))
    j = int(rng.integers(i + 1, len(nodes)))
    nodes[i].input[0] = nodes[j].output[0]  # an earlier node reads a later one's output


def _dangling(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = _pick(list(model.graph.node), rng)
    node.input[int(rng.integers(0, len(node.input)))] = "no_such_tensor"


def _dropped_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    del model.graph.initializer[int(rng.integers(0, len(model.graph.initializer)))]


def _duplicate_output(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    nodes = model.graph.node
    if len(nodes) < 2:
        return
    i, j = sorted(rng.choice(len(nodes), size=2, replace=False).tolist())
    nodes[j].output[0] = nodes[i].output[0]


def _custom_op(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = _pick(list(model.graph.node), rng)
    node.op_type = "MyFancyOp"
    node.domain = "com.example.custom"
    if rng.random() < 0.5:
        model.opset_import.append(helper.make_opsetid("com.example.custom", 1))


def _unknown_domain(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = _pick(list(model.graph.node), rng)
    node.domain = "org.unknown"


def _opset(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    version = int(_pick([*range(7, 23), 99, 0], rng))
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = version


def _ir_version(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    model.ir_version = int(_pick([0, 1, 2, 99], rng))


def _bad_attribute(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "MaxPool", "Gemm")]
    node = _pick(convs or list(model.graph.node), rng)
    choice = int(rng.integers(0, 3))
    if choice == 0:
        node.attribute.append(helper.make_attribute("kernel_shape", [3]))
    elif choice == 1:
        node.attribute.append(helper.make_attribute("pads", [-5, -5, -5, -5]))
    else:
        node.attribute.append(helper.make_attribute("group", 7))
    # a repeated attribute name, or an invalid value: both must be input errors


def _nan_weights(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    t = _pick(_weights(model), rng)
    arr = numpy_helper.to_array(t).copy()
    if arr.dtype.kind != "f":
        return
    arr.reshape(-1)[: max(1, arr.size // 10)] = _pick([np.nan, np.inf, -np.inf], rng)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _zero_dim_input(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 1:
            dims[int(rng.integers(1, len(dims)))].dim_value = 0


def _renamed_output(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    model.graph.output[0].name = "nowhere"


def _reroute_output(model: onnx.ModelProto, suffix: str) -> tuple[onnx.ValueInfoProto, str]:
    """The first graph output's producer (and readers) now use a new inner name."""
    out = model.graph.output[0]
    inner = out.name + suffix
    for node in model.graph.node:
        for names in (node.output, node.input):
            for i, name in enumerate(names):
                if name == out.name:
                    names[i] = inner
    return out, inner


def _if_subgraph(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """The graph's first output passes through an If whose branches read it from outside."""
    out, inner = _reroute_output(model, "_before_if")
    then_out = helper.make_tensor_value_info("then_y", out.type.tensor_type.elem_type, None)
    else_out = helper.make_tensor_value_info("else_y", out.type.tensor_type.elem_type, None)
    then_g = helper.make_graph([helper.make_node("Identity", [inner], ["then_y"])], "then",
                               [], [then_out])
    else_g = helper.make_graph([helper.make_node("Neg", [inner], ["else_y"])], "else", [],
                               [else_out])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "if_cond"))
    model.graph.node.append(helper.make_node("If", ["if_cond"], [out.name], name="hostile_if",
                                             then_branch=then_g, else_branch=else_g))


def _loop_subgraph(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """The graph's first output passes through a Loop that runs once and adds zero."""
    out, inner = _reroute_output(model, "_before_loop")
    elem = out.type.tensor_type.elem_type
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["carried"], ["carried_out"])],
        "body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried", elem, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_out", elem, None)])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "trips"),
                                    numpy_helper.from_array(np.array(True), "loop_cond")])
    model.graph.node.append(helper.make_node("Loop", ["trips", "loop_cond", inner], [out.name],
                                             name="hostile_loop", body=body))


PROTO_DAMAGE: dict[str, Callable[[onnx.ModelProto, np.random.Generator], None]] = {
    "initializer_length": _init_length, "wrong_dtype": _wrong_dtype,
    "input_without_shape": _no_input_shape, "cycle": _cycle, "dangling_input": _dangling,
    "dropped_initializer": _dropped_initializer, "duplicated_output": _duplicate_output,
    "custom_op": _custom_op, "unknown_domain": _unknown_domain, "opset": _opset,
    "ir_version": _ir_version, "bad_attribute": _bad_attribute, "nan_weights": _nan_weights,
    "zero_dim_input": _zero_dim_input, "renamed_output": _renamed_output,
    "if_subgraph": _if_subgraph, "loop_subgraph": _loop_subgraph,
}


def _external(model: onnx.ModelProto, rng: np.random.Generator) -> Case:
    """Weights in an external file that is missing, in the wrong place, or cut short."""
    import tempfile
    from pathlib import Path

    model = copy.deepcopy(model)  # saving with external data rewrites the tensors in place
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.data", size_threshold=0)
        files = {"model.onnx": path.read_bytes()}
        data = (Path(tmp) / "model.data").read_bytes()
    how = int(rng.integers(0, 3))
    if how == 0:
        return "external_data_missing", files
    if how == 1:
        return "external_data_elsewhere", {**files, "weights/model.data": data}
    return "external_data_short", {**files, "model.data": data[: len(data) // 2]}


# ------------------------------------------------------------------ other kinds of model
def conv_nd(dims: int, seed: int = 0) -> onnx.ModelProto:
    """A Conv -> Relu -> Conv model over a 1-D (dims=1) or 3-D (dims=3) input."""
    rng = np.random.default_rng(seed)
    k = [3] * dims
    size = [16] * dims if dims == 1 else [6] * dims
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="c1", pads=[1] * 2 * dims),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", pads=[1] * 2 * dims)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, [8, 4, *k]).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.1, [8]).astype(np.float32), "B1"),
             numpy_helper.from_array(rng.normal(0, 0.3, [8, 8, *k]).astype(np.float32), "W2")]
    graph = helper.make_graph(
        nodes, f"conv{dims}d", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              ["N", 4, *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, *size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cases(bases: dict[str, onnx.ModelProto], n: int, seed: int = 0) -> Iterator[Case]:
    """``n`` seeded hostile cases over ``bases`` (name -> model), every kind in turn."""
    rng = np.random.default_rng(seed)
    kinds = [*BYTE_DAMAGE, *PROTO_DAMAGE, "external_data"]
    names = sorted(bases)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        base_name = names[(i // len(kinds)) % len(names)]
        base = bases[base_name]
        if kind in BYTE_DAMAGE:
            data = BYTE_DAMAGE[kind](base.SerializeToString(), rng)
            yield f"{base_name}:{kind}", {"model.onnx": data}
        elif kind in PROTO_DAMAGE:
            model = copy.deepcopy(base)
            PROTO_DAMAGE[kind](model, rng)
            yield f"{base_name}:{kind}", {"model.onnx": model.SerializeToString()}
        else:
            what, files = _external(base, rng)
            yield f"{base_name}:{what}", files
