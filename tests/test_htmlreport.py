"""The HTML report of a real run: self-contained, every table and plot present, and it renders
in headless Chromium (Debian's package) without console errors. The screenshot is kept in
build/artifacts/ (not in git)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from onnxcomp.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fashion_mnist_vgg.onnx"
CALIB = ROOT / "models" / "fashion_mnist_calib.npz"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    result = CliRunner().invoke(main, [str(a) for a in [
        "optimize", MODEL, "-o", tmp / "out.onnx", "--pass", "fold_bn", "--pass", "cp",
        "--rank", "auto", "--target-speedup", "1.5", "--calib", CALIB, "--num-calib", 64,
        "--runs", 10, "--report", tmp / "run.html"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(main, [str(a) for a in [
        "optimize", MODEL, "-o", tmp / "out2.onnx", "--pass", "fold_bn", "--pass", "svd",
        "--rank", "0.5", "--calib", CALIB, "--num-calib", 32, "--no-bench",
        "--report", tmp / "run.json"]], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    return tmp


def test_the_html_report_holds_the_tables_and_plots(run):
    page = (run / "run.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert "Before and after" in page and "latency (cpu, 1 thread, median)" in page
    assert page.count("<svg") >= 3  # latency per layer, error per layer, the search's path
    assert "The search&#x27;s path" in page or "The search's path" in page


def test_report_turns_a_saved_json_report_into_html(run):
    out = CliRunner().invoke(main, ["report", str(run / "run.json"), "-o", str(run / "j.html")])
    assert out.exit_code == 0, out.output
    doc = json.loads((run / "run.json").read_text())
    page = (run / "j.html").read_text()
    applied = [c["node"] for s in doc["steps"] for c in s["report"]["applied"]]
    assert applied and all(name in page for name in applied)
    bad = CliRunner().invoke(main, ["report", str(MODEL), "-o", str(run / "x.html")])
    assert bad.exit_code == 1 and "not a readable JSON report" in bad.output


def test_the_html_report_renders_in_headless_chromium(run):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is needed (apt-get install chromium; .ci/run installs it)"
    artifacts = ROOT / "build" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    shot.unlink(missing_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
             "--v=0", "--window-size=1200,2600", f"--user-data-dir={run / 'profile'}",
             "--no-first-run", "--disable-extensions"]
    page = (run / "run.html").as_uri()
    shown = subprocess.run([browser, *flags, f"--screenshot={shot}", page], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "CONSOLE" not in shown.stderr and "Uncaught" not in shown.stderr
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True,
                         timeout=120)
    assert dom.stdout.count("<svg") >= 3 and "<table>" in dom.stdout, dom.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    greens = int(np.all(pixels == (46, 125, 50), axis=-1).sum())
    assert greens > 500  # the plots' bars and points were drawn
