"""Layers int8 makes slower stay in float (onnxcomp/int8_speed.py, quantize --per-layer-speed)."""

from __future__ import annotations

import numpy as np
import onnx
from builders import make_model, tensor, uniform_calibration
from onnx import helper

from onnxcomp import int8_speed
from onnxcomp.passbase import RunContext, SkipReason
from onnxcomp.passes import REGISTRY
from onnxcomp.passes.quantize import QuantizeConfig
from onnxcomp.timing import Modelled, Timer

quantize = REGISTRY["quantize"]


def _two_convs() -> onnx.ModelProto:
    """x (1 channel) -> narrow -> Relu -> wide -> Relu -> y: the first is int8's slow case."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="narrow", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
             helper.make_node("Conv", ["ar", "Wb", "Bb"], ["b"], name="wide", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["y"], name="relu_b")]
    inits = {"Wa": rng.normal(0, 0.5, (16, 1, 3, 3)).astype(np.float32),
             "Ba": rng.normal(0, 0.1, 16).astype(np.float32),
             "Wb": rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32),
             "Bb": rng.normal(0, 0.1, 16).astype(np.float32)}
    return make_model(nodes, [tensor("x", ["N", 1, 12, 12])], [tensor("y", ["N", 16, 12, 12])],
                      inits, opset=17)


def _latency(int8_narrow: float, whole_gain: bool = True):
    """Modelled ms: a conv costs 1 in float; in int8 (weight from a DequantizeLinear) the
    one-channel conv costs ``int8_narrow`` and the wide one 0.5; a Q or DQ costs 0.05.
    With ``whole_gain`` False every model of more than one conv costs the same."""
    def ms(model: onnx.ModelProto) -> float:
        producers = {o: n for n in model.graph.node for o in n.output}
        weights = {t.name: t for t in model.graph.initializer}
        total, convs = 0.0, 0
        for node in model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                total += 0.05 if node.input[0] not in weights else 0.0
            if node.op_type != "Conv":
                continue
            convs += 1
            dq = producers.get(node.input[1])
            w = weights[dq.input[0] if dq is not None else node.input[1]]
            if dq is None:
                total += 1.0
            else:
                total += int8_narrow if w.dims[1] == 1 else 0.5
        return 3.0 if convs > 1 and not whole_gain else total
    return ms


def _context(int8_narrow: float, whole_gain: bool = True) -> RunContext:
    return RunContext(timer=Timer(Modelled(_latency(int8_narrow, whole_gain))))


def _quantized_convs(model: onnx.ModelProto) -> set[str]:
    producers = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "Conv"
            and (p := producers.get(n.input[1])) is not None and p.op_type == "DequantizeLinear"}


def test_a_layer_int8_makes_slower_stays_in_float():
    model = _two_convs()
    calib = uniform_calibration([2, 1, 12, 12], 8)
    res = quantize(model, QuantizeConfig(max_drop=float("inf")), calib, _context(3.0))
    assert _quantized_convs(res.model) == {"wide"}
    skip = next(s for s in res.report.skipped if s.node == "narrow")
    assert skip.reason is SkipReason.NO_LATENCY_WIN
    assert "0.3" in skip.detail and "--no-per-layer-speed" in skip.detail
    assert res.report.metrics["left_in_float_for_speed"] == 1
    assert any(n.code == "per_layer_speed" and "left in float" in n
               for n in res.report.notes)
    # asked not to: every layer is quantized
    every = quantize(model, QuantizeConfig(max_drop=float("inf"), keep_fast=False), calib,
                     _context(3.0))
    assert _quantized_convs(every.model) == {"narrow", "wide"}


def test_a_layer_int8_speeds_up_is_quantized():
    model = _two_convs()
    calib = uniform_calibration([2, 1, 12, 12], 8)
    res = quantize(model, QuantizeConfig(max_drop=float("inf")), calib, _context(0.4))
    assert _quantized_convs(res.model) == {"narrow", "wide"}
    assert res.report.metrics["left_in_float_for_speed"] == 0


def test_screened_layers_stay_int8_when_the_whole_model_is_not_faster():
    # alone the narrow conv is slower in int8, but the whole model does not gain: quantized
    model = _two_convs()
    calib = uniform_calibration([2, 1, 12, 12], 8)
    res = quantize(model, QuantizeConfig(max_drop=float("inf")), calib,
                   _context(3.0, whole_gain=False))
    assert _quantized_convs(res.model) == {"narrow", "wide"}
    assert any(n.code == "per_layer_speed" and "quantized anyway" in n
               for n in res.report.notes)


def test_the_screen_is_remembered_per_shape():
    model = _two_convs()
    calib = uniform_calibration([2, 1, 12, 12], 8)
    bench = Modelled(_latency(3.0))
    ctx = RunContext(timer=Timer(bench))
    quantize(model, QuantizeConfig(max_drop=float("inf")), calib, ctx)
    first = bench.calls
    quantize(model, QuantizeConfig(max_drop=float("inf")), calib, ctx)
    # the second run times the whole model again (confirm, final speedup), not the layers
    assert bench.calls - first == first - 2


def test_layer_model_holds_the_layer_and_its_relu():
    model = _two_convs()
    built = int8_speed.layer_model(model, "wide", {"ar": (1, 16, 12, 12), "y": (1, 16, 12, 12)})
    assert built is not None
    micro, x, y = built
    assert (x, y) == ("ar", "y")
    assert [n.op_type for n in micro.graph.node] == ["Conv", "Relu", "Identity"]
    onnx.checker.check_model(micro, full_check=True)
    # a shape not known: not a layer to time alone
    assert int8_speed.layer_model(model, "narrow", {"x": (1, 1, 12, 12)}) is None


def test_faster_is_a_sign_test_beyond_noise():
    from onnxcomp.int8_speed import NOISE, faster

    rng = np.random.default_rng(0)
    # a real 8 % gain under +-15 % round-to-round noise: most, not 9 in 10, rounds gain
    noisy_gain = 1.08 * np.exp(rng.normal(0, 0.1, 80))
    assert np.mean(noisy_gain > 1) < 0.9 and faster(noisy_gain)
    # the same noise around no gain, and a gain within NOISE, are not faster
    assert not faster(np.exp(rng.normal(0, 0.1, 80)))
    assert not faster(np.full(80, 1.0 + NOISE / 2))
    # a median gain carried by a few rounds is not a win either
    few = np.concatenate([np.full(44, 0.99), np.full(36, 1.3)])
    assert not faster(few)
    assert not faster(np.array([]))
