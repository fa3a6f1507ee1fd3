"""Graph helpers for passes; the only module that imports onnx-graphsurgeon.

A :class:`Graph` is a mutable working copy of a model for the duration of one pass. Passes find
producers and consumers, read constant weights (initializers or ``Constant`` nodes), create new
nodes with provenance, retire old ones, and :meth:`Graph.export` a checked model that keeps the
source's IR version and opsets.

graphsurgeon traps handled here: tensors are compared with ``is`` (graphsurgeon's ``==`` compares
names), constants shared by several nodes are never edited in place (passes create new ones),
and ``fold_constants`` is never called with its default ``error_ok=True``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcomp import model as model_io
from onnxcomp import weights
from onnxcomp.errors import PassError
from onnxcomp.passbase import PROVENANCE_KEY

log = logging.getLogger(__name__)

Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable

PROVENANCE_PASS = PROVENANCE_KEY  # the key passbase.PassBase.ensures checks
PROVENANCE_ORIGIN = "onnxcomp.origin"
# NodeProto.metadata_props exists from IR version 10 on; older models get doc_string only.
NODE_METADATA_IR = 10


class Graph:
    """A working copy of a model that one pass edits."""

    def __init__(self, model: onnx.ModelProto, infer: bool = True) -> None:
        self.source = model
        inferred = model_io.infer_shapes(model) if infer else model
        self.gs: gs.Graph = gs.import_onnx(inferred)
        self.on_disk = weights.on_disk(model)
        if self.on_disk:
            for tensor in self.gs.tensors().values():
                values = getattr(tensor, "_values", None)
                if isinstance(values, LazyValues) and weights.is_external(values.tensor):
                    tensor._values = _StoredValues(values.tensor)
        self._used_names: set[str] = set()
        for node in self.gs.nodes:
            if node.name:
                self._used_names.add(node.name)
        self._used_names.update(self.gs.tensors().keys())
        self._provenance: dict[str, dict[str, str]] = {}
        self._unnamed = itertools.count()
        for node in self.gs.nodes:
            if not node.name:
                node.name = self.unique_name(f"{node.op}_{next(self._unnamed)}")

    # ----------------------------------------------------------------- queries
    @property
    def opset(self) -> int:
        """The model's default-domain (ai.onnx) opset version."""
        for entry in self.source.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return int(entry.version)
        return 1

    @property
    def nodes(self) -> list[gs.Node]:
        """The graph's nodes (a snapshot list; safe to iterate while editing)."""
        return list(self.gs.nodes)

    def nodes_of(self, *op_types: str) -> list[gs.Node]:
        """Nodes whose op type is one of ``op_types``, in graph order."""
        return [n for n in self.gs.nodes if n.op in op_types]

    @staticmethod
    def producer(tensor: gs.Tensor) -> gs.Node | None:
        """The node that writes ``tensor``, or None for graph inputs and constants."""
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: gs.Tensor) -> list[gs.Node]:
        """The nodes that read ``tensor``."""
        return list(tensor.outputs)

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        """True when ``tensor`` is one of the graph's outputs."""
        return any(t is tensor for t in self.gs.outputs)

    def is_graph_input(self, tensor: gs.Tensor) -> bool:
        """True when ``tensor`` is one of the graph's inputs (overridable, so not constant)."""
        return any(t is tensor for t in self.gs.inputs)

    def const_value(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """The value of a constant tensor (initializer or ``Constant`` node), else None."""
        if tensor is None or self.is_graph_input(tensor):
            return None
        if isinstance(tensor, gs.Constant):
            if isinstance(tensor._values, _StoredValues):  # read per use, never held
                return tensor._values.load()
            return np.asarray(tensor.values)
        prod = self.producer(tensor)
        if prod is not None and prod.op == "Constant":
            value = prod.attrs.get("value")
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
            for key in ("value_float", "value_int"):
                if key in prod.attrs:
                    return np.asarray(prod.attrs[key])
            for key in ("value_floats", "value_ints"):
                if key in prod.attrs:
                    return np.asarray(list(prod.attrs[key]))
        return None

    def is_shared(self, tensor: gs.Tensor, within: Iterable[gs.Node]) -> bool:
        """True when ``tensor`` is read by a node outside ``within`` or is a graph output."""
        allowed = list(within)
        if self.is_graph_output(tensor):
            return True
        return any(not any(c is a for a in allowed) for c in tensor.outputs)

    @staticmethod
    def input(node: gs.Node, index: int) -> gs.Tensor | None:
        """Input ``index`` of ``node``, or None when absent or empty (optional input)."""
        if index >= len(node.inputs):
            return None
        t = node.inputs[index]
        return None if (isinstance(t, gs.Variable) and not t.name) else t

    @staticmethod
    def shape(tensor: gs.Tensor) -> tuple[Any, ...] | None:
        """The inferred shape (ints, or strings for symbolic dims), or None when unknown."""
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return None if tensor.shape is None else tuple(tensor.shape)

    # ----------------------------------------------------------------- edits
    def unique_name(self, base: str) -> str:
        """A node/tensor name not yet used in the graph, derived from ``base``."""
        name = base
        for i in itertools.count(1):
            if name not in self._used_names:
                break
            name = f"{base}_{i}"
        self._used_names.add(name)
        return name

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        """A new constant (initializer) with a unique name."""
        return gs.Constant(self.unique_name(base), _contiguous(values))

    def variable(
        self, base: str, dtype: Any = np.float32, shape: Sequence[Any] | None = None
    ) -> gs.Variable:
        """A new intermediate tensor with a unique name."""
        return gs.Variable(self.unique_name(base), dtype=dtype, shape=shape)

    def add_input(self, base: str, dtype: Any = np.float32,
                  shape: Sequence[Any] | None = None) -> gs.Variable:
        """A new graph input with a unique name (for internal probe models)."""
        var = self.variable(base, dtype=dtype, shape=shape)
        self.gs.inputs.append(var)
        return var

    def add_node(
        self,
        op: str,
        inputs: Sequence[gs.Tensor],
        outputs: Sequence[gs.Tensor],
        *,
        pass_name: str,
        origin: str,
        attrs: Mapping[str, Any] | None = None,
        props: Mapping[str, Any] | None = None,
        suffix: str = "",
    ) -> gs.Node:
        """Add a node named ``<pass>/<origin>[/suffix]`` carrying provenance metadata."""
        # Exporters name nodes "/block/Conv": no "cp//block/Conv" (Netron shows the name).
        base = f"{pass_name}/{origin.lstrip('/')}" + (f"/{suffix}" if suffix else "")
        node = gs.Node(
            op,
            name=self.unique_name(base),
            attrs=dict(attrs or {}),
            inputs=list(inputs),
            outputs=list(outputs),
        )
        self.gs.nodes.append(node)
        meta = {PROVENANCE_PASS: pass_name, PROVENANCE_ORIGIN: origin}
        meta.update({f"onnxcomp.{k}": str(v) for k, v in (props or {}).items()})
        self._provenance[node.name] = meta
        return node

    def set_input_constant(self, node: gs.Node, index: int, values: np.ndarray) -> gs.Constant:
        """Make input ``index`` of ``node`` a constant with ``values``.

        The new initializer keeps the old one's name when only ``node`` read it (so diffs of
        the graph stay readable); otherwise it gets a fresh unique name.
        """
        old = node.inputs[index]
        alone = isinstance(old, gs.Constant) and all(c is node for c in old.outputs)
        name = old.name if alone else self.unique_name(old.name)
        const = gs.Constant(name, _contiguous(values))
        node.inputs[index] = const
        return const

    def replace_with_constant(self, tensor: gs.Tensor, values: np.ndarray) -> gs.Constant:
        """Make ``tensor``'s readers read a new initializer of the same name instead."""
        const = gs.Constant(tensor.name, _contiguous(values))
        prod = self.producer(tensor)
        for consumer in list(tensor.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is tensor:
                    consumer.inputs[i] = const
        if prod is not None:
            self.retire([prod])
        return const

    @staticmethod
    def retire(nodes: Iterable[gs.Node]) -> None:
        """Disconnect ``nodes``; cleanup at export removes them."""
        for node in nodes:
            node.inputs.clear()
            node.outputs.clear()

    def bypass(self, node: gs.Node, keep_input: int = 0) -> None:
        """Remove a single-output node, rewiring readers of its output to its input.

        When the output is a graph output, the producer of the input is made to write the graph
        output tensor instead (so graph output names never change).
        """
        src = node.inputs[keep_input]
        out = node.outputs[0]
        if self.is_graph_output(out):
            prod = self.producer(src)
            if prod is None or self.is_graph_output(src) or len(src.outputs) != 1:
                raise PassError(f"cannot bypass {node.name}: its output is a graph output")
            idx = next(i for i, t in enumerate(prod.outputs) if t is src)
            node.inputs.clear()
            node.outputs.clear()
            prod.outputs[idx] = out
            return
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = src
        node.inputs.clear()
        node.outputs.clear()

    # ----------------------------------------------------------------- export
    def export(self, check: bool = True) -> onnx.ModelProto:
        """A checked ModelProto with the source's IR version, opsets and metadata."""
        g = self.gs
        g.cleanup(remove_unused_graph_inputs=False)
        g.toposort()
        try:
            out = gs.export_onnx(g, do_type_check=True)
        except Exception as exc:  # graphsurgeon raises plain exceptions
            raise PassError(f"graph export failed: {exc}") from exc
        src = self.source
        out.ir_version = src.ir_version
        del out.opset_import[:]
        out.opset_import.extend(src.opset_import)
        for field in ("producer_name", "producer_version", "domain", "model_version",
                      "doc_string"):
            setattr(out, field, getattr(src, field))
        del out.metadata_props[:]
        out.metadata_props.extend(src.metadata_props)
        # Intermediate shapes may be stale after a rewrite: drop them and infer again.
        del out.graph.value_info[:]
        self._restore_node_metadata(out)
        if self.on_disk:  # the new weights join the old ones on disk
            weights.spill(out)
        out = model_io.infer_shapes(out)
        if check:
            check_rewritten(out)
        return out

    def _restore_node_metadata(self, out: onnx.ModelProto) -> None:
        old = {n.name: n for n in self.source.graph.node if n.name}
        use_props = out.ir_version >= NODE_METADATA_IR
        for node in out.graph.node:
            if node.name in self._provenance:
                meta = self._provenance[node.name]
                node.doc_string = "; ".join(f"{k}={v}" for k, v in meta.items())
                if use_props:
                    for k, v in meta.items():
                        node.metadata_props.add(key=k, value=v)
            elif node.name in old:
                node.doc_string = old[node.name].doc_string
                if use_props:
                    node.metadata_props.extend(old[node.name].metadata_props)


class _StoredValues(LazyValues):  # type: ignore[misc]
    """Values of a store tensor (see weights.py): read from disk on each use."""

    def load(self) -> np.ndarray:
        """The tensor's values, read from the store."""
        return weights.to_array(self.tensor)


def check_rewritten(model: onnx.ModelProto) -> None:
    """onnx.checker on a rewrite's result: a failure is onnxcomp's bug (PassError)."""
    try:
        model_io.check_model(model, full=True)
    except Exception as exc:
        raise PassError(f"rewritten model fails onnx.checker: {exc}") from exc


def onnx_dtype(tensor: gs.Tensor) -> Any:
    """The numpy dtype of a tensor, or None when unknown."""
    return getattr(tensor, "dtype", None)


def attr_ints(node: gs.Node, name: str, default: Sequence[int]) -> list[int]:
    """An integer-list attribute of a node, with a default."""
    value = node.attrs.get(name)
    return list(default) if value is None else [int(v) for v in value]


def _contiguous(values: np.ndarray) -> np.ndarray:
    """A C-contiguous array of the same shape, scalars included.

    ``np.ascontiguousarray`` turns scalars into 1-element vectors, which ONNX Runtime's QDQ
    fusions do not take as per-tensor scales.
    """
    arr = np.asarray(values)
    return arr.copy(order="C") if arr.ndim == 0 or not arr.flags.c_contiguous else arr
