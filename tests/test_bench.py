from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import benchmark as bench
from onnxcomp.benchmark import BenchConfig, benchmark, compare_models, speedup, time_model
from onnxcomp.passbase import ConfigError, InputError

IR_VERSION = 8
OPSET = 17


def conv_model(
    output: str = "y", batch: int | str = "N", input_name: str = "x", channels: int = 4
) -> onnx.ModelProto:
    """x (batch, 3, 8, 8) -> Conv 3x3 -> Relu -> ``output``; seeded weights."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", [input_name, "W"], ["conv_out"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], [output]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, channels, 8, 8])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )
    onnx.checker.check_model(model)
    return model


class FakeRuns:
    """Replaces ``bench._run_once`` and ``bench._clock``: records calls, fakes latencies.

    A model is identified by its output name. Each call advances the fake clock by the next
    latency of that model (seconds, exact binary fractions so ratios come out exact).
    """

    def __init__(self, latencies: Mapping[str, Sequence[float]] | None = None) -> None:
        self.now = 0.0
        self.calls: list[str] = []
        self.latencies = {k: list(v) for k, v in (latencies or {}).items()}

    def clock(self) -> float:
        return self.now

    def run_once(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> None:
        name = session.get_outputs()[0].name
        self.calls.append(name)
        pending = self.latencies.get(name)
        self.now += pending.pop(0) if pending else 2.0**-10

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeRuns:
        monkeypatch.setattr(bench, "_run_once", self.run_once)
        monkeypatch.setattr(bench, "_clock", self.clock)
        return self


# ---------------------------------------------------------------------------- interleaving


def test_rounds_are_interleaved_and_rotated(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRuns().install(monkeypatch)
    models = [conv_model("a"), conv_model("b"), conv_model("c")]
    result = benchmark(models, BenchConfig(warmup=2, runs=4))
    warmup = ["a", "a", "b", "b", "c", "c"]
    rounds = ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert fake.calls == warmup + rounds
    assert result.rounds == 4
    assert [m.label for m in result.models] == ["model0", "model1", "model2"]


def test_ratios_are_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    ms = 2.0**-10  # one fake "millisecond", exact in binary
    # Drift: both models slow down together in rounds 2-4; A always takes twice as long as B.
    a = [2 * ms, 2 * ms, 8 * ms, 8 * ms, 8 * ms]
    b = [1 * ms, 1 * ms, 4 * ms, 4 * ms, 4 * ms]
    FakeRuns({"a": a, "b": b}).install(monkeypatch)
    result = benchmark(
        [conv_model("a"), conv_model("b")], BenchConfig(warmup=0, runs=5), labels=["A", "B"]
    )
    np.testing.assert_array_equal(result.models[0].latencies_ms, np.array(a) * 1e3)
    np.testing.assert_array_equal(result.speedups[0].ratios, np.full(5, 2.0))
    assert result.speedups[0].median == result.speedups[0].p10 == result.speedups[0].p90 == 2.0
    assert speedup(result, 1) == 2.0
    assert speedup(result, 0) == 1.0
    assert result.speedups[0].label == "B"
    with pytest.raises(InputError):
        speedup(result, 2)


def test_per_round_ratio_differs_from_ratio_of_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    ms = 2.0**-10
    a = [2 * ms, 2 * ms, 2 * ms, 8 * ms, 8 * ms]
    b = [1 * ms, 1 * ms, 4 * ms, 4 * ms, 4 * ms]
    FakeRuns({"a": a, "b": b}).install(monkeypatch)
    result = benchmark([conv_model("a"), conv_model("b")], BenchConfig(warmup=0, runs=5))
    assert result.models[0].median_ms / result.models[1].median_ms == 0.5
    assert speedup(result, 1) == 2.0


def test_max_seconds_stops_after_min_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeRuns({"a": [1.0] * 100}).install(monkeypatch)  # one fake second per run
    result = benchmark([conv_model("a")], BenchConfig(warmup=0, runs=50, max_seconds=0.5))
    assert result.rounds == bench.MIN_ROUNDS
    assert len(result.models[0].latencies_ms) == bench.MIN_ROUNDS


def test_compare_models_interleaves(monkeypatch: pytest.MonkeyPatch) -> None:
    ms = 2.0**-10
    fake = FakeRuns({"a": [3 * ms] * 5, "b": [1 * ms] * 5}).install(monkeypatch)
    assert compare_models(conv_model("a"), conv_model("b"), runs=4, warmup=1) == 3.0
    assert fake.calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]


# ---------------------------------------------------------------------------- real runs


def test_real_run_on_tiny_conv() -> None:
    models = [conv_model("y"), conv_model("y", channels=2)]
    result = benchmark(models, BenchConfig(warmup=1, runs=5, batch=2), labels=["big", "small"])
    assert result.rounds == 5
    for timing in result.models:
        assert timing.latencies_ms.shape == (5,)
        assert np.all(timing.latencies_ms > 0)
        assert timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert result.speedups[0].ratios.shape == (5,)
    assert speedup(result, 1) > 0
    data = json.loads(json.dumps(result.to_dict()))
    assert data["models"][1]["label"] == "small"
    assert data["config"]["batch"] == 2


def test_time_model_and_given_inputs() -> None:
    model = conv_model(batch=3)
    assert time_model(model, runs=3, warmup=1) > 0  # fixed batch 3 is picked up
    inputs = {"x": np.zeros((3, 3, 8, 8), np.float32)}
    assert time_model(model, inputs, runs=3, warmup=0) > 0


# ---------------------------------------------------------------------------- errors


def test_unavailable_provider_is_input_error() -> None:
    with pytest.raises(InputError, match="unknown provider"):
        benchmark([conv_model()], BenchConfig(provider="nope", runs=1, warmup=0))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match="cuda"):
            benchmark([conv_model()], BenchConfig(provider="cuda", runs=1, warmup=0))


def test_mismatched_input_names() -> None:
    with pytest.raises(InputError, match="differ"):
        benchmark([conv_model(), conv_model(input_name="z")], BenchConfig(runs=1, warmup=0))


def test_fixed_batch_mismatch() -> None:
    with pytest.raises(InputError, match="batch is fixed to 1"):
        benchmark([conv_model(batch=1)], BenchConfig(batch=4, runs=1, warmup=0))
    # The second model is checked too.
    with pytest.raises(InputError, match="model1: the model's batch is fixed to 2"):
        benchmark([conv_model(), conv_model(batch=2)], BenchConfig(runs=1, warmup=0))
    inputs = {"x": np.zeros((5, 3, 8, 8), np.float32)}
    with pytest.raises(InputError, match="batch is fixed to 2"):
        benchmark([conv_model(batch=2)], BenchConfig(runs=1, warmup=0), inputs)


def test_symbolic_non_batch_dim_and_missing_input() -> None:
    model = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(InputError, match="'x' dim 2 \\('H'\\)"):
        benchmark([model], BenchConfig(runs=1, warmup=0))
    with pytest.raises(InputError, match="no data for input 'x'"):
        benchmark([conv_model()], BenchConfig(runs=1, warmup=0), {"other": np.zeros(1)})


def test_labels_must_match_models() -> None:
    with pytest.raises(InputError):
        benchmark([conv_model()], BenchConfig(runs=1), labels=["a", "b"])
    with pytest.raises(InputError):
        benchmark([], BenchConfig(runs=1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"provider": ""},
        {"threads": 0},
        {"batch": 0},
        {"batch": 1.5},
        {"warmup": -1},
        {"runs": 0},
        {"runs": True},
        {"seed": -1},
        {"optimize": 1},
        {"max_seconds": 0},
        {"max_seconds": float("inf")},
        {"max_seconds": "1"},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="BenchConfig"):
        BenchConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_are_valid() -> None:
    config = BenchConfig(max_seconds=2.5)
    assert config.to_dict()["max_seconds"] == 2.5
    assert BenchConfig().optimize is True
