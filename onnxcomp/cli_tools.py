"""The ``onnxcomp`` commands that look at models and reports.

eval, diff, report, explain, view and passes; cli.py registers them on the ``onnxcomp`` group.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from onnxcomp import changes as diff_mod
from onnxcomp import fidelity, htmlreport, passbase, report
from onnxcomp import judge as judge_mod
from onnxcomp import model as model_io
from onnxcomp.cli_options import (
    console,
    fail,
    first_inputs,
    image_options,
    input_options,
    load_calib,
    parse_shapes,
    pass_fields,
    run_body,
    write_text,
)
from onnxcomp.errors import InputError


@click.command(name="eval")
@click.argument("original_path", metavar="ORIGINAL.onnx", type=click.Path(path_type=Path))
@click.argument("candidate_path", metavar="NEW.onnx", type=click.Path(path_type=Path))
@click.option("--data", "calib_path", required=True, type=click.Path(path_type=Path),
              help="Data the compiler never saw: .npz (keys = input names), .npy or an image "
                   "folder (with the image options).")
@click.option("--num", "num_calib", type=click.IntRange(min=1), default=None,
              help="Use at most this many samples.")
@click.option("--batch", "calib_batch", type=click.IntRange(min=1), default=8,
              show_default=True)
@click.option("--score-threshold", "score_threshold", type=float, default=0.5,
              show_default=True, help="Sigmoid outputs: above it is a confident detection.")
@click.option("--metric", "metric_spec", metavar="MODULE:FUNCTION",
              help="Your metric per batch (see optimize --metric).")
@click.option("--labels", "labels_path", type=click.Path(path_type=Path),
              help="One class per sample (.npy or .json): labelled accuracy of both models.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for pipelines.")
@image_options
def eval_cmd(original_path: Path, candidate_path: Path, score_threshold: float,
             metric_spec: str | None, labels_path: Path | None, as_json: bool,
             **kw: Any) -> None:
    """Fidelity of NEW.onnx against ORIGINAL.onnx on held-out data: the compile's measures.

    The loss is what --max-drop bounds (decisions, score sets, regression error, your metric,
    labelled accuracy), with every measure beside it.
    """

    def body() -> None:
        original = model_io.load(original_path)
        candidate = model_io.load(candidate_path)
        data = load_calib(original, kw)
        metric, name = judge_mod.load_metric(metric_spec) if metric_spec else (None, "")
        judge = judge_mod.Judge(score_threshold, metric, name,
                                judge_mod.load_labels(labels_path) if labels_path else None)
        fid = fidelity.Reference.of(original, data, judge).compare(candidate)
        loss, measure = fidelity.bound(fid)
        doc = {"original": str(original_path), "candidate": str(candidate_path),
               "data": data.source, "samples": data.num_samples, "loss": loss,
               "loss_metric": measure, "fidelity": fid.to_dict()}
        if as_json:
            click.echo(json.dumps(doc, indent=2, default=str))
            return
        console.print(report.eval_table(fid, loss, measure, data.num_samples,
                                        f"{candidate_path.name} vs {original_path.name}"))

    run_body(body)


@click.command(name="diff")
@click.argument("a_path", metavar="A.onnx", type=click.Path(path_type=Path))
@click.argument("b_path", metavar="B.onnx", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for pipelines.")
@click.option("--annotate", "annotate_path", type=click.Path(path_type=Path),
              help="Write a copy of B whose nodes say what they replaced (open A and it side "
                   "by side in Netron).")
@input_options
def diff_cmd(a_path: Path, b_path: Path, as_json: bool, annotate_path: Path | None,
             input_shapes: Sequence[str], **kw: Any) -> None:
    """What changed from A.onnx to B.onnx (an onnxcomp output), grouped by original node.

    Replaced, changed in place, removed and added nodes, with the passes that did it, params
    and MACs before and after, and the error each rewrite measured.
    """
    shapes = parse_shapes(input_shapes)

    def body() -> None:
        a, b = model_io.load(a_path), model_io.load(b_path)
        feeds = first_inputs(a, kw, 1)
        given = {k: v.shape for k, v in feeds.items()} if feeds else (shapes or None)
        groups = diff_mod.diff(a, b, given)
        if annotate_path is not None:
            model_io.save(diff_mod.annotate(b, groups), annotate_path)
        if as_json:
            click.echo(json.dumps({"a": str(a_path), "b": str(b_path),
                                   **diff_mod.summary(groups),
                                   "changes": [g.to_dict() for g in groups]}, indent=2))
            return
        console.print(report.diff_table(groups, f"{a_path.name} -> {b_path.name}"))

    run_body(body)


@click.command(name="report")
@click.argument("json_path", metavar="RUN.json", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="The HTML file to write.")
def report_cmd(json_path: Path, output: Path) -> None:
    """Turn a JSON report (optimize --report run.json) into a self-contained HTML page."""

    def body() -> None:
        try:
            doc = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{json_path}: not a readable JSON report ({exc})") from None
        if not isinstance(doc, dict) or "steps" not in doc:
            raise InputError(f"{json_path}: not an onnxcomp report (no 'steps')")
        write_text(output, htmlreport.render(doc))

    run_body(body)


@click.command(name="explain")
@click.argument("pass_name", metavar="PASS")
def explain(pass_name: str) -> None:
    """What PASS does and its options (from the same source as `optimize --help`)."""
    from onnxcomp.passes import REGISTRY

    if pass_name not in REGISTRY:
        fail(passbase.unknown_option(pass_name, REGISTRY, "explain").replace(
            "unknown option", "unknown pass", 1), code=2)
    pass_ = REGISTRY[pass_name]
    doc = (sys.modules[type(pass_).__module__].__doc__ or "").strip()
    kind = "lossless" if pass_.lossless else "lossy"
    console.print(f"[bold]{pass_name}[/] ({kind})\n", highlight=False)
    console.print(doc, highlight=False, markup=False)
    console.print("\n[bold]Options[/]", highlight=False)
    for f, _, passes in pass_fields().values():
        if pass_name not in passes:
            continue
        meta = f.metadata
        flag = meta.get("flag") or f"--{f.name.replace('_', '-')}"
        default = "" if f.default in (None, ()) else f" [default: {f.default}]"
        choices = f" ({' | '.join(meta['choices'])})" if meta.get("choices") else ""
        text = meta["help"].split(": ", 1)[1] if meta["help"].startswith(
            tuple(f"{p}: " for p in REGISTRY)) else meta["help"]
        console.print(f"  {flag}{choices}{default}\n      {text}", highlight=False,
                      markup=False)


@click.command(name="view")
@click.argument("model_paths", metavar="MODEL [MODEL2]", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8080, show_default=True,
              help="The first model's port (the next one's is +1).")
@click.option("--browse/--no-browse", default=True, show_default=True,
              help="Open a browser tab per model.")
@click.option("--wait/--no-wait", default=True, hidden=True,
              help="Serve until interrupted (tests start and stop the servers).")
def view(model_paths: Sequence[Path], port: int, browse: bool, wait: bool) -> None:
    """Serve MODEL (and MODEL2 beside it) in Netron locally, e.g. an original and its output.

    Needs the netron package: pip install 'onnxcomp[view]'. `onnxcomp diff A B --annotate C`
    writes a copy whose nodes say what they replaced, to view beside A.
    """

    def body() -> None:
        try:
            import netron
        except ImportError:
            raise InputError("onnxcomp view needs Netron: pip install 'onnxcomp[view]'") from None
        for path in model_paths:
            if not path.is_file():
                raise InputError(f"{path}: no such model file")
        for i, path in enumerate(model_paths[:2]):
            address = netron.start(str(path), address=("localhost", port + i), browse=browse)
            host, bound = address if isinstance(address, tuple) else ("localhost", port + i)
            console.print(f"{path.name}: http://{host}:{bound}", highlight=False)
        if wait:
            netron.wait()

    run_body(body)


@click.command(name="passes")
def list_passes() -> None:
    """List the available passes."""
    from onnxcomp.passes import REGISTRY

    for name, p in REGISTRY.items():
        doc = (sys.modules[type(p).__module__].__doc__ or "").strip().splitlines()
        line = doc[0].replace(" (lossless)", "").replace(" (lossy)", "") if doc else ""
        kind = "lossless" if p.lossless else "lossy"
        console.print(f"[bold]{name}[/] ({kind}): {line}", highlight=False)
    console.print("`onnxcomp explain PASS` lists a pass's options.", highlight=False)


COMMANDS = [eval_cmd, diff_cmd, report_cmd, explain, view, list_passes]
