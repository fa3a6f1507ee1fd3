"""Executors (--jobs, Ray), the shared measurement lock, the latency cache under concurrency,
and optimize-many."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle

import numpy as np
import onnx
import pytest
from builders import conv_model
from click.testing import CliRunner

from onnxcomp import benchmark as bench
from onnxcomp import executor, timing
from onnxcomp.cli import main
from onnxcomp.errors import ConfigError
from onnxcomp.judge import Judge, load_metric
from onnxcomp.latency_cache import LatencyCache
from onnxcomp.timing import Timer


def _pid_and_lock(i):
    return i, os.getpid(), timing.shared_lock() is not None


def test_serial_and_processes_map_in_order():
    assert executor.Serial().map(_pid_and_lock, [3, 1, 2]) == [
        (3, os.getpid(), False), (1, os.getpid(), False), (2, os.getpid(), False)]
    out = executor.Processes(2).map(_pid_and_lock, list(range(6)))
    assert [i for i, _, _ in out] == list(range(6))
    assert all(pid != os.getpid() for _, pid, _ in out)  # ran in workers
    assert all(locked for _, _, locked in out)  # every worker times under the shared lock
    assert timing.shared_lock() is None  # the parent's lock is put back after the pool


def test_make_picks_the_executor():
    assert isinstance(executor.make("local", 1), executor.Serial)
    assert isinstance(executor.make("local", 3), executor.Processes)
    with pytest.raises(ConfigError, match="--executor"):
        executor.make("dask", 2)
    with pytest.raises(ConfigError, match="--jobs"):
        executor.Processes(0)


def test_a_judge_with_a_file_metric_travels_to_a_worker(tmp_path):
    path = tmp_path / "my_metric.py"
    path.write_text("def half(a, b):\n    return 0.5\n")
    func, name = load_metric(f"{path}:half")
    judge = pickle.loads(pickle.dumps(Judge(0.3, func, name)))
    assert judge.metric([np.zeros(1)], [np.zeros(1)]) == 0.5 and judge.score_threshold == 0.3


def _write_entries(args):
    path, start = args
    cache = LatencyCache(path, "cpu", 1)
    for k in range(start, start + 40):
        cache.put(f"k{k}", [float(k)])
        if k % 10 == 9:
            cache.save()  # many saves, interleaved with the other process's
    cache.save()
    return True


def test_concurrent_runs_sharing_a_latency_cache_lose_no_entry(tmp_path):
    path = tmp_path / "lat.json"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        assert pool.map(_write_entries, [(path, 0), (path, 1000)]) == [True, True]
    cache = LatencyCache(path, "cpu", 1)
    assert all(cache.get(f"k{k}") == [float(k)] for k in [*range(40), *range(1000, 1040)])
    assert not list(tmp_path.glob(".*.tmp"))  # no staging file left behind


def _no_timing(*args, **kwargs):
    raise AssertionError("timed although the latency cache has the measurement")


def test_whole_model_comparisons_replay_from_the_latency_cache(tmp_path):
    rng = np.random.default_rng(0)
    a = conv_model(rng.standard_normal([16, 8, 3, 3]).astype(np.float32), size=8)
    b = conv_model(rng.standard_normal([8, 8, 3, 3]).astype(np.float32), size=8)
    cfg = bench.BenchConfig(runs=5, warmup=1)
    first = Timer(timing.Modelled(lambda m: 2.0 if m is a else 1.0))
    first = first.with_cache(LatencyCache(tmp_path / "lat.json", "cpu", 1))
    measured = first.compare([a, b], cfg)
    first.save()
    again = Timer(_no_timing).with_cache_file(str(tmp_path / "lat.json"), "cpu", 1)
    replayed = again.compare([a, b], cfg)
    assert replayed.speedups[0].median == pytest.approx(measured.speedups[0].median)
    assert replayed.speedups[0].p90 == pytest.approx(measured.speedups[0].p90)
    assert replayed.models[1].median_ms == pytest.approx(1.0)


def _models(tmp_path, count=3):
    paths = []
    for i in range(count):
        w = np.random.default_rng(i).standard_normal([16, 8, 3, 3]).astype(np.float32)
        path = tmp_path / f"m{i}.onnx"
        onnx.save(conv_model(w, size=32, pads=[1, 1, 1, 1]), path)
        paths.append(path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(9).standard_normal([8, 8, 32, 32]).astype("f4"))
    return paths, calib


@pytest.mark.parametrize("how", [["--jobs", "2"], ["--executor", "ray", "--jobs", "2"]])
def test_optimize_many_compiles_every_model_in_one_command(tmp_path, how):
    paths, calib = _models(tmp_path)
    out, recipe = tmp_path / "out", tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold_bn"\n\n[[pass]]\nname = "svd"\nrank = 4\n')
    result = CliRunner().invoke(main, [str(a) for a in [
        "optimize-many", *paths, "-o", out, "--recipe", recipe, "--calib", calib,
        "--no-bench", *how]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for p in paths:
        onnx.checker.check_model(onnx.load(out / f"{p.stem}.onnx"))
        doc = json.loads((out / f"{p.stem}.report.json").read_text())
        assert doc["passes"] == ["fold_bn", "svd"] and doc["measured_on"]
        assert any(s["pass"] == "svd" and s["report"]["applied"] for s in doc["steps"])


def test_optimize_many_lists_a_bad_model_and_keeps_the_others(tmp_path):
    paths, calib = _models(tmp_path, 2)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(a) for a in [
        "optimize-many", paths[0], bad, paths[1], "-o", out, "--pass", "fold_bn",
        "--calib", calib, "--no-bench"]])
    assert result.exit_code == 1
    assert "1 of 3 models failed" in result.output and "bad.onnx" in result.output
    assert (out / "m0.onnx").exists() and (out / "m1.onnx").exists()
    assert not (out / "bad.onnx").exists()
