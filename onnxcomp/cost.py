"""Parameters, multiply-accumulates (MACs) and weight bytes, per node and per model.

Shapes come from ONNX shape inference on a copy of the model. Symbolic input dims are resolved
from ``input_shapes`` when given (e.g. the shapes of the calibration data); a symbolic leading
(batch) dim of a graph input that is still unresolved defaults to 1. A node whose MACs need a
dim that stays unknown gets ``macs = 0`` and a logged warning; this module never fails on a
model it cannot fully infer.

MAC formulas (bias adds are not MACs; every other op counts 0 MACs):

- ``Conv``, ``ConvInteger``, ``QLinearConv``: ``out_elements * (C_in / groups) * prod(kernel)``
  for 1-D/2-D/3-D convolutions with any groups, strides, dilations, pads or ``auto_pad`` (the
  output shape already accounts for them). The weight is ``(C_out, C_in / groups, *kernel)``.
- ``ConvTranspose``: ``N * C_in * prod(spatial_in) * (C_out / groups) * prod(kernel)``, each input
  element is scattered through one ``(C_out / groups, *kernel)`` slice of the weight
  ``(C_in, C_out / groups, *kernel)``.
- ``Gemm``: ``M * N * K``, respecting ``transA`` / ``transB``.
- ``MatMul``, ``MatMulInteger``, ``QLinearMatMul``: ``prod(broadcast batch dims) * M * N * K``
  with numpy's rules for 1-D operands.

Parameter rule. A tensor is *constant* when it is an initializer or the output of a ``Constant``
node. A node's parameters are the elements of its constant weight tensors:

- for the ops above, the tensors in their weight and bias positions (``Conv``: W, B; ``Gemm``:
  B, C and a constant A; ``MatMul``: constant operands; ``QLinearConv``: w and the int32 bias;
  ...); quantization scales and zero points are not parameters;
- for ``QuantizeLinear`` / ``DequantizeLinear``: a constant input 0 (the stored weight);
- for every other op: each constant input of a float dtype (any width) or of an 8-, 4- or 2-bit
  integer dtype. Wider integer tensors (int64/int32 shapes, axes, indices) and booleans are
  bookkeeping, not parameters.

:attr:`ModelCost.params` is the total over the union of the nodes' parameter tensors, each
tensor counted once however many nodes read it. :attr:`ModelCost.weight_bytes` is the storage of
every initializer plus every top-level ``Constant`` node tensor, whatever its dtype.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx.external_data_helper
import onnx.helper
from google.protobuf.message import DecodeError

from onnxcomp import model as model_io
from onnxcomp import serial, weights
from onnxcomp.errors import InputError

log = logging.getLogger(__name__)

Shape = tuple[int | str, ...]
"""A tensor shape: known dims are ints, unknown ones their symbol (or ``"?"`` when unnamed)."""

UNKNOWN_DIM = "?"

_TP = onnx.TensorProto
FLOAT_DTYPES = frozenset(
    getattr(_TP, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "FLOAT8E8M0",
        "FLOAT4E2M1",
    )
    if hasattr(_TP, name)
)
SMALL_INT_DTYPES = frozenset(
    getattr(_TP, name)
    for name in ("INT8", "UINT8", "INT4", "UINT4", "INT2", "UINT2")
    if hasattr(_TP, name)
)
PARAM_DTYPES = FLOAT_DTYPES | SMALL_INT_DTYPES
SUB_BYTE_BITS = {
    getattr(_TP, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(_TP, name)
}

# Input positions holding weights (and biases) of the ops with a MAC formula.
WEIGHT_POSITIONS: Mapping[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "ConvInteger": (1,),
    "QLinearConv": (3, 8),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "MatMulInteger": (0, 1),
    "QLinearMatMul": (0, 3),
    "QuantizeLinear": (0,),
    "DequantizeLinear": (0,),
}


@dataclasses.dataclass(frozen=True)
class NodeCost(serial.Record):
    """The cost of one node.

    ``output_shape`` is the shape of the node's first output: ints for known dims, the symbol
    (or ``"?"``) for unknown ones, or None when not even the rank is known.
    """

    name: str
    op_type: str
    params: int
    macs: int
    weight_bytes: int
    output_shape: Shape | None


@dataclasses.dataclass(frozen=True)
class ModelCost(serial.Record):
    """The cost of a model: per-node costs and totals (see the module docstring for the rules)."""

    nodes: tuple[NodeCost, ...]
    params: int
    macs: int
    weight_bytes: int
    # Layers whose MACs need a dim that is not known (counted as 0): give input shapes.
    unknown_shapes: tuple[str, ...] = ()

    def by_name(self) -> dict[str, NodeCost]:
        """Node costs keyed by node name."""
        return {n.name: n for n in self.nodes}


@dataclasses.dataclass(frozen=True)
class _ConstInfo:
    """What this module needs to know about one constant tensor."""

    dtype: int
    dims: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.dims)


def model_cost(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
    tensor_shapes: Mapping[str, Sequence[int]] | None = None,
) -> ModelCost:
    """Params, MACs and weight bytes of every node of ``model`` and of the model as a whole.

    ``input_shapes`` maps graph input names to concrete shapes; they replace the declared dims
    on a copy of the model before shape inference. ``model`` itself is never modified.
    Raises :class:`InputError` when ``input_shapes`` names an unknown input or contradicts a
    fixed dim.
    """
    inferred = shaped_copy(model, input_shapes)
    graph = inferred.graph
    consts = _constants(graph)
    shapes = _shapes(graph, consts)
    for name, dims in (tensor_shapes or {}).items():  # measured where inference stops
        if _known(shapes.get(name)) is None:
            shapes[name] = tuple(int(d) for d in dims)

    nodes = []
    unknown: list[str] = []  # layers whose MACs need a dim that is not known
    param_tensors: dict[str, int] = {}
    for name, node in zip(_node_names(graph), graph.node, strict=True):
        const_inputs = [i for i in node.input if i in consts]
        own_params = _param_inputs(node, consts)
        for tensor in own_params:
            param_tensors[tensor] = consts[tensor].elements
        out_shape = shapes.get(node.output[0]) if node.output else None
        macs = _node_macs(node, shapes)
        if macs is None:
            unknown.append(name)
        nodes.append(
            NodeCost(
                name=name,
                op_type=node.op_type,
                params=sum(consts[t].elements for t in own_params),
                macs=macs or 0,
                weight_bytes=sum(consts[t].nbytes for t in dict.fromkeys(const_inputs)),
                output_shape=out_shape,
            )
        )
    if unknown:
        log.debug("%d layers of unknown shape counted as 0 MACs: %s", len(unknown),
                  ", ".join(unknown[:5]))
    return ModelCost(
        nodes=tuple(nodes),
        params=sum(param_tensors.values()),
        macs=sum(n.macs for n in nodes),
        weight_bytes=sum(c.nbytes for c in consts.values()),
        unknown_shapes=tuple(unknown),
    )


def cost_on(model: onnx.ModelProto, feeds: Mapping[str, Any] | None) -> ModelCost:
    """:func:`model_cost` at the shapes of ``feeds``.

    Where shape inference stops (shapes computed at run time), the model runs once on
    ``feeds`` to measure the rest.
    """
    given = {k: v.shape for k, v in feeds.items()} if feeds else None
    result = model_cost(model, given)
    if result.unknown_shapes and feeds:
        result = model_cost(model, given, run_shapes(model, feeds))
    return result


def run_shapes(model: onnx.ModelProto, feeds: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every node output's shape, from one ONNX Runtime run on ``feeds``.

    For what static shape inference cannot follow (shapes computed at run time: Reshape to a
    Shape-derived size, Resize to runtime sizes): pass the result as ``tensor_shapes``.
    """
    from onnxcomp import capture, runtime

    names = [o for node in model.graph.node for o in node.output if o]
    session = runtime.make_session(capture.with_outputs(model, names), "cpu", 1, optimize=False)
    outputs = session.run(names, dict(feeds))
    return {n: tuple(int(d) for d in v.shape) for n, v in zip(names, outputs, strict=True)}


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of an ONNX file plus the external data files its tensors reference.

    Each referenced data file is counted once, whole. A referenced file that is missing is
    logged and not counted.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    total = p.stat().st_size
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{p}: not a valid ONNX model ({exc})") from None
    locations: dict[Path, None] = {}
    for tensor in weights.graph_tensors(proto.graph):
        if onnx.external_data_helper.uses_external_data(tensor):
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            locations[(p.parent / info.location).resolve()] = None
    for location in locations:
        if location.is_file():
            total += location.stat().st_size
        else:
            log.warning("%s: external data file %s is missing", p, location)
    return total


def tensor_nbytes(dtype: int, dims: Sequence[int]) -> int:
    """Storage bytes of a dense tensor of ONNX ``dtype`` and shape ``dims`` (strings: 0)."""
    count = math.prod(dims)
    if dtype in SUB_BYTE_BITS:
        return (count * SUB_BYTE_BITS[dtype] + 7) // 8
    if dtype in (_TP.STRING, _TP.UNDEFINED):
        return 0
    return count * onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize


# ------------------------------------------------------------------------------ shapes


def shaped_copy(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None
) -> onnx.ModelProto:
    """A shape-inferred copy of ``model`` with its graph input dims resolved."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    inputs = {i.name: i for i in graph.input}
    changed = False
    for name, wanted in (input_shapes or {}).items():
        if name not in inputs:
            raise InputError(
                f"input_shapes names '{name}', which is not a graph input "
                f"(inputs: {', '.join(inputs) or 'none'})"
            )
        changed |= _set_input_shape(inputs[name], [int(d) for d in wanted])
    initializers = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and tensor_type.shape.dim:
            lead = tensor_type.shape.dim[0]
            if not lead.HasField("dim_value"):
                lead.Clear()
                lead.dim_value = 1
                changed = True
    if changed:
        # Shapes recorded for a symbolic batch would clash with the concrete ones.
        del graph.value_info[:]
        for out in graph.output:
            if out.type.HasField("tensor_type"):
                out.type.tensor_type.ClearField("shape")
    try:
        return model_io.infer_shapes(copy)
    except Exception as exc:  # shape inference raises many exception types; never fail here
        log.warning("shape inference failed (%s); MACs may be incomplete", exc)
        return copy


def _set_input_shape(value: onnx.ValueInfoProto, wanted: Sequence[int]) -> bool:
    """Give graph input ``value`` the concrete shape ``wanted``; True when a dim changed."""
    if not value.type.HasField("tensor_type"):
        raise InputError(f"input '{value.name}' is not a tensor; it has no shape to set")
    tensor_type = value.type.tensor_type
    dims = tensor_type.shape.dim
    if tensor_type.HasField("shape") and len(dims) != len(wanted):
        raise InputError(
            f"input '{value.name}' has rank {len(dims)}, input_shapes gives "
            f"{len(wanted)} dims {list(wanted)}"
        )
    if not tensor_type.HasField("shape"):
        tensor_type.shape.SetInParent()
        for _ in wanted:
            dims.add()
    changed = False
    for axis, (dim, size) in enumerate(zip(dims, wanted, strict=True)):
        if dim.HasField("dim_value"):
            if dim.dim_value != size:
                raise InputError(
                    f"input '{value.name}' dim {axis} is fixed to {dim.dim_value}, "
                    f"input_shapes gives {size}"
                )
            continue
        dim.Clear()
        dim.dim_value = size
        changed = True
    return changed


def _shapes(graph: onnx.GraphProto, consts: Mapping[str, _ConstInfo]) -> dict[str, Shape]:
    """Known shapes of the graph's tensors (value infos, inputs, outputs and constants)."""
    shapes: dict[str, Shape] = {}
    for value in itertools.chain(graph.input, graph.value_info, graph.output):
        shape = _value_shape(value)
        if shape is not None:
            shapes[value.name] = shape
    for name, info in consts.items():
        shapes[name] = info.dims
    return shapes


def _value_shape(value: onnx.ValueInfoProto) -> Shape | None:
    if not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or UNKNOWN_DIM)
        for d in tensor_type.shape.dim
    )


# ------------------------------------------------------------------------------ constants


def _constants(graph: onnx.GraphProto) -> dict[str, _ConstInfo]:
    """Initializers and top-level ``Constant`` node outputs, by tensor name."""
    consts: dict[str, _ConstInfo] = {}
    for init in graph.initializer:
        consts[init.name] = _ConstInfo(init.data_type, tuple(int(d) for d in init.dims))
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        info = _constant_node_info(node)
        if info is not None:
            consts[node.output[0]] = info
    return consts


def _constant_node_info(node: onnx.NodeProto) -> _ConstInfo | None:
    for attr in node.attribute:
        if attr.name == "value":
            return _ConstInfo(attr.t.data_type, tuple(int(d) for d in attr.t.dims))
        if attr.name == "sparse_value":
            values = attr.sparse_tensor.values
            return _ConstInfo(values.data_type, tuple(int(d) for d in attr.sparse_tensor.dims))
        if attr.name in ("value_float", "value_int"):
            dtype = _TP.FLOAT if attr.name == "value_float" else _TP.INT64
            return _ConstInfo(dtype, ())
        if attr.name in ("value_floats", "value_ints"):
            dtype = _TP.FLOAT if attr.name == "value_floats" else _TP.INT64
            count = len(attr.floats) if attr.name == "value_floats" else len(attr.ints)
            return _ConstInfo(dtype, (count,))
    return None


def _param_inputs(node: onnx.NodeProto, consts: Mapping[str, _ConstInfo]) -> list[str]:
    """The names of the constant tensors that count as ``node``'s parameters (no repeats)."""
    positions = WEIGHT_POSITIONS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if positions is not None:
        picked = [node.input[i] for i in positions if i < len(node.input)]
        return [t for t in dict.fromkeys(picked) if t in consts]
    return [t for t in dict.fromkeys(node.input) if t in consts and consts[t].dtype in PARAM_DTYPES]




def _node_names(graph: onnx.GraphProto) -> list[str]:
    """Node names; unnamed nodes get ``<op>_<k>`` as :class:`onnxcomp.graph.Graph` names them."""
    used = {n.name for n in graph.node if n.name}
    used.update(t for n in graph.node for t in itertools.chain(n.input, n.output))
    used.update(v.name for v in itertools.chain(graph.input, graph.output))
    used.update(t.name for t in graph.initializer)
    counter = itertools.count()
    names = []
    for node in graph.node:
        if node.name:
            names.append(node.name)
            continue
        base = f"{node.op_type}_{next(counter)}"
        name = base
        for i in itertools.count(1):
            if name not in used:
                break
            name = f"{base}_{i}"
        used.add(name)
        names.append(name)
    return names


# ------------------------------------------------------------------------------ MACs


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """MACs of one node; None when a dim they need is unknown."""
    if node.domain not in ("", "ai.onnx"):
        return 0
    rule = _MAC_RULES.get(node.op_type)
    if rule is None:
        return 0
    formula, data_pos, weight_pos = rule

    def shape_of(position: int) -> Shape | None:
        if position >= len(node.input) or not node.input[position]:
            return None
        return shapes.get(node.input[position])

    out = shapes.get(node.output[0]) if node.output else None
    return formula(node, shape_of(data_pos), shape_of(weight_pos), out)


def _known(shape: Shape | None) -> tuple[int, ...] | None:
    """``shape`` when all its dims are known, else None."""
    if shape is None:
        return None
    dims = tuple(d for d in shape if isinstance(d, int))
    return dims if len(dims) == len(shape) else None


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _kernel_macs(
    node: onnx.NodeProto, data: Shape | None, weight: Shape | None, out: Shape | None
) -> int | None:
    """MACs of a Conv (per output element) or ConvTranspose (per input element).

    Each element costs one MAC per weight of a filter: ``C / groups * prod(kernel)``.
    """
    each, weight_k = _known(data if node.op_type == "ConvTranspose" else out), _known(weight)
    if each is None or weight_k is None or len(weight_k) < 2:
        return None
    return math.prod(each) * math.prod(weight_k[1:])


def _gemm_macs(
    node: onnx.NodeProto, a: Shape | None, b: Shape | None, out: Shape | None
) -> int | None:
    """``M * N * K`` with ``A`` (M, K) or (K, M) and ``B`` (K, N) or (N, K)."""
    a_k, b_k = _known(a), _known(b)
    if a_k is None or b_k is None or len(a_k) != 2 or len(b_k) != 2:
        return None
    m, k = (a_k[1], a_k[0]) if _attr_int(node, "transA", 0) else a_k
    n = b_k[0] if _attr_int(node, "transB", 0) else b_k[1]
    return m * n * k


def _matmul_macs(
    node: onnx.NodeProto, a: Shape | None, b: Shape | None, out: Shape | None
) -> int | None:
    """``prod(broadcast batch dims) * M * N * K``, numpy semantics for 1-D operands."""
    a_k, b_k = _known(a), _known(b)
    if a_k is None or b_k is None or not a_k or not b_k:
        return None
    if len(a_k) == 1:
        a_k = (1, *a_k)
    if len(b_k) == 1:
        b_k = (*b_k, 1)
    m, k = a_k[-2:]
    n = b_k[-1]
    batch_a, batch_b = a_k[:-2], b_k[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = (1,) * (width - len(batch_a)) + batch_a
    batch_b = (1,) * (width - len(batch_b)) + batch_b
    batch = math.prod(
        max(x, y) if min(x, y) != 0 else 0 for x, y in zip(batch_a, batch_b, strict=True)
    )
    return batch * m * n * k


_MacFormula = Callable[[onnx.NodeProto, Shape | None, Shape | None, Shape | None], int | None]

# op type -> (formula, input position of the data / first operand, of the weight / second one)
_MAC_RULES: Mapping[str, tuple[_MacFormula, int, int]] = {
    "Conv": (_kernel_macs, 0, 1),
    "ConvInteger": (_kernel_macs, 0, 1),
    "QLinearConv": (_kernel_macs, 0, 3),
    "ConvTranspose": (_kernel_macs, 0, 1),
    "Gemm": (_gemm_macs, 0, 1),
    "MatMul": (_matmul_macs, 0, 1),
    "MatMulInteger": (_matmul_macs, 0, 1),
    "QLinearMatMul": (_matmul_macs, 0, 3),
}
