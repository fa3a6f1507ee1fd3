"""The cheap part of the pass x model matrix (benchmarks/matrix.py --cheap) on the small real
models: no crash, valid outputs, every skip with a reason, no silent no-op."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from matrix import CHEAP, run_matrix  # noqa: E402

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


@pytest.mark.parametrize("model", ["mtcnn_pnet", "mtcnn_onet", "fashion_mnist_vgg"])
def test_every_pass_on_a_small_real_model(model):
    docs = run_matrix([model], CHEAP, log=False)
    bad = [f"{d['cell']}: {d['status']} {d.get('error', '')}" for d in docs if d["status"] != "ok"]
    assert not bad, "\n".join(bad)
    # the lossless cells keep the outputs (the passes verify it; held-out agrees)
    for d in docs:
        if d["pass"] in ("canonicalize", "fold_bn", "fold_affine", "equalize", "opset"):
            assert d["fidelity"]["rel_l2"] < 1e-3, d
    assert sum(d["applied"] > 0 for d in docs) >= len(CHEAP) // 2
