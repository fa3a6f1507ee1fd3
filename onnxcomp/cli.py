"""The ``onnxcomp`` command line (click). Thin: all logic lives in the library."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from onnxcomp import bench as bench_mod
from onnxcomp import calibration, cost, pipeline, report
from onnxcomp import model as model_io
from onnxcomp import recipe as recipe_mod
from onnxcomp.errors import ConfigError, InputError, OnnxcompError

F = TypeVar("F", bound=Callable[..., Any])

# Wide tables when piped (CI logs, pipelines); the terminal's width otherwise.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got '{text}'") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    vals = _floats(text.replace("x", ","))
    if not vals or len(vals) > 2 or any(v <= 0 or v != int(v) for v in vals):
        raise click.BadParameter(f"expected H,W or S, got '{text}'")
    return (int(vals[0]), int(vals[-1]))


def calib_options(func: F) -> F:
    """Options shared by commands that read calibration data."""
    options = [
        click.option("--calib", "calib_path", type=click.Path(path_type=Path),
                     help="Calibration data: .npz (keys = input names), .npy, or image folder."),
        click.option("--num-calib", type=click.IntRange(min=1), default=None,
                     help="Use at most this many calibration samples."),
        click.option("--calib-batch", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Batch size for running calibration data."),
        click.option("--size", help="Image folder: resize to H,W (default: model input)."),
        click.option("--mean", help="Image folder: per-channel mean, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Image folder: per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--scale", type=float, default=1 / 255, show_default="1/255",
                     help="Image folder: pixel scale applied before mean/std."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw",
                     show_default=True, help="Image folder: tensor layout."),
        click.option("--bgr", is_flag=True, help="Image folder: BGR channel order."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# Parameters of `optimize` that configure passes (a recipe holds them instead).
PASS_FLAGS = frozenset({
    "no_fold_pad", "rank", "target_speedup", "target_macs", "max_error", "no_refit",
    "refit_mode", "rank_multiple", "no_latency_check", "exclude", "seed", "groups", "weighted",
    "depth_multiplier", "share_groups", "ratio", "criterion", "round_to", "layers",
    "min_realized", "min_agreement", "sensitivity", "cp_depthwise", "basis", "mode",
    "calibrator", "max_drop", "activations", "reduce_range", "bits",
})
LOWRANK = ("cp", "tucker", "svd", "kernel_sharing", "depthwise_separable")


def lowrank_options(func: F) -> F:
    """Options of the decomposition passes (cp, tucker, svd)."""
    options = [
        click.option("--rank", default="auto", show_default=True,
                     help="auto, an absolute rank N, or a fraction 0<f<1 of the break-even "
                          "rank."),
        click.option("--target-speedup", type=float,
                     help="auto, prune_*: measured ORT speedup of the output model over IN.onnx "
                          "(what earlier passes of the run bring counts)."),
        click.option("--target-macs", type=float,
                     help="auto: fraction of IN.onnx's MACs to keep."),
        click.option("--max-error", type=float,
                     help="auto: bound on the relative error of the model's outputs."),
        click.option("--no-refit", is_flag=True, help="Keep the raw decomposition (no refit)."),
        click.option("--refit-mode", type=click.Choice(["asymmetric", "symmetric"]),
                     default="asymmetric", show_default=True),
        click.option("--rank-multiple", type=click.IntRange(min=1), default=8,
                     show_default=True, help="Round ranks to multiples of this."),
        click.option("--no-latency-check", is_flag=True,
                     help="Rewrite layers even when not measured faster."),
        click.option("--min-realized", type=click.FloatRange(0, 1),
                     help="--rank auto: use only chains whose measured speedup is at least "
                          "this share of their MAC reduction (default 0.8). Measured in "
                          "context: what a one-layer model pays at its edges (layout "
                          "conversions, per-run overhead) is taken off both timings."),
        click.option("--min-agreement", type=click.FloatRange(0, 1),
                     help="--rank auto: keep at least this share of the calibration samples' "
                          "decisions (argmax of a softmax or logits output, at every "
                          "position) unchanged, with or without a target (default 0.97; 0: "
                          "off). Models with no such output are not bound by it."),
        click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
                     help="--rank auto: weight each layer's error by how much of it reaches "
                          "the model's outputs (measured, one probe run per layer on 8-32 "
                          "calibration samples)."),
        click.option("--cp-depthwise", type=click.Choice(["separate", "merged", "auto"]),
                     help="cp: the chain's spatial stages as depthwise kx1 then 1xk "
                          "(separate: the classic 4-layer chain), as one depthwise kxk of "
                          "rank-one kernels (merged: the same CP model, measured 5-25 % faster "
                          "for 3x3 here, slower or level for 5x5 and 7x7), or merged for "
                          "kernels of at most 9 taps (auto, the default)."),
        click.option("--basis", type=click.Choice(["data", "weights"]),
                     help="svd of 1x1 convs and FC layers, and tucker's output factor: "
                          "keep the principal subspace of the layer's outputs on the "
                          "calibration data when that also holds across calibration halves "
                          "(data, the default), or that of the weights (weights)."),
        click.option("--exclude", multiple=True, metavar="NODE", help="Leave this node alone."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--groups", help="kernel_sharing: shared kernels per layer (like --rank: "
                                      "auto, N or a fraction)."),
        click.option("--weighted/--no-weighted", default=True, show_default=True,
                     help="kernel_sharing: one weight per input channel (WKSC) or plain KSC."),
        click.option("--depth-multiplier", help="depthwise_separable: auto or N (like --rank)."),
        click.option("--ratio", type=float,
                     help="prune_channels: share of every group's channels to remove "
                          "(default 0.3 without --target-speedup)."),
        click.option("--criterion", type=click.Choice(
            ["reconstruction", "l1", "l2", "bn_scale", "activation"]),
                     default="reconstruction", show_default=True,
                     help="prune_channels: channel importance."),
        click.option("--round-to", type=click.IntRange(min=1), default=8, show_default=True,
                     help="prune_channels: keep channel counts a multiple of this."),
        click.option("--layers", type=click.IntRange(min=1),
                     help="prune_layers: how many layers to remove (default 1 without "
                          "--target-speedup)."),
        click.option("--mode", type=click.Choice(["static", "weight", "kmeans", "binary"]),
                     default="static", show_default=True,
                     help="quantize: static int8 QDQ with calibrated activations, int "
                          "weights (DequantizeLinear), k-means sharing (codebook + Gather) "
                          "or binary weights (experimental)."),
        click.option("--calibrator", type=click.Choice(["percentile", "minmax", "entropy"]),
                     default="percentile", show_default=True,
                     help="quantize --mode static: activation ranges."),
        click.option("--activations", type=click.Choice(["auto", "uint8", "int8"]),
                     default="auto", show_default=True,
                     help="quantize --mode static: activation type; auto = uint8 on cpu, "
                          "int8 (symmetric) on cuda / tensorrt."),
        click.option("--reduce-range/--full-range", default=None,
                     help="quantize --mode static: 7-bit weights (default on x86 CPUs "
                          "without VNNI, where 8-bit products saturate in ONNX Runtime)."),
        click.option("--max-drop", type=float,
                     help="quantize --mode static: leave the most sensitive layers in float "
                          "until the fidelity drop on the calibration data (1 - the share "
                          "of samples whose decisions are all kept, or relative output error "
                          "without a decision output) is at most this. [default: 0.2; inf: "
                          "no bound]"),
        click.option("--bits", type=click.IntRange(1, 8), default=8, show_default=True,
                     help="quantize: 8 or 4 (weight), 1..8 (kmeans)."),
        click.option("--share-groups", type=click.IntRange(min=1),
                     help="depthwise_separable: fold input channels into G shared groups "
                          "first (weighted kernel sharing)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load_calibration(model: Any, kw: dict[str, Any]) -> calibration.Calibration:
    path = kw["calib_path"]
    if path is None:
        err_console.print(
            "[bold yellow]warning:[/] no --calib given: using synthetic random inputs; "
            "refits and fidelity figures are then meaningless", highlight=False)
        return calibration.synthetic_calibration(
            model, num_samples=kw["num_calib"] or 8, batch_size=kw["calib_batch"])
    image_given = (kw["size"] is not None or kw["mean"] is not None or kw["std"] is not None
                   or kw["scale"] != 1 / 255 or kw["layout"] != "nchw" or kw["bgr"])
    options: calibration.ImageOptions | None = calibration.ImageOptions(
        size=_size(kw["size"]),
        mean=_floats(kw["mean"]) or (0.0, 0.0, 0.0),
        std=_floats(kw["std"]) or (1.0, 1.0, 1.0),
        scale=kw["scale"],
        layout=kw["layout"],
        bgr=kw["bgr"],
    )
    if not image_given and not Path(path).is_dir():
        options = None
    return calibration.load_calibration(path, model, options, batch_size=kw["calib_batch"],
                                      limit=kw["num_calib"])


def _run(func: Callable[[], None]) -> None:
    """Run a command body, turning onnxcomp's own errors into a one-line message."""
    try:
        func()
    except ConfigError as exc:
        _fail(str(exc), code=2)
    except OnnxcompError as exc:
        _fail(str(exc))
    except Exception as exc:  # a bug or a runtime failure: one line, traceback with -v
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        text = str(exc).strip().splitlines()
        _fail(f"internal error ({type(exc).__name__}): {text[0] if text else ''} "
              "(run with -vv for the traceback)", code=3)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="onnxcomp")
def main(verbose: int) -> None:
    """onnxcomp: make convolutional networks smaller and faster by rewriting ONNX graphs."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("model_path", metavar="IN.onnx", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Where to write the optimized model.")
@click.option("--pass", "passes", multiple=True, metavar="NAME",
              help="Pass to run (repeatable, runs in order). See `onnxcomp passes`.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Run the passes and options of this recipe file (TOML or .json) instead "
                   "of --pass and pass flags.")
@click.option("--save-recipe", "save_recipe", type=click.Path(path_type=Path),
              help="Write the run's passes and options as a recipe file (TOML).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the full JSON report here.")
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="Measure ORT latency of original vs optimized (interleaved).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(min=3), default=50, show_default=True,
              help="Benchmark rounds.")
@click.option("--latency-cache", "latency_cache", type=click.Path(path_type=Path),
              help="--rank auto: read latency measurements from this JSON file and record new "
                   "ones in it, so that a second compile replays the first one's choices "
                   "(kept per machine, ONNX Runtime version, provider and threads).")
@click.option("--no-fold-pad", is_flag=True, help="canonicalize: keep Pad nodes before Conv.")
@lowrank_options
@calib_options
def optimize(model_path: Path, output: Path, passes: Sequence[str], recipe_path: Path | None,
             save_recipe: Path | None, report_path: Path | None, bench: bool, provider: str,
             threads: int, runs: int, latency_cache: Path | None, no_fold_pad: bool,
             rank: str, target_speedup: float | None, target_macs: float | None,
             max_error: float | None, no_refit: bool, refit_mode: str, rank_multiple: int,
             no_latency_check: bool, exclude: Sequence[str], seed: int, groups: str | None,
             weighted: bool, depth_multiplier: str | None, share_groups: int | None,
             ratio: float | None, criterion: str, round_to: int, layers: int | None,
             min_realized: float | None, min_agreement: float | None, sensitivity: bool,
             cp_depthwise: str | None, basis: str | None,
             mode: str, calibrator: str,
             max_drop: float | None, activations: str, reduce_range: bool | None,
             bits: int,
             **calib_kw: Any) -> None:
    """Rewrite IN.onnx with the given passes, verify, benchmark and write -o OUT.onnx."""
    from onnxcomp.passes import REGISTRY

    if recipe_path is not None and passes:
        _fail("give --pass or --recipe, not both", code=2)
    if recipe_path is None and not passes:
        _fail("nothing to do: give --pass NAME (repeatable) or --recipe FILE", code=2)
    unknown = [p for p in passes if p not in REGISTRY]
    if unknown:
        _fail(f"unknown pass '{unknown[0]}' (available: {', '.join(REGISTRY)})", code=2)
    if output.resolve() == model_path.resolve():
        _fail("output path is the input path: onnxcomp never overwrites its input", code=2)
    options: dict[str, Any] = {
        "fold_pad": not no_fold_pad, "rank": rank, "target_speedup": target_speedup,
        "target_macs": target_macs, "max_error": max_error, "refit": not no_refit,
        "refit_mode": refit_mode, "rank_multiple": rank_multiple,
        "latency_check": not no_latency_check, "exclude": tuple(exclude), "seed": seed,
        "provider": provider, "threads": threads, "weighted": weighted,
        "latency_cache": str(latency_cache) if latency_cache else None,
        "share_groups": share_groups, "ratio": ratio, "criterion": criterion,
        "round_to": round_to, "layers": layers, "mode": mode, "bits": bits,
        "calibrator": calibrator, "max_drop": max_drop, "min_realized": min_realized,
        "min_agreement": min_agreement,
        "sensitivity": sensitivity,
        "cp_depthwise": cp_depthwise, "basis": basis,
        "activations": activations, "reduce_range": reduce_range,
    }
    if recipe_path is not None:
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params
                 if p.name in PASS_FLAGS
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            _fail(f"{given[0]}: with --recipe, pass options belong in the recipe", code=2)
    # Per-pass names for the rank: --groups, --depth-multiplier (else --rank).
    rank_alias = {"kernel_sharing": groups, "depthwise_separable": depth_multiplier}

    def body() -> None:
        if recipe_path is not None:
            base = {"provider": provider, "threads": threads,
                    "latency_cache": str(latency_cache) if latency_cache else None}
            steps = recipe_mod.load(recipe_path).steps(
                REGISTRY, {k: v for k, v in base.items() if v is not None})
        else:
            steps = []
            for name in passes:
                config_cls = REGISTRY[name].config_cls
                step_options = dict(options)
                if rank_alias.get(name) is not None:
                    step_options["rank"] = rank_alias[name]
                steps.append(pipeline.Step(name, config_cls.from_options(step_options)))
        model = model_io.load(model_path)
        calib = _load_calibration(model, calib_kw)
        if calib.synthetic and any(s.name in LOWRANK and getattr(s.config, "rank", "") == "auto"
                                   for s in steps):
            err_console.print("[bold yellow]warning:[/] --rank auto without --calib: ranks are "
                              "chosen from weights alone", highlight=False)
        with _progress() as progress:
            task = progress.add_task("optimizing", total=None)
            result = pipeline.run_pipeline(
                model, steps, calib,
                on_step=lambda n: progress.update(task, description=f"pass {n}"))
            model_io.save(result.model, output)
            if save_recipe is not None:
                _write_text(save_recipe, recipe_mod.dump(steps))
            # Costs per sample (batch 1), like the latency figures.
            shapes = {k: (1, *v.shape[1:]) for k, v in calib.batches[0].items()}
            cost_before = cost.model_cost(model, shapes)
            cost_after = cost.model_cost(result.model, shapes)
            latency = None
            if bench:
                progress.update(task, description="benchmarking original vs optimized")
                latency = _latency(model, result.model, calib, provider, threads, runs)
        size_before = cost.file_size(model_path)
        size_after = cost.file_size(output)
        for step in result.steps:
            console.print(report.step_table(step))
        rows = report.summary_rows(cost_before, cost_after, size_before, size_after, latency,
                                   result)
        console.print(report.summary_table(rows, f"{model_path.name} -> {output.name}"))
        if calib.synthetic:
            console.print("[yellow]fidelity measured on synthetic inputs (no --calib)[/]")
        for step in result.steps:
            for warning in step.report.warnings:
                err_console.print(f"[bold yellow]warning:[/] {step.name}: {warning.text}",
                                  highlight=False)
        if report_path is not None:
            doc = {
                "input": str(model_path),
                "output": str(output),
                "calibration": {"source": calib.source, "synthetic": calib.synthetic,
                                "samples": calib.num_samples},
                "cost_before": cost_before.to_dict(),
                "cost_after": cost_after.to_dict(),
                "file_size": {"before": size_before, "after": size_after},
                "latency": latency,
                "realized": report.realized(latency, cost_before, cost_after),
                **result.to_dict(),
            }
            _write_json(report_path, doc)

    _run(body)


def _latency(a: Any, b: Any, calib: calibration.Calibration, provider: str, threads: int,
             runs: int) -> dict[str, Any]:
    first = {k: v[:1] for k, v in calib.batches[0].items()}
    config = bench_mod.BenchConfig(provider=provider, threads=threads, batch=1, runs=runs)
    res = bench_mod.benchmark([a, b], config, inputs=first, labels=["original", "optimized"])
    sp = res.speedups[0]
    return {
        "provider": provider, "threads": threads, "runs": res.rounds,
        "before_ms": res.models[0].median_ms, "after_ms": res.models[1].median_ms,
        "speedup": sp.median, "speedup_p10": sp.p10, "speedup_p90": sp.p90,
    }


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (a half-written file never replaces a good one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    _write_text(path, json.dumps(doc, indent=2, default=str))


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    console=err_console, transient=True)


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0,D1,...",
              help="Resolve symbolic input dims (default: batch 1).")
@click.option("--all", "show_all", is_flag=True, help="Show every layer (default: top 40).")
def inspect(model_path: Path, as_json: bool, input_shapes: Sequence[str],
            show_all: bool) -> None:
    """Per-layer params and MACs of MODEL, with totals."""
    shapes: dict[str, list[int]] = {}
    for spec in input_shapes:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            _fail(f"bad --input-shape '{spec}' (expected NAME=D0,D1,...)", code=2)

    def body() -> None:
        model = model_io.load(model_path)
        mc = cost.model_cost(model, shapes or None)
        size = cost.file_size(model_path)
        if as_json:
            doc = {"model": str(model_path), "file_size": size, **mc.to_dict()}
            click.echo(json.dumps(doc, indent=2, default=str))
            return
        console.print(report.layer_table(mc, str(model_path), None if show_all else 40))
        console.print(f"params {report.human(mc.params)}  MACs {report.human(mc.macs)}  "
                      f"file {report.human(size, 'B')}")
        quantized = model_io.quantized_nodes(model)
        if quantized:
            console.print(f"already quantized: {len(quantized)} integer nodes")

    _run(body)


@main.command(name="bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(min=3), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for pipelines.")
def bench_cmd(models: Sequence[Path], provider: str, threads: int, batch: int, runs: int,
              warmup: int, as_json: bool) -> None:
    """Latency of one or more models on ONNX Runtime, runs interleaved (first = baseline)."""

    def body() -> None:
        loaded = [model_io.load(p) for p in models]
        config = bench_mod.BenchConfig(provider=provider, threads=threads, batch=batch,
                                       runs=runs, warmup=warmup)
        with _progress() as progress:
            progress.add_task(f"benchmarking {len(loaded)} model(s), {runs} rounds", total=None)
            res = bench_mod.benchmark(loaded, config, labels=[p.name for p in models])
        costs = [cost.model_cost(m, None) for m in loaded]
        doc = res.to_dict()
        for entry, mc, path in zip(doc["models"], costs, models, strict=True):
            entry.update(params=mc.params, macs=mc.macs, file_size=cost.file_size(path))
        if as_json:
            click.echo(json.dumps(doc, indent=2, default=str))
            return
        rows = []
        speedups = {s.index: s for s in res.speedups}
        for i, entry in enumerate(doc["models"]):
            sp = speedups.get(i)
            rows.append([
                entry["label"], f"{entry['median_ms']:.3f}",
                f"{entry['p10_ms']:.3f} / {entry['p90_ms']:.3f}",
                "baseline" if sp is None else f"{sp.median:.2f}x ({sp.p10:.2f}-{sp.p90:.2f})",
                report.human(entry["params"]), report.human(entry["macs"]),
                report.human(entry["file_size"], "B"),
            ])
        from rich.table import Table

        table = Table(title=f"ONNX Runtime {provider}, {threads} thread(s), batch {batch}, "
                            f"{runs} interleaved rounds")
        for col in ("model", "median ms", "p10 / p90 ms", "speedup vs first", "params", "MACs",
                    "size"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)

    _run(body)


@main.command(name="passes")
def list_passes() -> None:
    """List the available passes."""
    from onnxcomp.passes import REGISTRY

    for name, p in REGISTRY.items():
        doc = (sys.modules[type(p).__module__].__doc__ or "").strip().splitlines()
        kind = "lossless" if p.lossless else "lossy"
        console.print(f"[bold]{name}[/] ({kind}): {doc[0] if doc else ''}", highlight=False)


__all__ = ["main", "InputError"]
