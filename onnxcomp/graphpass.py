"""A pass that edits the graph in place: the base of the lossless clean-up passes.

:class:`GraphPass` does what every such pass did by hand: build a :class:`Graph`, start a
report, call :meth:`GraphPass.rewrite`, and return a copy of the input when nothing changed
(with a ``nothing_to_do`` note) or the edited graph otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from onnxcomp import passbase as pb
from onnxcomp.graph import Graph
from onnxcomp.model import copy_model
from onnxcomp.ops import FLOAT_TYPES

if TYPE_CHECKING:
    import onnx

    from onnxcomp.calibration import Calibration
    from onnxcomp.graph import Node


class GraphPass(pb.PassBase):
    """A pass written as :meth:`rewrite` of one :class:`Graph` (``graph.source`` is the input)."""

    # The nothing_to_do note of a run that changed nothing ("" for none).
    nothing: ClassVar[str] = "nothing changed"

    def call(self, model: onnx.ModelProto, config: pb.PassConfig, calib: Calibration | None,
             ctx: pb.RunContext) -> pb.PassResult:
        """Rewrite a :class:`Graph` of ``model``; a copy of ``model`` when nothing changed."""
        graph = Graph(model)
        report = pb.Report(self.name)
        self.rewrite(graph, config, calib, report)
        if report.applied:
            return pb.PassResult(graph.export(), report)
        if self.nothing and pb.NOTHING_TO_DO not in report.codes:
            report.note(pb.NOTHING_TO_DO, self.nothing)
        return pb.PassResult(copy_model(model), report)

    def rewrite(self, graph: Graph, config: pb.PassConfig, calib: Calibration | None,
                report: pb.Report) -> None:
        """Edit ``graph`` in place, recording every change and skip in ``report``."""
        raise NotImplementedError


def foldable_weights(graph: Graph, layer: Node, readers: list[Node], about: Node
                     ) -> pb.Skip | None:
    """None when a fold may rewrite ``layer``'s weight and bias, else a skip of ``about``.

    A fold needs them constant floats read only by ``readers``.
    """
    for i in (1, 2):
        t = graph.input(layer, i)
        if t is None:
            continue
        value = graph.const_value(t)
        why = (
            (pb.SkipReason.NOT_CONSTANT, f"{layer.name} input {t.name} is not constant")
            if value is None else
            (pb.SkipReason.UNSUPPORTED_DTYPE, str(value.dtype))
            if value.dtype.type not in FLOAT_TYPES else
            (pb.SkipReason.SHARED_WEIGHT, f"{t.name} is also read by another node")
            if graph.is_shared(t, readers) else None)
        if why is not None:
            return pb.Skip(about.name, about.op, *why)
    return None
