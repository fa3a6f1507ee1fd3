"""What a compile changed: the nodes of B against A, grouped by the original node they came from.

Reads the provenance onnxcomp writes into its outputs (onnxcomp/provenance.py), so it needs no
report: a node of B created by a pass names its ``origin`` (the node of A it stands in for); a
node changed in place keeps its name and says how (``onnxcomp.changed``). Groups:

- ``replaced``: a node of A gone from B, with the nodes of B that stand in for it;
- ``changed``: a node of both, rewritten in place (weights, inputs, attributes), with the nodes
  a pass added for it (quantize's Q/DQ pairs) and the nodes of A it absorbed (a folded
  BatchNormalization, a Pad);
- ``removed``: a node of A gone from B that nothing stands in for (a no-op);
- ``added``: a node of B with no origin in A.

Each group has params and MACs before and after (the per-node costs of onnxcomp/cost.py, with
``shapes`` for symbolic dims) and the error the pass measured for it, when recorded.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import onnx

from onnxcomp import cost, provenance, serial


@dataclasses.dataclass
class Group(serial.Record):
    """One original node (or one node of B with no origin) and what became of it."""

    kind: str  # replaced, changed, removed, added
    origin: str
    op_type: str
    passes: list[str]
    before: list[str]  # nodes of A
    after: list[str]  # nodes of B
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    error: float | None = None
    what: str = ""


def diff(a: onnx.ModelProto, b: onnx.ModelProto,
         shapes: Mapping[str, Sequence[int]] | None = None) -> list[Group]:
    """The groups of what changed from ``a`` to ``b``, in ``a``'s node order, then additions."""
    nodes_a = {n.name: n for n in a.graph.node if n.name}
    nodes_b = {n.name: n for n in b.graph.node if n.name}
    tags_b = {n.name: provenance.tags(n) for n in b.graph.node if n.name}
    groups: dict[str, Group] = {}

    def group(origin: str, kind: str, op: str) -> Group:
        if origin not in groups:
            groups[origin] = Group(kind, origin, op, [], [origin] if origin in nodes_a else [],
                                   [origin] if kind == "changed" else [])
        return groups[origin]

    added: list[Group] = []
    # Unnamed nodes of A come back named (graph export names them): not additions.
    unnamed = Counter(n.op_type for n in a.graph.node if not n.name)
    for name, t in tags_b.items():
        origin = t.get(provenance.ORIGIN_KEY, "")
        if name in nodes_a:
            if provenance.CHANGED_KEY in t:
                g = group(name, "changed", nodes_b[name].op_type)
                g.what = t[provenance.CHANGED_KEY]
                g.passes += [p.split(":")[0] for p in g.what.split(",")]
            continue
        if origin in nodes_a:
            kind = "changed" if origin in nodes_b else "replaced"
            g = group(origin, kind, nodes_a[origin].op_type)
            g.after.append(name)
        elif provenance.PASS_KEY not in t and unnamed[nodes_b[name].op_type] > 0:
            unnamed[nodes_b[name].op_type] -= 1
            continue
        else:
            g = Group("added", name, nodes_b[name].op_type, [], [], [name])
            added.append(g)
        if provenance.PASS_KEY in t and t[provenance.PASS_KEY] not in g.passes:
            g.passes.append(t[provenance.PASS_KEY])
    # Nodes of A that are gone and that nothing stands in for: absorbed by the group that
    # reads their output (the rest of a fused pattern) or that produced their input (a folded
    # BN), else removed. Walked from the outputs back, so a whole fused chain finds its host.
    producer = {o: n.name for n in a.graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in a.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    inits_b = {t.name for t in b.graph.initializer}
    host_of = {name: name for name in groups}
    for name in reversed(list(nodes_a)):
        node = nodes_a[name]
        if name in nodes_b or name in groups:
            continue
        if node.op_type == "Constant" and all(o in inits_b for o in node.output):
            continue  # the same value, now an initializer
        hosts = [host_of[r] for o in node.output for r in readers.get(o, []) if r in host_of]
        source = producer.get(node.input[0]) if node.input else None
        host = hosts[0] if hosts else (source if source in groups else None)
        if host is not None:
            groups[host].before.append(name)
            host_of[name] = host
        else:
            groups[name] = Group("removed", name, node.op_type, [], [name], [])
            host_of[name] = name
    costs_a = cost.model_cost(a, shapes).by_name()
    costs_b = cost.model_cost(b, shapes).by_name()
    out = [groups[n] for n in nodes_a if n in groups] + added
    for g in out:
        g.params_before = sum(costs_a[n].params for n in g.before if n in costs_a)
        g.macs_before = sum(costs_a[n].macs for n in g.before if n in costs_a)
        g.params_after = sum(costs_b[n].params for n in g.after if n in costs_b)
        g.macs_after = sum(costs_b[n].macs for n in g.after if n in costs_b)
        errors = [float(tags_b[n][provenance.ERROR_KEY]) for n in g.after
                  if provenance.ERROR_KEY in tags_b.get(n, {})]
        g.error = max(errors) if errors else None
    return out


def annotate(b: onnx.ModelProto, groups: Sequence[Group]) -> onnx.ModelProto:
    """A copy of ``b`` whose nodes' doc_strings say what each one replaced or changed."""
    out = onnx.ModelProto()
    out.CopyFrom(b)
    says: dict[str, str] = {}
    for g in groups:
        for name in g.after:
            if g.kind == "replaced":
                says[name] = f"replaces {g.origin} ({g.op_type}) by {', '.join(g.passes)}"
            elif g.kind == "changed":
                extra = [n for n in g.before if n != g.origin]
                says[name] = (f"{g.origin} changed by {g.what or ', '.join(g.passes)}"
                              + (f"; absorbed {', '.join(extra)}" if extra else ""))
            else:
                says[name] = f"added by {', '.join(g.passes) or 'an unknown pass'}"
    for node in out.graph.node:
        if node.name in says:
            node.doc_string = says[node.name] + (f"\n{node.doc_string}" if node.doc_string
                                                 else "")
    return out


def summary(groups: Sequence[Group]) -> dict[str, Any]:
    """Counts per kind and the totals before and after."""
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    return {"groups": kinds,
            "params": [sum(g.params_before for g in groups), sum(g.params_after for g in groups)],
            "macs": [sum(g.macs_before for g in groups), sum(g.macs_after for g in groups)]}
