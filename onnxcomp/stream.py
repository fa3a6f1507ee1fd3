"""Layer-wise calibration that streams activations forward once.

A pass that rewrites layers one after the other in graph order and refits each on the
activations of the already rewritten network (the asymmetric refit of Zhang et al. 2016, the
sequential scheme GPTQ and BRECQ use for quantization) needs, at every layer, that layer's input
in the *current* model. Running the whole current model for it costs one model run per layer
and sample: compile time grows as layers x samples x model time.

:class:`LayerStream` keeps, per calibration batch, the tensors at the frontier of what has been
computed so far, and computes a requested tensor by running only the segment of the current
model between the frontier and that tensor (a sub-model extracted by tensor names, one
ONNX Runtime session per segment). Every node runs once per sample over the whole rewrite,
so capture costs about one pass of the model per sample.

The contract with the caller: a tensor once computed keeps its value, so a rewrite may change
only nodes that have not run yet, i.e. nothing upstream of a tensor already handed out. Rewriting
layers in graph order, each after its own input was computed, keeps that (the rewritten layer
reads the stored input; its output was never computed).

Memory: stored tensors are released as soon as every node that reads them has run; what is
live at once is the frontier (a U-Net's skips, a residual's shortcut) for every calibration
sample. Past ``budget_bytes`` in memory, further tensors are written to a temporary folder and
read back memory-mapped, so the resident bound is ``budget_bytes`` plus one segment's inputs
and outputs for one batch.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxcomp import runtime
from onnxcomp.calibration import Calibration

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 2 * 2**30


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If / Loop / Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.g.node and [attr.g] or []) + list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                local.update(inner.output)
            for inner in g.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(n for n in _subgraph_inputs(inner) if n not in local)
    return names


def _reads(node: onnx.NodeProto) -> list[str]:
    return [n for n in node.input if n] + sorted(_subgraph_inputs(node))


class _Store:
    """Per-batch arrays by tensor name, in memory up to a budget, then spilled to disk."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.resident = 0
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.spilled: dict[str, list[Path]] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._files = 0
        self.peak = 0

    def __contains__(self, name: str) -> bool:
        return name in self.arrays or name in self.spilled

    def names(self) -> list[str]:
        return [*self.arrays, *self.spilled]

    def put(self, name: str, batches: list[np.ndarray]) -> None:
        size = sum(a.nbytes for a in batches)
        if self.resident + size <= self.budget:
            self.arrays[name] = batches
            self.resident += size
            self.peak = max(self.peak, self.resident)
            return
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxcomp-stream-")
            log.info("layer stream: over %d bytes in memory, spilling to %s", self.budget,
                     self._tmp.name)
        paths = []
        for a in batches:
            self._files += 1
            path = Path(self._tmp.name) / f"{self._files}.npy"
            np.save(path, a)
            paths.append(path)
        self.spilled[name] = paths

    def get(self, name: str, batch: int) -> np.ndarray:
        if name in self.arrays:
            return self.arrays[name][batch]
        return np.load(self.spilled[name][batch], mmap_mode="r")

    def add(self, name: str, offset: np.ndarray, axis: int) -> None:
        """Add ``offset`` (one value per index of ``axis``) to every batch of ``name``."""
        for i in range(len(self.arrays.get(name, self.spilled.get(name, [])))):
            value = self.get(name, i)
            shape = [1] * value.ndim
            shape[axis] = -1
            shifted = (value + offset.reshape(shape)).astype(value.dtype)
            if name in self.arrays:
                self.arrays[name][i] = shifted
            else:
                np.save(self.spilled[name][i], shifted)

    def drop(self, name: str) -> None:
        if name in self.arrays:
            self.resident -= sum(a.nbytes for a in self.arrays.pop(name))
        for path in self.spilled.pop(name, []):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.arrays.clear()
        self.spilled.clear()
        self.resident = 0
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class LayerStream:
    """Tensors of a model rewritten in graph order, each node run once per sample.

    ``batches(model, name)`` returns ``name``'s value on every calibration batch in ``model``,
    running only the nodes of ``model`` not yet run. Use it as a context manager (or call
    :meth:`close`) to free what is stored.
    """

    def __init__(self, calib: Calibration, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 threads: int | None = None, provider: str = "cpu") -> None:
        self.calib = calib
        self.threads = threads or runtime.compute_threads()
        self.provider = provider
        self._store = _Store(budget_bytes)
        self._ran: set[str] = set()  # outputs of nodes that have run
        self.nodes_run = 0
        self.segments = 0

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free every stored tensor (and the spill folder)."""
        self._store.close()

    @property
    def peak_bytes(self) -> int:
        """The most bytes held in memory at once."""
        return self._store.peak

    def batches(self, model: onnx.ModelProto, name: str) -> list[np.ndarray]:
        """``name`` on every calibration batch, in ``model`` as it is now."""
        graph = model.graph
        inputs = {i.name for i in graph.input}
        inits = {t.name for t in graph.initializer}
        if name in inputs and name not in inits:
            return [np.asarray(b[name]) for b in self.calib.iter_batches()]
        if name not in self._store:
            self._run_segment(model, name)
        return [np.asarray(self._store.get(name, i)) for i in range(self.calib.num_batches)]

    def shift(self, name: str, offset: np.ndarray, axis: int = 1) -> None:
        """Add a per-channel ``offset`` to the computed ``name``.

        The one rewrite of a node that has run that keeps the contract: a bias changed after
        its output was read (bias correction).
        """
        if name not in self._store:
            raise KeyError(f"{name} has not been computed")
        self._store.add(name, np.asarray(offset), axis)

    # ------------------------------------------------------------------ segments
    def _run_segment(self, model: onnx.ModelProto, name: str) -> None:
        graph = model.graph
        producer = {out: node for node in graph.node for out in node.output if out}
        inits = {t.name: t for t in graph.initializer}
        inputs = {i.name for i in graph.input} - set(inits)
        if name not in producer:
            raise KeyError(f"'{name}' is not produced by any node of the model")
        # Nodes needed, walking back from `name` to stored tensors, graph inputs, constants.
        needed: set[int] = set()
        index = {id(node): i for i, node in enumerate(graph.node)}
        stack = [name]
        seen: set[str] = set()
        while stack:
            t = stack.pop()
            if t in seen or t in self._store or t in inputs or t in inits:
                continue
            seen.add(t)
            node = producer.get(t)
            if node is None:
                raise KeyError(f"'{t}' has no producer, is not a graph input and not stored")
            i = index[id(node)]
            if i not in needed:
                needed.add(i)
                stack.extend(_reads(node))
        segment = [graph.node[i] for i in sorted(needed)]
        produced = {o for node in segment for o in node.output if o}
        feeds = sorted({t for node in segment for t in _reads(node)
                        if t not in produced and t not in inits})
        # Keep what a node outside the segment that has not run yet will read.
        later = {t for i, node in enumerate(graph.node) if i not in needed
                 and not (set(node.output) & self._ran) for t in _reads(node)}
        keep = [t for t in dict.fromkeys(o for node in segment for o in node.output)
                if t and (t == name or t in later)]
        dtypes = {t: self._store.get(t, 0).dtype for t in feeds if t in self._store}
        sub = self._segment_model(model, segment, feeds, keep, inits, dtypes)
        session = runtime.make_session(sub, self.provider, self.threads, optimize=False)
        results: dict[str, list[np.ndarray]] = {t: [] for t in keep}
        for b, batch in enumerate(self.calib.iter_batches()):
            feed = {t: (np.asarray(batch[t]) if t in inputs else self._store.get(t, b))
                    for t in feeds}
            for t, value in zip(keep, session.run(keep, feed), strict=True):
                results[t].append(value)
        for t in keep:
            self._store.put(t, results[t])
        self._ran.update(produced)
        self.nodes_run += len(segment)
        self.segments += 1
        # Release what nothing left to run reads.
        pending = {t for node in graph.node if not (set(node.output) & self._ran)
                   for t in _reads(node)}
        for t in self._store.names():
            if t not in pending and t != name:
                self._store.drop(t)

    @staticmethod
    def _segment_model(model: onnx.ModelProto, segment: Sequence[onnx.NodeProto],
                       feeds: Sequence[str], outputs: Sequence[str],
                       inits: dict[str, onnx.TensorProto], dtypes: dict[str, np.dtype[Any]]
                       ) -> onnx.ModelProto:
        types = {vi.name: vi for vi in [*model.graph.input, *model.graph.value_info,
                                        *model.graph.output]}
        used = {t for node in segment for t in _reads(node)}

        def info(t: str) -> onnx.ValueInfoProto:
            vi = types.get(t)
            if vi is not None and vi.type.WhichOneof("value"):
                out = onnx.ValueInfoProto()
                out.CopyFrom(vi)
                return out
            return onnx.ValueInfoProto(name=t)

        graph = helper.make_graph(
            list(segment), "segment", [_feed_info(types.get(t), t, dtypes.get(t)) for t in feeds],
            [info(t) for t in outputs], [inits[t] for t in sorted(used) if t in inits])
        sub = helper.make_model(graph, opset_imports=list(model.opset_import))
        sub.ir_version = model.ir_version
        sub.functions.extend(model.functions)
        return sub


def _feed_info(vi: onnx.ValueInfoProto | None, name: str, dtype: np.dtype[Any] | None
               ) -> onnx.ValueInfoProto:
    """A segment input: its element type (of the stored value when there is one), no shape."""
    elem: int
    if dtype is not None:
        elem = int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    elif vi is not None and vi.type.HasField("tensor_type"):
        elem = vi.type.tensor_type.elem_type
    else:
        raise KeyError(f"no type known for segment input '{name}'")
    return helper.make_tensor_value_info(name, elem, None)
