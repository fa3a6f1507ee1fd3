"""Hostile files: every seeded broken copy of a real model gives a one-line error (exit 1) or a
valid output; never a traceback, never a partial output, never a change to the input."""

from __future__ import annotations

import collections
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hostile import cases, conv_nd

from onnxcomp.cli import main

ROOT = Path(__file__).resolve().parents[1]
CASES = 520  # the issue asks for >= 500 generated cases
COMMANDS = [
    ["--pass", "canonicalize", "--pass", "fold_bn", "--no-bench"],
    ["--pass", "quantize", "--mode", "weight", "--no-bench"],
    None,  # inspect
]


def _bases() -> dict[str, onnx.ModelProto]:
    sys.path.insert(0, str(ROOT / "models"))
    import paths  # noqa: PLC0415 - models/ is put on sys.path just above

    pnet = paths.cache_dir() / "mtcnn_pnet.onnx"
    if not pnet.exists():
        pytest.fail(f"{pnet} is missing: run `python models/fetch_all.py` first")
    return {"mtcnn_pnet": onnx.load(str(pnet)), "conv1d": conv_nd(1), "conv3d": conv_nd(3)}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_case(runner: CliRunner, i: int, kind: str, files: dict[str, bytes], tmp: Path,
                exits: collections.Counter) -> str | None:
    """What went wrong with this case (None: it behaved)."""
    folder = tmp / f"case{i}"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    before = _digest(folder)
    src, out = folder / "model.onnx", folder / "out.onnx"
    extra = COMMANDS[i % len(COMMANDS)]
    args = ["inspect", str(src)] if extra is None else ["optimize", str(src), "-o", str(out),
                                                        *extra]
    result = runner.invoke(main, args)
    exits[result.exit_code] += 1
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"{type(result.exception).__name__}: {result.exception}"
    if "Traceback" in text:
        return "traceback in the output"
    if result.exit_code not in (0, 1):
        return f"exit {result.exit_code}: {text.strip()[-300:]}"
    after = _digest(folder)
    if extra is not None and result.exit_code == 0:
        after.pop("out.onnx", None)
    if after != before:
        return f"files changed: {sorted(set(after) ^ set(before)) or 'contents'}"
    if result.exit_code == 1:
        errors = [ln for ln in text.splitlines() if ln.startswith("error")]
        if len(errors) != 1:
            return f"expected one error line, got: {text.strip()[-300:]}"
        return None
    if extra is not None:
        try:
            model = onnx.load(str(out))
            onnx.checker.check_model(model)
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - an invalid output is what this test finds
            return f"exit 0 with an invalid output: {str(exc)[:200]}"
    return None


@pytest.mark.realmodel
def test_hostile_files_fail_cleanly_or_give_valid_output(tmp_path):
    runner = CliRunner()
    bases = _bases()
    failures, outcomes, exits = [], collections.Counter(), collections.Counter()
    for i, (kind, files) in enumerate(cases(bases, CASES, seed=0)):
        problem = _check_case(runner, i, kind, files, tmp_path, exits)
        if problem is not None:
            failures.append(f"{kind} ({' '.join(map(str, COMMANDS[i % 3] or ['inspect']))}): "
                            f"{problem}")
        outcomes[kind.split(":")[1]] += 1
    print(f"\n{CASES} hostile cases over {sorted(bases)}: {dict(outcomes)}; exit codes "
          f"{dict(exits)}")
    assert not failures, "\n".join(failures[:40])


def test_the_mutator_is_seeded_and_covers_every_kind():
    bases = {"conv1d": conv_nd(1)}
    first = list(cases(bases, 30, seed=3))
    again = list(cases(bases, 30, seed=3))
    assert first == again
    kinds = {k.split(":")[1] for k, _ in first}
    assert {"truncated", "flipped_bytes", "cycle", "custom_op", "if_subgraph",
            "loop_subgraph"} <= kinds
    assert any(k.startswith("external_data") for k in kinds)
    # the damaged bytes differ from the base's
    base = bases["conv1d"].SerializeToString()
    assert all(files["model.onnx"] != base for _, files in first)


def test_other_kinds_of_model_are_valid_onnx():
    for dims in (1, 3):
        model = conv_nd(dims)
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        shape = [2, 4, *([16] if dims == 1 else [6, 6, 6])]
        (y,) = sess.run(None, {"x": np.ones(shape, np.float32)})
        assert y.shape[1] == 8
