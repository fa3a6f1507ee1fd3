"""The user's terms: --score-threshold, --metric module:function, --labels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import calibration, make_model, tensor
from click.testing import CliRunner
from onnx import helper

from onnxcomp import fidelity
from onnxcomp.cli import main
from onnxcomp.errors import InputError
from onnxcomp.judge import Judge, load_labels, load_metric

METRICS = '''
import numpy as np

def close(ref, got):
    return float(np.mean(np.isclose(ref[0], got[0], atol=0.05)))

def boom(ref, got):
    raise RuntimeError("no good")

def too_big(ref, got):
    return 2.0
'''


def _classifier():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="fl"),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="fc")]
    return make_model(nodes, [tensor("x", [1, 32, 32])], [tensor("y", [1, 3])],
                      {"W": rng.standard_normal([1024, 3]).astype(np.float32)})


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text(METRICS)
    return path


def test_a_metric_from_a_file_scores_every_batch(metrics_file):
    func, name = load_metric(f"{metrics_file}:close")
    model = _classifier()
    calib = calibration(model, n=3, batch=2)
    judge = Judge(metric=func, metric_name=name)
    ref = fidelity.Reference.of(model, calib, judge)
    same = ref.compare(model)
    assert same.metric_score == 1.0 and fidelity.bound(same)[1] in ("metric", "decisions")
    outs = fidelity.run(model, calib)
    moved = ref.compare_outputs([outs[0] + 1.0])
    assert moved.metric_score == 0.0 and fidelity.bound(moved) == (1.0, "metric")


@pytest.mark.parametrize("func, needle", [("boom", "raised RuntimeError: no good"),
                                          ("too_big", "outside [0, 1]")])
def test_a_bad_metric_is_a_one_line_error_naming_it(metrics_file, func, needle):
    metric, name = load_metric(f"{metrics_file}:{func}")
    model = _classifier()
    calib = calibration(model, n=2, batch=2)
    ref = fidelity.Reference.of(model, calib, Judge(metric=metric, metric_name=name))
    with pytest.raises(InputError, match=func) as err:
        ref.compare(model)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["nocolon", "no_such_module_xyz:f", "json:no_such_function"])
def test_metric_specs_that_do_not_load(spec):
    with pytest.raises(InputError, match="--metric"):
        load_metric(spec)


def test_labels_bound_the_labelled_accuracy(tmp_path):
    model = _classifier()
    calib = calibration(model, n=2, batch=4)
    outs = fidelity.run(model, calib)[0]
    truth = outs.argmax(axis=1)
    (tmp_path / "l.json").write_text(json.dumps(truth.tolist()))
    np.save(tmp_path / "l.npy", truth)
    labels = load_labels(tmp_path / "l.json")
    assert (load_labels(tmp_path / "l.npy") == labels).all()
    ref = fidelity.Reference.of(model, calib, Judge(labels=labels))
    wrong = outs.copy()
    wrong[np.arange(len(truth)), truth] -= 100  # every top-1 moves
    fid = ref.compare_outputs([wrong])
    assert fid.label_accuracy == (1.0, 0.0)
    assert fidelity.bound(fid)[0] == 1.0
    with pytest.raises(InputError, match="labels"):
        fidelity.Reference.of(model, calibration(model, n=1, batch=4),
                              Judge(labels=labels))
    (tmp_path / "bad.json").write_text(json.dumps([[1, 2]]))
    with pytest.raises(InputError, match="integer classes"):
        load_labels(tmp_path / "bad.json")


def test_cli_metric_and_labels_end_to_end(tmp_path, metrics_file):
    model = _classifier()
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal([8, 32, 32]).astype("f4")
    np.savez(tmp_path / "c.npz", x=x)
    w = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer)
    (tmp_path / "l.json").write_text(json.dumps((x.reshape(8, 1024) @ w).argmax(1).tolist()))
    runner = CliRunner()
    common = ["optimize", path, "--pass", "quantize", "--mode", "weight", "--calib",
              tmp_path / "c.npz", "--no-bench", "--labels", tmp_path / "l.json"]
    ok = runner.invoke(main, [str(a) for a in [
        *common, "-o", tmp_path / "o.onnx", "--metric", f"{metrics_file}:close",
        "--report", tmp_path / "r.json"]], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    fid = json.loads((tmp_path / "r.json").read_text())["fidelity_vs_original"]
    assert 0.0 <= fid["metric_score"] <= 1.0 and fid["label_accuracy"][0] == 1.0
    bad = runner.invoke(main, [str(a) for a in [
        *common, "-o", tmp_path / "b.onnx", "--metric", f"{metrics_file}:boom"]])
    assert bad.exit_code == 1 and "boom" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "b.onnx").exists()
