"""Fixed-rank compiles are byte-identical across runs (golden hashes), and a compile killed
mid-run leaves no partial output while its latency cache still loads."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from onnxcomp.cli import main
from onnxcomp.latency_cache import LatencyCache

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "models" / "fashion_mnist_vgg.onnx"
FMNIST_CALIB = ROOT / "models" / "fashion_mnist_calib.npz"

# sha256 of the output graph (nodes, initializers, node metadata; the model-level metadata
# holds onnxcomp's version and is left out) of fixed-rank compiles of the bundled
# Fashion-MNIST net. Measured on x86-64 (AVX-512) with the pinned numpy / ONNX Runtime; a
# change here means the same command now writes different bytes: say why in the commit.
GOLDEN = {
    "fold": "109166daa4d10f711cbd1e68b8077f0b8418a7f4709d78ccccf948eedd17109e",
    "svd_rank8": "c3149608731eb5fc3f0b491fbf115d38526d0086807a343b0b6fa916564512b3",
    "quantize_weight": "433bc040ba9882f3960fb15b22b61879e6486a3e557913682b2546abcc97059b",
}
RUNS = {
    "fold": ["--pass", "canonicalize", "--pass", "fold_bn", "--pass", "fold_affine"],
    "svd_rank8": ["--pass", "fold_bn", "--pass", "svd", "--rank", "8"],
    "quantize_weight": ["--pass", "quantize", "--mode", "weight", "--bits", "8"],
}


def _graph_digest(path: Path) -> str:
    return hashlib.sha256(onnx.load(str(path)).graph.SerializeToString()).hexdigest()


def _compile(tmp: Path, name: str, tag: str) -> Path:
    out = tmp / f"{name}_{tag}.onnx"
    result = CliRunner().invoke(main, ["optimize", str(FMNIST), "-o", str(out), *RUNS[name],
                                       "--calib", str(FMNIST_CALIB), "--num-calib", "64",
                                       "--no-bench"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
def test_fixed_rank_compiles_are_byte_identical_and_match_their_golden_hash(tmp_path, name):
    first = _compile(tmp_path, name, "a")
    second = _compile(tmp_path, name, "b")
    assert first.read_bytes() == second.read_bytes()
    assert _graph_digest(first) == GOLDEN[name], (
        f"{name}: the output changed; new digest {_graph_digest(first)}")


def _command(out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-c", "from onnxcomp.cli import main; main()", "optimize",
            str(FMNIST), "-o", str(out), "--pass", "cp", "--rank", "auto", "--target-speedup",
            "2", "--calib", str(FMNIST_CALIB), "--num-calib", "64", "--latency-cache",
            str(cache), "--runs", "5"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,delays", [
    (signal.SIGKILL, (1.0, 2.5, 4.0, 6.0)),
    (signal.SIGTERM, (3.0,)),
    (signal.SIGINT, (3.0,)),
])
def test_a_killed_compile_leaves_no_partial_output_and_a_loadable_cache(tmp_path, sig, delays):
    out, cache = tmp_path / "out.onnx", tmp_path / "cache.json"
    good = FMNIST.read_bytes()  # an earlier good output the killed run must not spoil
    for delay in delays:
        out.write_bytes(good)
        proc = subprocess.Popen(_command(out, cache), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
        time.sleep(delay)
        proc.send_signal(sig)
        text = proc.communicate(timeout=120)[0].decode(errors="replace")
        assert "Traceback" not in text, text
        if proc.returncode == 0:  # it finished first: a complete new output
            onnx.checker.check_model(onnx.load(str(out)))
        else:
            assert out.read_bytes() == good, f"killed after {delay} s: the output changed"
        if cache.exists():  # whatever was saved is whole
            json.loads(cache.read_text())
            LatencyCache(cache, "cpu", 1)._read()
        if sig != signal.SIGKILL:  # an orderly stop cleans its staging files up
            assert proc.returncode != 0
            assert sorted(p.name for p in tmp_path.iterdir()
                          if p.name.startswith(".")) == [], text
    shutil.rmtree(tmp_path, ignore_errors=True)
