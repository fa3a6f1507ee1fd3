from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx
import pytest
from builders import conv_bn_model, make_model, random_feeds, run, tensor
from onnx import helper, numpy_helper

from onnxcomp.calibration import Calibration
from onnxcomp.model import copy_model
from onnxcomp.passbase import Change, PassConfig, PassError, PassResult, Report, RunContext
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.canonicalize import CanonicalizeConfig
from onnxcomp.passes.fold_bn import FoldBNConfig
from onnxcomp.pipeline import Step, run_pipeline
from onnxcomp.timing import Modelled, Timer


@dataclasses.dataclass(frozen=True)
class NoConfig(PassConfig):
    pass


def _calib(model: onnx.ModelProto, n: int = 3) -> Calibration:
    return Calibration([random_feeds(model, seed) for seed in range(n)], False, "test")


class ScaleWeights:
    """A fake pass that multiplies every initializer by ``factor``."""

    config_cls: ClassVar[type[PassConfig]] = NoConfig

    def __init__(self, factor: float, lossless: bool, name: str = "scale") -> None:
        self.factor = factor
        self.lossless = lossless
        self.name = name

    def __call__(self, model, config, calib=None, context=None):
        out = copy_model(model)
        for init in out.graph.initializer:
            arr = numpy_helper.to_array(init) * self.factor
            init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
        report = Report(self.name)
        report.apply(Change("all", "Conv", "scaled"))
        return PassResult(out, report)


class RenameOutput:
    name: ClassVar[str] = "rename"
    lossless: ClassVar[bool] = True
    config_cls: ClassVar[type[PassConfig]] = NoConfig

    def __call__(self, model, config, calib=None, context=None):
        out = copy_model(model)
        out.graph.node.append(helper.make_node("Identity", ["y"], ["y2"]))
        out.graph.output[0].name = "y2"
        return PassResult(out, Report(self.name))


class ReturnsInput:
    name: ClassVar[str] = "same"
    lossless: ClassVar[bool] = True
    config_cls: ClassVar[type[PassConfig]] = NoConfig

    def __call__(self, model, config, calib=None, context=None):
        return PassResult(model, Report(self.name))


def _model_with_noise():
    m = conv_bn_model()
    m.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_id"], name="id"))
    m.graph.node[1].input[0] = "x_id"
    onnx.checker.check_model(m)
    return m


def test_real_passes_end_to_end():
    model = _model_with_noise()
    before = model.SerializeToString()
    steps = [Step("canonicalize", CanonicalizeConfig()), Step("fold_bn", FoldBNConfig())]
    result = run_pipeline(model, steps, _calib(model))
    assert model.SerializeToString() == before
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]
    assert [s.name for s in result.steps] == ["canonicalize", "fold_bn"]
    assert result.fidelity.rel_l2 < 1e-6
    assert result.steps[1].report.to_dict()["totals"]["applied"] == 1


def test_lossless_pass_that_changes_outputs_is_an_error():
    model = conv_bn_model()
    registry = {"scale": ScaleWeights(1.01, lossless=True)}
    with pytest.raises(PassError, match="lossless pass 'scale' changed the outputs"):
        run_pipeline(model, [Step("scale", NoConfig())], _calib(model), registry)


def test_lossy_pass_error_is_measured_and_reported():
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
        [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 3, 4, 4])],
        {"W": np.random.default_rng(0).standard_normal([3, 2, 1, 1]).astype(np.float32)},
    )
    registry = {"scale": ScaleWeights(1.05, lossless=False)}
    calib = _calib(model)
    result = run_pipeline(model, [Step("scale", NoConfig())], calib, registry)
    # Our own measurement: a linear model scaled by 1.05 has relative error exactly 0.05.
    ref = np.concatenate([run(model, b)[0] for b in calib.batches])
    got = np.concatenate([run(result.model, b)[0] for b in calib.batches])
    own = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert own == pytest.approx(0.05, rel=1e-4)
    assert result.steps[0].fidelity.rel_l2 == pytest.approx(own, rel=1e-6)
    assert result.steps[0].report.metrics["rel_l2_error"] == pytest.approx(own, rel=1e-6)
    assert result.fidelity.rel_l2 == pytest.approx(own, rel=1e-6)


@pytest.mark.parametrize(("factor", "kept"), [(1.05, 1.0), (-1.0, 0.0)])
def test_final_fidelity_counts_kept_decisions(factor, kept):
    rng = np.random.default_rng(1)
    model = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")],
                       [tensor("x", ["N", 4])], [tensor("y", ["N", 3])],
                       {"W": rng.standard_normal([4, 3]).astype(np.float32)})
    registry = {"scale": ScaleWeights(factor, lossless=False)}
    result = run_pipeline(model, [Step("scale", NoConfig())], _calib(model), registry)
    # Scaling logits keeps every argmax; negating them turns each into the argmin.
    assert result.fidelity.decision_agreement == kept
    assert result.to_dict()["fidelity_vs_original"]["decision_agreement"] == kept


def test_interface_change_is_an_error():
    model = conv_bn_model()
    with pytest.raises(PassError, match="graph outputs changed"):
        run_pipeline(model, [Step("rename", NoConfig())], _calib(model),
                     {"rename": RenameOutput()})


def test_returning_the_input_object_is_an_error():
    model = conv_bn_model()
    with pytest.raises(PassError, match="returned its input model"):
        run_pipeline(model, [Step("same", NoConfig())], _calib(model), {"same": ReturnsInput()})


def test_registry_names_match_files():
    for key, p in REGISTRY.items():
        assert p.name == key
        assert type(p).__module__ == f"onnxcomp.passes.{key}"
        assert dataclasses.is_dataclass(p.config_cls)


@dataclasses.dataclass(frozen=True)
class TargetConfig(PassConfig):
    target_speedup: float | None = None
    latency_check: bool = True
    target_macs: float | None = None


class RecordTarget:
    """A fake lossy pass that records the target it was given and changes nothing."""

    name: ClassVar[str] = "record"
    lossless: ClassVar[bool] = False
    config_cls: ClassVar[type[PassConfig]] = TargetConfig

    def __init__(self) -> None:
        self.seen: list[float | None] = []
        self.macs_seen: list[float | None] = []

    def __call__(self, model, config, calib=None, context=None):
        self.seen.append(config.target_speedup)
        self.macs_seen.append(config.target_macs)
        return PassResult(copy_model(model), Report(self.name))


def _target_run(so_far: float, first_changes: bool, target: float = 2.0):
    """A pipeline whose timer says the earlier steps measured ``so_far``; (record, result,
    how many measurements the pipeline took)."""
    model = conv_bn_model()
    modelled = Modelled(lambda m: so_far if m is model else 1.0)
    record = RecordTarget()
    registry = {"scale": ScaleWeights(1.0, lossless=True),
                "record": record}
    steps = [Step("record", TargetConfig(target))]
    if first_changes:
        steps.insert(0, Step("scale", NoConfig()))
    result = run_pipeline(model, steps, _calib(model), registry,
                          context=RunContext(timer=Timer(modelled)))
    return record, result, modelled.calls


def test_target_is_for_the_whole_pipeline():
    record, result, timed = _target_run(so_far=1.6, first_changes=True)
    assert timed and record.seen == [pytest.approx(2.0 / 1.6)]
    assert result.timing["measurements"] == timed  # what the run's timer spent is reported
    report = result.steps[-1].report
    assert report.metrics["pipeline_speedup_before"] == 1.6
    assert report.notes[0].code == "pipeline_target"


def test_target_already_reached_skips_the_step():
    record, result, _ = _target_run(so_far=2.3, first_changes=True)
    assert record.seen == []
    assert result.steps[-1].report.notes[0].code == "pipeline_target_reached"
    assert not result.steps[-1].report.applied


def test_target_untouched_without_earlier_changes():
    record, _, timed = _target_run(so_far=1.6, first_changes=False)
    assert record.seen == [2.0] and not timed


def test_target_untouched_when_earlier_passes_gave_no_speed():
    record, result, _ = _target_run(so_far=0.97, first_changes=True)
    assert record.seen == [2.0]
    assert "pipeline_speedup_before" not in result.steps[-1].report.metrics


def _halved_run(monkeypatch, config):
    import types

    from onnxcomp import pipeline

    def fake_cost(model, shapes=None):
        halved = any(p.key == "halved" for p in model.metadata_props)
        return types.SimpleNamespace(macs=50 if halved else 100)

    class Halve(ScaleWeights):
        def __call__(self, model, config, calib=None, context=None):
            result = super().__call__(model, config, calib)
            result.model.metadata_props.add(key="halved", value="1")
            return result

    monkeypatch.setattr(pipeline.cost, "model_cost", fake_cost)
    record = RecordTarget()
    model = conv_bn_model()
    registry = {"halve": Halve(1.0, lossless=True), "record": record}
    steps = [Step("halve", NoConfig()), Step("record", config)]
    return record, run_pipeline(model, steps, _calib(model), registry)


def test_mac_targets_without_latency_measurements(monkeypatch):
    """With latency checks off, the earlier passes' share is read from the MACs."""
    record, result = _halved_run(monkeypatch, TargetConfig(3.0, latency_check=False))
    assert record.seen == [pytest.approx(1.5)]
    assert result.steps[-1].report.notes[0].code == "pipeline_target"


def test_a_reached_target_is_dropped_the_other_kept(monkeypatch):
    config = TargetConfig(1.5, latency_check=False, target_macs=0.25)
    record, result = _halved_run(monkeypatch, config)
    assert record.seen == [None] and record.macs_seen == [pytest.approx(0.5)]
    assert result.steps[-1].config.target_macs == pytest.approx(0.5)
