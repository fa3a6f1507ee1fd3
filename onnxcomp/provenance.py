"""Where each node of a rewritten model came from, recorded in the model for Netron and diff.

A node a pass **creates** carries ``onnxcomp.pass`` (the pass) and ``onnxcomp.origin`` (the
original node it stands in for); graph.py writes them. A node a pass **changes** in place
(a conv whose weights took a folded BatchNormalization, a pruned conv, a conv that took a Pad)
keeps its name and gets ``onnxcomp.changed`` (``pass:what``, comma-joined over passes).
:func:`record_errors` adds each replaced node's measured error (``onnxcomp.error``) from the
pass's report. The keys go in ``metadata_props`` where the IR version has them (10 on) and in
``doc_string`` always (``key=value; ...``), which every Netron version shows.

The model as a whole records the run (:func:`record_run`): ``producer_name`` "onnxcomp", and
metadata ``onnxcomp.version``, ``onnxcomp.passes`` (the passes and their options, JSON),
``onnxcomp.fidelity`` and, once measured, ``onnxcomp.speedup``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

PASS_KEY = "onnxcomp.pass"
ORIGIN_KEY = "onnxcomp.origin"
CHANGED_KEY = "onnxcomp.changed"
ERROR_KEY = "onnxcomp.error"
# NodeProto.metadata_props exists from IR version 10 on; older models get doc_string only.
NODE_METADATA_IR = 10


def tags(node: onnx.NodeProto) -> dict[str, str]:
    """A node's onnxcomp keys, from metadata_props and doc_string."""
    found = {p.key: p.value for p in node.metadata_props if p.key.startswith("onnxcomp.")}
    for part in node.doc_string.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.startswith("onnxcomp.") and key not in found:
            found[key] = value
    return found


def set_tag(model: onnx.ModelProto, node: onnx.NodeProto, key: str, value: str) -> None:
    """Set ``key`` on ``node`` in doc_string and, where the IR has them, metadata_props."""
    current = tags(node)
    current[key] = value
    kept = [p.strip() for p in node.doc_string.split(";")
            if p.strip() and not p.strip().startswith("onnxcomp.")]
    node.doc_string = "; ".join([*kept, *(f"{k}={v}" for k, v in current.items())])
    if model.ir_version >= NODE_METADATA_IR:
        props = [p for p in node.metadata_props if p.key != key]
        del node.metadata_props[:]
        node.metadata_props.extend(props)
        node.metadata_props.add(key=key, value=value)


def tag_changed(before: onnx.ModelProto, after: onnx.ModelProto, pass_name: str) -> list[str]:
    """Tag the nodes ``pass_name`` changed in place; return their names.

    Changed: same name, other inputs, attributes or constant inputs.
    """
    old = {n.name: n for n in before.graph.node if n.name}
    consts_before, consts_after = _constants(before), _constants(after)
    changed = []
    for node in after.graph.node:
        prior = old.get(node.name)
        if prior is None or tags(node).get(PASS_KEY) == pass_name:
            continue  # a new node: the pass tagged it
        what = []
        if prior.op_type != node.op_type or list(prior.input) != list(node.input):
            what.append("inputs")
        if [a.SerializeToString() for a in prior.attribute] != [
                a.SerializeToString() for a in node.attribute]:
            what.append("attributes")
        if any(name in consts_after and (name not in consts_before or not _same_values(
                consts_after[name], consts_before[name])) for name in node.input):
            what.append("weights")
        if what:
            earlier = tags(node).get(CHANGED_KEY, "")
            entry = f"{pass_name}:{'+'.join(what)}"
            set_tag(after, node, CHANGED_KEY, f"{earlier},{entry}" if earlier else entry)
            changed.append(node.name)
    return changed


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant nodes' tensors by name.

    canonicalize turns one into the other, which changes no value.
    """
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = value
    return found


def _same_values(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    """Same dtype, shape and values (the encoding, raw or typed fields, may differ)."""
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    try:
        return bool(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)))
    except Exception:  # data not loaded (external): compare what is stored
        return a.SerializeToString() == b.SerializeToString()


def record_errors(model: onnx.ModelProto, errors: Mapping[str, float]) -> None:
    """``onnxcomp.error`` on the nodes standing in for (or changed from) a rewritten node.

    ``errors``: original node name -> the error its rewrite measured.
    """
    for node in model.graph.node:
        t = tags(node)
        origin = t.get(ORIGIN_KEY) or (node.name if CHANGED_KEY in t else "")
        if origin in errors and ERROR_KEY not in t:
            set_tag(model, node, ERROR_KEY, f"{errors[origin]:.6g}")


def record_run(model: onnx.ModelProto, steps: Iterable[tuple[str, Mapping[str, Any]]],
               fidelity: Mapping[str, Any] | None = None,
               speedup: float | None = None) -> None:
    """Record the run in ``model``: producer, onnxcomp version, passes, fidelity, speedup."""
    from onnxcomp import __version__

    model.producer_name = "onnxcomp"
    model.producer_version = __version__
    entries = {"onnxcomp.version": __version__,
               "onnxcomp.passes": json.dumps([{"pass": name, **dict(options)}
                                              for name, options in steps], default=str)}
    if fidelity is not None:
        entries["onnxcomp.fidelity"] = json.dumps(dict(fidelity), default=str)
    if speedup is not None:
        entries["onnxcomp.speedup"] = f"{speedup:.3f}"
    for key, value in entries.items():
        set_model_meta(model, key, value)


def set_model_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set one model-level metadata entry (replacing an earlier value)."""
    props = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=key, value=value)
