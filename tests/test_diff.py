"""onnxcomp diff on PP-OCRv4 det: every rewritten layer listed with its origin, as the compile
report says; provenance and the run recorded in the output model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import onnxcomp  # noqa: E402
from onnxcomp import changes, provenance  # noqa: E402
from onnxcomp.cli import main  # noqa: E402
from onnxcomp.model import load  # noqa: E402

pytestmark = pytest.mark.realmodel
SHAPES = {"x": (1, 3, 96, 160)}


@pytest.fixture(scope="module")
def det():
    from cases import CASES

    case = CASES["ppocrv4_det"]
    if not case.path.exists():
        pytest.fail(f"{case.path} is missing: run `python models/fetch_all.py` first")
    x = case.inputs("calib")["x"][:8, :, :96, :160]
    return load(case.path), {"x": np.ascontiguousarray(x)}


def _applied(report, name):
    return [c for s in report["steps"] if s["pass"] == name for c in s["report"]["applied"]]


def test_a_cp_run_lists_every_replaced_layer_with_its_error(det):
    model, calib = det
    out, report = onnxcomp.optimize(model, passes=["fold_bn", ("cp", {"rank": 0.5})],
                                    calib=calib)
    groups = changes.diff(model, out, SHAPES)
    applied = {c["node"]: c["error"] for c in _applied(report, "cp")}
    replaced = {g.origin: g for g in groups if "cp" in g.passes}
    assert applied and set(replaced) == set(applied)
    for name, g in replaced.items():
        assert g.kind == "replaced" and g.after and g.macs_after < g.macs_before
        assert g.error == pytest.approx(applied[name], rel=1e-4)
    folded = [g for g in groups if "fold_bn" in g.passes]
    assert folded and all(any(n.startswith("p2o.BatchNormalization") for n in g.before)
                          for g in folded)  # the BN it absorbed is listed with the conv


def test_a_prune_and_a_quantize_run_list_their_layers(det):
    model, calib = det
    pruned, report = onnxcomp.optimize(model, passes=[("prune_channels", {"ratio": 0.3})],
                                       calib=calib)
    changed = {g.origin for g in changes.diff(model, pruned, SHAPES)
               if "prune_channels" in g.passes}
    applied = _applied(report, "prune_channels")
    every = {n for c in applied for n in c["details"]["nodes"]}
    assert {c["node"] for c in applied} <= changed <= every | {c["node"] for c in applied}
    quantized, report = onnxcomp.optimize(model, passes=[("quantize", {"mode": "weight"})],
                                          calib=calib)
    groups = [g for g in changes.diff(model, quantized, SHAPES) if "quantize" in g.passes]
    assert {g.origin for g in groups} == {c["node"] for c in _applied(report, "quantize")}
    assert all(g.kind == "changed" and len(g.after) > 1 for g in groups)  # + its DQ nodes


def test_cli_diff_json_annotate_and_the_recorded_run(det, tmp_path):
    model, calib = det
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(model, a)
    out, report = onnxcomp.optimize(model, passes=["fold_bn", ("svd", {"rank": 0.5})],
                                    calib=calib, output=b)
    assert out.producer_name == "onnxcomp"
    meta = {p.key: p.value for p in out.metadata_props}
    assert [s["pass"] for s in json.loads(meta["onnxcomp.passes"])] == ["fold_bn", "svd"]
    assert json.loads(meta["onnxcomp.fidelity"])["measure"] == "scores"
    result = CliRunner().invoke(main, ["diff", str(a), str(b), "--json", "--shape",
                                       "x=1x3x96x160", "--annotate", str(tmp_path / "n.onnx")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    svd = {c["origin"] for c in doc["changes"] if "svd" in c["passes"]}
    assert svd == {c["node"] for c in _applied(report, "svd")}
    annotated = onnx.load(tmp_path / "n.onnx")
    onnx.checker.check_model(annotated)
    says = [n.doc_string for n in annotated.graph.node if n.doc_string.startswith("replaces")]
    assert len(says) >= len(svd)
    assert all(provenance.tags(n).get(provenance.PASS_KEY) == "svd"
               for n in out.graph.node if n.name.startswith("svd/"))
