from __future__ import annotations

import json

import numpy as np
import pytest
from builders import calibration, conv_model

from onnxcomp import latency_cache
from onnxcomp.decompose import LowRankConfig
from onnxcomp.latency_cache import LatencyCache, structure_hash
from onnxcomp.passbase import InputError, RunContext
from onnxcomp.passes import REGISTRY
from onnxcomp.timing import Timer


def test_round_trip_keeps_other_machines(tmp_path, monkeypatch):
    path = tmp_path / "lat.json"
    monkeypatch.setattr(latency_cache, "machine_key", lambda p, t: "machine A")
    a = LatencyCache(path, "cpu", 1)
    a.put("k", [1.0, 2.0])
    a.save()
    monkeypatch.setattr(latency_cache, "machine_key", lambda p, t: "machine B")
    b = LatencyCache(path, "cpu", 1)
    assert b.get("k") is None  # measured elsewhere: never trusted
    b.put("k", [3.0, 4.0])
    b.save()
    monkeypatch.setattr(latency_cache, "machine_key", lambda p, t: "machine A")
    again = LatencyCache(path, "cpu", 1)
    assert again.get("k") == [1.0, 2.0] and again.stats()["hits"] == 1
    assert set(json.loads(path.read_text())["machines"]) == {"machine A", "machine B"}


def test_nothing_measured_writes_nothing(tmp_path):
    LatencyCache(tmp_path / "lat.json", "cpu", 1).save()
    assert not (tmp_path / "lat.json").exists()


@pytest.mark.parametrize("text, needle", [
    ("{oops", "cannot be read"),
    ('{"format": "something else", "machines": {}}', "not an onnxcomp latency cache"),
    ('{"format": "onnxcomp-latency-cache", "version": 7, "machines": {}}', "version 7"),
])
def test_bad_files_are_input_errors(tmp_path, text, needle):
    path = tmp_path / "lat.json"
    path.write_text(text)
    with pytest.raises(InputError, match=needle):
        LatencyCache(path, "cpu", 1)


def test_structure_hash_ignores_weight_values_only():
    w = np.random.default_rng(0).standard_normal([8, 4, 3, 3]).astype(np.float32)
    base = structure_hash(conv_model(w, pads=[1, 1, 1, 1]))
    assert structure_hash(conv_model(w * 2, pads=[1, 1, 1, 1])) == base
    assert structure_hash(conv_model(w, pads=[0, 0, 0, 0])) != base
    assert structure_hash(conv_model(w[:4], pads=[1, 1, 1, 1])) != base


def test_second_compile_replays_the_first(tmp_path):
    w = np.random.default_rng(1).standard_normal([64, 64, 3, 3]).astype(np.float32)
    model = conv_model(w, size=16, batch="N", pads=[1, 1, 1, 1])
    calib = calibration(model, n=4, batch=4)
    config = LowRankConfig(min_macs=0, bench_runs=5, latency_cache=str(tmp_path / "lat.json"))
    svd = REGISTRY["svd"]
    first = svd(model, config, calib)
    stats = first.report.metrics["latency_cache"]
    assert stats["measured"] > 0 and (tmp_path / "lat.json").exists()

    def no_timing(*args, **kwargs):
        raise AssertionError("measured although the cache has it")

    # a fresh process: an empty memo, and a timer that must not time
    second = svd(model, config, calib, context=RunContext(timer=Timer(no_timing)))
    assert second.report.metrics["latency_cache"]["measured"] == 0
    assert second.report.metrics["latency_cache"]["hits"] >= stats["measured"]
    assert second.model.SerializeToString() == first.model.SerializeToString()
