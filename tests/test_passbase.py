from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx
import pytest
from builders import conv_model
from onnx import helper

from onnxcomp import passbase as pb
from onnxcomp.errors import ConfigError, PassError
from onnxcomp.graph import Graph
from onnxcomp.model import copy_model
from onnxcomp.passbase import PassBase, PassConfig, PassResult, Report
from onnxcomp.passes import REGISTRY


@dataclasses.dataclass(frozen=True)
class _Cfg(PassConfig):
    mode: str = "copy"


class _Toy(PassBase):
    name: ClassVar[str] = "toy"
    lossless: ClassVar[bool] = True
    config_cls: ClassVar[type[PassConfig]] = _Cfg
    uses_calibration: ClassVar[bool] = True

    def call(self, model, config, calib, ctx):
        self.seen = calib
        if config.mode == "same":
            return PassResult(model, Report(self.name))
        out = copy_model(model)
        if config.mode == "untagged":
            out.graph.node.append(helper.make_node("Identity", ["y"], ["z"], name="stray"))
        if config.mode == "tagged":
            g = Graph(model)
            y = g.gs.outputs[0]
            z = g.variable("z", dtype=np.float32)
            g.add_node("Identity", [y], [z], pass_name="toy", origin="conv")
            out = g.export(check=False)
        return PassResult(out, Report(self.name))


def _model() -> onnx.ModelProto:
    return conv_model(np.ones([2, 3, 1, 1], np.float32), size=4)


def test_the_config_type_is_checked():
    @dataclasses.dataclass(frozen=True)
    class Other(PassConfig):
        pass

    with pytest.raises(ConfigError, match="toy needs a _Cfg"):
        _Toy()(_model(), Other())


def test_returning_the_input_object_is_a_bug():
    with pytest.raises(PassError, match="returned its input"):
        _Toy()(_model(), _Cfg(mode="same"))


def test_new_nodes_must_carry_the_pass_tag():
    with pytest.raises(PassError, match="without its provenance tag: stray"):
        _Toy()(_model(), _Cfg(mode="untagged"))
    _Toy()(_model(), _Cfg(mode="tagged"))  # Graph.add_node tags: no error


def test_synthetic_calibration_is_given_and_said():
    toy = _Toy()
    result = toy(_model(), _Cfg())
    assert toy.seen is not None and toy.seen.synthetic
    assert result.report.metrics["synthetic_calibration"] is True
    assert "synthetic_calibration" in result.report.codes


def test_every_registered_pass_stands_on_the_base():
    assert all(isinstance(p, PassBase) for p in REGISTRY.values())


def test_unnamed_input_nodes_that_come_back_named_are_not_new():
    from builders import conv_bn_model

    model = conv_bn_model()
    model.graph.node[2].name = ""  # the Relu
    result = REGISTRY["fold_bn"](model, REGISTRY["fold_bn"].config_cls())
    assert result.report.applied
    relu = next(n for n in result.model.graph.node if n.op_type == "Relu")
    assert relu.name  # named by the export, and no PassError


def test_notes_carry_codes_through_json_and_pickle():
    import json
    import pickle

    from onnxcomp.passbase import Note, Report

    report = Report("p")
    report.note("later", "second")
    report.note("sooner", "first", first=True)
    report.warn("loud", "a warning")
    assert [str(n) for n in report.notes] == ["first", "second"]
    assert report.codes == {"sooner", "later", "loud"}
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["notes"] == [{"code": "sooner", "text": "first"},
                            {"code": "later", "text": "second"}]
    again = pickle.loads(pickle.dumps(report.notes[0]))
    assert isinstance(again, Note) and again.code == "sooner" and again == "first"


def test_config_type_comes_from_the_class_line():
    """``class P(PassBase[PConfig], name=...)`` sets ``config_cls``, name and flags."""

    @dataclasses.dataclass(frozen=True)
    class PConfig(pb.PassConfig):
        pass

    class P(pb.PassBase[PConfig], name="p_test", lossless=True, calibration=True):
        pass

    assert P.config_cls is PConfig and P.name == "p_test" and P.lossless
    assert P.uses_calibration
    with pytest.raises(pb.ConfigError, match="needs a PConfig"):
        P()(onnx.ModelProto(), pb.PassConfig())
