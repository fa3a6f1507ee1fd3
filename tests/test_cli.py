from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from builders import conv_bn_model, make_model, op_count, tensor
from click.testing import CliRunner
from onnx import TensorProto, helper

from onnxcomp.cli import main

FOLD = ["--pass", "canonicalize", "--pass", "fold_bn"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(c_out=8, size=16, batch="N"), path)
    return path


def _invoke(runner, args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def _assert_clean_failure(result, code, needle, tmp_path, expect_files):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert any(needle in ln for ln in lines), result.output
    assert sorted(os.listdir(tmp_path)) == sorted(expect_files)


def test_optimize_end_to_end(runner, model_file, tmp_path):
    before = model_file.read_bytes()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal([6, 3, 16, 16]).astype("f4"))
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    result = _invoke(runner, ["optimize", model_file, "-o", out, *FOLD, "--calib", calib,
                              "--report", report, "--runs", 5])
    assert result.exit_code == 0, result.output
    assert "fidelity vs original" in result.output
    assert model_file.read_bytes() == before
    optimized = onnx.load(out)
    assert op_count(optimized, "BatchNormalization") == 0
    doc = json.loads(report.read_text())
    assert doc["calibration"]["samples"] == 6
    assert doc["fidelity_vs_original"]["rel_l2"] < 1e-5
    assert [s["pass"] for s in doc["steps"]] == ["canonicalize", "fold_bn"]
    assert doc["steps"][1]["report"]["applied"][0]["node"] == "bn"
    assert doc["latency"]["speedup"] > 0


def test_optimize_without_calib_warns(runner, model_file, tmp_path):
    result = _invoke(runner, ["optimize", model_file, "-o", tmp_path / "o.onnx", *FOLD,
                              "--no-bench"])
    assert result.exit_code == 0, result.output
    assert "synthetic" in result.output


def test_inspect_json(runner, model_file):
    result = _invoke(runner, ["inspect", model_file, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["macs"] == 8 * 16 * 16 * 3 * 9
    assert doc["params"] == 8 * 3 * 9 + 8 + 4 * 8


def test_bench_json(runner, model_file, tmp_path):
    result = _invoke(runner, ["bench", model_file, model_file, "--runs", 5, "--warmup", 1,
                              "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert len(doc["models"]) == 2 and doc["speedups"][0]["median"] > 0


def test_bench_unavailable_provider(runner, model_file):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the unavailable-provider error cannot happen")
    result = _invoke(runner, ["bench", model_file, "--provider", "cuda", "--runs", 3])
    assert result.exit_code == 1
    assert "provider 'cuda' is not available" in result.output


# ----------------------------------------------------------------------- bad input


def test_missing_file(runner, tmp_path):
    result = _invoke(runner, ["optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx",
                              *FOLD])
    _assert_clean_failure(result, 1, "no such file", tmp_path, [])


def test_directory(runner, tmp_path):
    (tmp_path / "d").mkdir()
    result = _invoke(runner, ["optimize", tmp_path / "d", "-o", tmp_path / "o.onnx", *FOLD])
    _assert_clean_failure(result, 1, "is a directory", tmp_path, ["d"])


def test_truncated(runner, tmp_path):
    p = tmp_path / "t.onnx"
    data = conv_bn_model().SerializeToString()
    p.write_bytes(data[:100])
    result = _invoke(runner, ["optimize", p, "-o", tmp_path / "o.onnx", *FOLD])
    _assert_clean_failure(result, 1, "ONNX model", tmp_path, ["t.onnx"])
    assert p.read_bytes() == data[:100]


def test_not_onnx(runner, tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("just some text\n")
    result = _invoke(runner, ["inspect", p])
    _assert_clean_failure(result, 1, "ONNX model", tmp_path, ["notes.onnx"])


def test_unknown_pass(runner, model_file, tmp_path):
    result = _invoke(runner, ["optimize", model_file, "-o", tmp_path / "o.onnx",
                              "--pass", "magic"])
    _assert_clean_failure(result, 2, "unknown pass 'magic'", tmp_path, ["in.onnx"])


def test_output_is_input(runner, model_file, tmp_path):
    before = model_file.read_bytes()
    result = _invoke(runner, ["optimize", model_file, "-o", model_file, *FOLD])
    _assert_clean_failure(result, 2, "never overwrites its input", tmp_path, ["in.onnx"])
    assert model_file.read_bytes() == before


def test_model_without_conv_is_a_noop(runner, tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                   [tensor("x", [1, 4])], [tensor("y", [1, 4])])
    src = tmp_path / "relu.onnx"
    onnx.save(m, src)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    result = _invoke(runner, ["optimize", src, "-o", out, *FOLD, "--report", rep, "--no-bench"])
    assert result.exit_code == 0, result.output
    doc = json.loads(rep.read_text())
    assert all(not s["report"]["applied"] for s in doc["steps"])
    assert "nothing_to_do" in [n["code"] for n in doc["steps"][1]["report"]["notes"]]
    assert onnx.load(out).graph.node[0].op_type == "Relu"


def test_already_quantized_left_alone(runner, tmp_path):
    nodes = [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="qconv")]
    m = make_model(nodes, [tensor("x", [1, 1, 4, 4], TensorProto.UINT8)],
                   [tensor("y", [1, 1, 2, 2], TensorProto.INT32)],
                   {"w": np.ones([1, 1, 3, 3], dtype=np.uint8)})
    src = tmp_path / "q.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "c.npz", x=np.ones([2, 1, 4, 4], dtype=np.uint8))
    rep = tmp_path / "r.json"
    result = _invoke(runner, ["optimize", src, "-o", tmp_path / "o.onnx", *FOLD, "--report", rep,
                              "--calib", tmp_path / "c.npz", "--no-bench"])
    assert result.exit_code == 0, result.output
    doc = json.loads(rep.read_text())
    skips = doc["steps"][1]["report"]["skipped"]
    assert [(s["node"], s["reason"]) for s in skips] == [("qconv", "QUANTIZED")]


def test_dynamic_dims_need_calib(runner, tmp_path):
    m = conv_bn_model()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    del m.graph.output[0].type.tensor_type.shape.dim[:]
    src = tmp_path / "dyn.onnx"
    onnx.save(m, src)
    result = _invoke(runner, ["optimize", src, "-o", tmp_path / "o.onnx", *FOLD])
    _assert_clean_failure(result, 1, "dynamic dim", tmp_path, ["dyn.onnx"])


@pytest.mark.parametrize(("arrays", "needle"), [
    ({"wrong_name": np.zeros([2, 3, 16, 16], "f4")}, "wrong_name"),
    ({"x": np.zeros([2, 3, 15, 16], "f4")}, "shape"),
])
def test_mismatched_calibration(runner, model_file, tmp_path, arrays, needle):
    calib = tmp_path / "c.npz"
    np.savez(calib, **arrays)
    result = _invoke(runner, ["optimize", model_file, "-o", tmp_path / "o.onnx", *FOLD,
                              "--calib", calib])
    _assert_clean_failure(result, 1, needle, tmp_path, ["in.onnx", "c.npz"])


@pytest.fixture
def conv_file(tmp_path):
    from builders import conv_model, cp_kernel

    path = tmp_path / "conv.onnx"
    w = cp_kernel(48, 32, 3, 3, rank=12) + 0.01 * np.random.default_rng(1).standard_normal(
        [48, 32, 3, 3]).astype(np.float32)
    onnx.save(conv_model(w, size=32, pads=[1, 1, 1, 1]), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal([4, 32, 32, 32]).astype("f4"))
    return path, calib


@pytest.mark.parametrize(("rank", "needle"), [
    ("0", "--rank must be >= 1"), ("-2", "--rank"), ("1.5", "fraction must be in (0, 1)"),
    ("abc", "'auto', an integer or a fraction"),
])
def test_rank_out_of_range(runner, conv_file, tmp_path, rank, needle):
    src, calib = conv_file
    result = _invoke(runner, ["optimize", src, "-o", tmp_path / "o.onnx", "--pass", "cp",
                              "--rank", rank, "--calib", calib])
    _assert_clean_failure(result, 2, needle, tmp_path, ["conv.onnx", "calib.npz"])


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_min_agreement_out_of_range(runner, conv_file, tmp_path, value):
    src, calib = conv_file
    result = _invoke(runner, ["optimize", src, "-o", tmp_path / "o.onnx", "--pass", "cp",
                              "--min-agreement", value, "--calib", calib])
    _assert_clean_failure(result, 2, "--min-agreement", tmp_path, ["conv.onnx", "calib.npz"])


def test_rank_auto_without_calib_warns_loudly(runner, conv_file, tmp_path):
    src, _ = conv_file
    out = tmp_path / "o.onnx"
    result = _invoke(runner, ["optimize", src, "-o", out, "--pass", "cp", "--rank", "auto",
                              "--target-macs", "0.7", "--no-latency-check", "--no-bench"])
    assert result.exit_code == 0, result.output
    assert "ranks are chosen from weights alone" in result.output
    assert out.exists()


def test_unreachable_target_warns_and_exits_zero(runner, conv_file, tmp_path):
    src, calib = conv_file
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    result = _invoke(runner, ["optimize", src, "-o", out, "--pass", "cp", "--rank", "auto",
                              "--target-macs", "0.001", "--no-latency-check", "--calib", calib,
                              "--no-bench", "--report", report])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "cannot be met" in result.output
    doc = json.loads(report.read_text())
    step = doc["steps"][0]["report"]
    assert step["metrics"]["target_met"] is False
    assert [w["code"] for w in step["warnings"]] == ["target_not_met"]
    assert step["warnings"][0]["text"] in result.output.replace("\n", " ") or "cannot be met" \
        in step["warnings"][0]["text"]
    assert step["applied"]  # the best achievable is applied


@pytest.mark.parametrize(("args", "convs"), [
    (["--pass", "kernel_sharing", "--groups", "8"], 2),
    (["--pass", "kernel_sharing", "--groups", "8", "--no-weighted"], 2),
    (["--pass", "depthwise_separable", "--depth-multiplier", "2"], 2),
    (["--pass", "depthwise_separable", "--depth-multiplier", "1", "--share-groups", "8"], 3),
])
def test_sharing_passes_from_the_cli(runner, conv_file, tmp_path, args, convs):
    src, calib = conv_file
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    result = _invoke(runner, ["optimize", src, "-o", out, *args, "--no-latency-check",
                              "--calib", calib, "--no-bench", "--report", report])
    assert result.exit_code == 0, result.output
    assert op_count(onnx.load(out), "Conv") == convs
    applied = json.loads(report.read_text())["steps"][0]["report"]["applied"]
    assert applied[0]["details"]["weighted" if "kernel_sharing" in args else
                                  "depth_multiplier"] == (
        ("--no-weighted" not in args) if "kernel_sharing" in args else int(args[3]))


def test_bad_groups_is_a_usage_error(runner, conv_file, tmp_path):
    src, calib = conv_file
    result = _invoke(runner, ["optimize", src, "-o", tmp_path / "o.onnx", "--pass",
                              "kernel_sharing", "--groups", "0", "--calib", calib])
    _assert_clean_failure(result, 2, "--rank must be >= 1", tmp_path, ["conv.onnx", "calib.npz"])


def test_prune_channels_from_the_cli(runner, tmp_path):
    from test_prune_channels import Net

    net = Net()
    a = net.conv("x", 4, 16)
    a = net.op("Relu", [a])
    a = net.conv(a, 16, 6)
    src = tmp_path / "p.onnx"
    onnx.save(net.model(a, [6, 8, 8]), src)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal([8, 4, 8, 8]).astype("f4"))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    result = _invoke(runner, ["optimize", src, "-o", out, "--pass", "prune_channels",
                              "--ratio", "0.5", "--round-to", "4", "--criterion", "l1",
                              "--calib", calib, "--no-bench", "--report", report])
    assert result.exit_code == 0, result.output
    step = json.loads(report.read_text())["steps"][0]["report"]
    assert step["applied"][0]["what"] == "kept 8 of 16 channels"
    bad = _invoke(runner, ["optimize", src, "-o", tmp_path / "b.onnx", "--pass",
                           "prune_channels", "--ratio", "0.5", "--target-speedup", "2",
                           "--calib", calib])
    _assert_clean_failure(bad, 2, "not both", tmp_path, ["p.onnx", "c.npz", "o.onnx", "r.json"])


@pytest.mark.parametrize("args", [["--mode", "weight", "--bits", "8"],
                                  ["--mode", "kmeans", "--bits", "4"],
                                  ["--mode", "static", "--calibrator", "minmax"],
                                  ["--mode", "binary"],
                                  ["--calibrator", "minmax", "--max-drop", "0.05"]])
def test_quantize_from_the_cli(runner, conv_file, tmp_path, args):
    src, calib = conv_file
    out = tmp_path / "q.onnx"
    result = _invoke(runner, ["optimize", src, "-o", out, "--pass", "quantize", *args,
                              "--calib", calib, "--no-bench"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size < src.stat().st_size / 2.5


def test_quantize_entropy_on_too_few_samples_fails_cleanly(runner, conv_file, tmp_path):
    src, calib = conv_file  # 4 samples
    result = _invoke(runner, ["optimize", src, "-o", tmp_path / "q.onnx", "--pass", "quantize",
                              "--calibrator", "entropy", "--calib", calib])
    _assert_clean_failure(result, 1, "entropy calibrator needs at least 8", tmp_path,
                          ["conv.onnx", "calib.npz"])


def test_report_shows_realized_share_of_the_mac_cut(runner, tmp_path):
    from builders import conv_model

    w = np.random.default_rng(1).standard_normal([64, 64, 3, 3]).astype(np.float32)
    src = tmp_path / "in.onnx"
    onnx.save(conv_model(w, size=16, batch="N", pads=[1, 1, 1, 1]), src)
    rep = tmp_path / "r.json"
    result = _invoke(runner, ["optimize", src, "-o", tmp_path / "o.onnx", "--pass", "svd",
                              "--rank", "0.25", "--no-latency-check", "--runs", 5,
                              "--report", rep])
    assert result.exit_code == 0, result.output
    assert "realized (speedup / MAC cut)" in result.output
    doc = json.loads(rep.read_text())
    macs = doc["cost_before"]["macs"] / doc["cost_after"]["macs"]
    assert doc["realized"] == pytest.approx(doc["latency"]["speedup"] / macs)


def test_eval_reports_the_compile_measures_on_held_out_data(tmp_path):
    from builders import conv_model as _conv


    rng = np.random.default_rng(0)
    w = rng.standard_normal([10, 3, 3, 3]).astype(np.float32)
    original = _conv(w, size=8, batch="N")
    noisy = _conv(w + 0.3 * rng.standard_normal(w.shape).astype(np.float32), size=8, batch="N")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(original, a)
    onnx.save(noisy, b)
    np.savez(tmp_path / "held.npz", x=rng.standard_normal([12, 3, 8, 8]).astype("f4"))
    (tmp_path / "m.py").write_text("def half(a, b):\n    return 0.5\n")
    runner = CliRunner()
    out = runner.invoke(main, ["eval", str(a), str(b), "--data", str(tmp_path / "held.npz"),
                               "--metric", f"{tmp_path / 'm.py'}:half", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["samples"] == 12 and doc["fidelity"]["metric_score"] == 0.5
    assert doc["loss"] >= 0.5 and doc["loss_metric"] == "metric"
    same = runner.invoke(main, ["eval", str(a), str(a), "--data", str(tmp_path / "held.npz")])
    assert same.exit_code == 0 and "loss" in same.output
    (tmp_path / "bad.py").write_text("def bad(a, b):\n    return 7\n")
    bad = runner.invoke(main, ["eval", str(a), str(b), "--data", str(tmp_path / "held.npz"),
                               "--metric", f"{tmp_path / 'bad.py'}:bad"])
    assert bad.exit_code == 1 and "bad" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_optimize_help_groups_its_options_and_shows_examples():
    out = CliRunner().invoke(main, ["optimize", "--help"]).output
    for section in ("What to run:", "Data (--calib", "How fidelity is judged:",
                    "Where and how latency is measured:", "Options several passes share:",
                    "Options of quantize:", "Examples:"):
        assert section in out
    assert out.index("What to run:") < out.index("Options of quantize:")


def test_explain_and_passes_come_from_the_pass_itself():
    runner = CliRunner()
    out = runner.invoke(main, ["explain", "prune_channels"])
    assert out.exit_code == 0 and "prune_channels (lossy)" in out.output
    assert "--ratio" in out.output and "--criterion (reconstruction | l1 | l2" in out.output
    bad = runner.invoke(main, ["explain", "prune_chanels"])
    assert bad.exit_code == 2 and "did you mean 'prune_channels'" in bad.output
    listing = runner.invoke(main, ["passes"]).output
    assert listing.count("(lossy)") == sum(
        1 for line in listing.splitlines() if "(lossy)" in line) and "lossy)." not in listing


def test_view_serves_the_models_in_netron(tmp_path, monkeypatch):
    import socket
    import sys
    import urllib.request

    import netron

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(c_out=8, size=8), model)
    with socket.socket() as s:  # a free port
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    runner = CliRunner()
    out = runner.invoke(main, ["view", str(model), "--no-browse", "--no-wait", "--port",
                               str(port)])
    try:
        assert out.exit_code == 0, out.output
        assert f"http://localhost:{port}" in out.output
        with urllib.request.urlopen(f"http://localhost:{port}/", timeout=10) as page:
            assert page.status == 200 and b"netron" in page.read().lower()
    finally:
        netron.stop()
    monkeypatch.setitem(sys.modules, "netron", None)  # as if not installed
    missing = runner.invoke(main, ["view", str(model), "--no-wait"])
    assert missing.exit_code == 1 and "pip install 'onnxcomp[view]'" in missing.output


def test_an_unreleased_opset_is_the_users_fault_not_an_internal_error(tmp_path):
    """Reliability probe: opset 99 used to exit 3 with ORT's ValidateOpsetForDomain text."""
    model = conv_bn_model(c_out=8, size=8)
    model.opset_import[0].version = 99
    path = tmp_path / "op99.onnx"
    onnx.save(model, path)
    runner = CliRunner()
    for args in (["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--pass", "fold_bn"],
                 ["inspect", str(path)], ["bench", str(path), "--runs", "3"]):
        out = runner.invoke(main, args)
        assert out.exit_code == 1, out.output
        assert "opset 99 is newer than" in out.output and "internal error" not in out.output
    assert not (tmp_path / "o.onnx").exists()


def test_a_noisy_machine_is_measured_longer_and_said(runner, model_file, tmp_path,
                                                     monkeypatch):
    from onnxcomp import benchmark as bench_mod
    from onnxcomp.timing import Modelled

    # every round's ratio spread +-40 % around 1.0: wide, and straddling any target near 1
    noisy = Modelled(lambda m: 1.0, spread=0.4, rounds=20)
    monkeypatch.setattr(bench_mod, "benchmark", noisy)
    report = tmp_path / "r.json"
    result = _invoke(runner, ["optimize", model_file, "-o", tmp_path / "o.onnx", *FOLD,
                              "--report", report])
    assert result.exit_code == 0, result.output
    assert "timings on this machine were noisy" in result.output
    latency = json.loads(report.read_text())["latency"]
    assert latency["noisy"] and latency["repeats_for_noise"] == 2 and noisy.calls == 3
    assert latency["runs"] == 60  # 3 x 20 rounds pooled
