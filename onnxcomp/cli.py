"""The ``onnxcomp`` command line (click). Thin: all logic lives in the library."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from onnxcomp import (
    api,
    calibration,
    cli_tools,
    cost,
    htmlreport,
    passbase,
    pipeline,
    provenance,
    report,
    synthetic,
    timing,
)
from onnxcomp import auto as auto_mod
from onnxcomp import benchmark as bench_mod
from onnxcomp import executor as executor_mod
from onnxcomp import judge as judge_mod
from onnxcomp import model as model_io
from onnxcomp import recipe as recipe_mod
from onnxcomp.cli_options import (
    EXAMPLES,
    LOWRANK,
    PASS_FLAGS,
    GroupedCommand,
    calib_options,
    console,
    err_console,
    fail,
    first_inputs,
    image_preprocessing,
    input_options,
    load_calib,
    measure_options,
    parse_shapes,
    pass_fields,
    pass_options,
    progress_bar,
    run_body,
    write_json,
    write_text,
)
from onnxcomp.errors import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="onnxcomp")
def main(verbose: int) -> None:
    """onnxcomp: make convolutional networks smaller and faster by rewriting ONNX graphs."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, a pipeline's timeout) unwinds like Ctrl-C.

    Staging files are removed and an earlier output stays as it was.
    """
    raise SystemExit(128 + signum)


@main.command(cls=GroupedCommand, epilog=EXAMPLES)
@click.argument("model_path", metavar="IN.onnx", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Where to write the optimized model.")
@click.option("--pass", "passes", multiple=True, metavar="NAME",
              help="Pass to run (repeatable, runs in order). See `onnxcomp passes`.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Run the passes and options of this recipe file (TOML or .json) instead "
                   "of --pass and pass flags.")
@click.option("--auto", "auto_mode", is_flag=True,
              help="Choose the passes: the fastest plan within --max-drop (default "
                   f"{auto_mod.DEFAULT_MAX_DROP} without it) that meets --target-speedup "
                   "(int8, per-layer factorization, both, channel pruning; see the report).")
@click.option("--heldout", "heldout_path", type=click.Path(path_type=Path),
              help="Held-out data (like --calib, never used to compile): the final model's "
                   "fidelity on it is reported beside the calibration figure.")
@click.option("--score-threshold", "score_threshold", type=float, default=0.5,
              show_default=True,
              help="Sigmoid outputs (detector scores, probability maps): a value above this is "
                   "a confident detection; fidelity bounds keep the above-threshold sets.")
@click.option("--metric", "metric_spec", metavar="MODULE:FUNCTION",
              help="Your fidelity metric: FUNCTION(reference_outputs, new_outputs) per "
                   "calibration batch, a score in [0, 1]; bounds (--max-drop, --min-agreement) "
                   "then hold on it too. MODULE may be a file.py.")
@click.option("--labels", "labels_path", type=click.Path(path_type=Path),
              help="One class per calibration sample (.npy or .json): --max-drop then bounds "
                   "the drop in labelled accuracy too.")
@click.option("--save-recipe", "save_recipe", type=click.Path(path_type=Path),
              help="Write the run's passes and options as a recipe file (TOML).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the full report here: JSON, or a self-contained HTML page with "
                   "plots when the name ends in .html.")
@measure_options
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="--auto: compile the candidate plans in this many local worker processes "
                   "(they never time a model at once; see --latency-cache).")
@click.option("--latency-cache", "latency_cache", type=click.Path(path_type=Path),
              help="--rank auto: read latency measurements from this JSON file and record new "
                   "ones in it, so that a second compile replays the first one's choices "
                   "(kept per machine, ONNX Runtime version, provider and threads).")
@pass_options
@calib_options
def optimize(model_path: Path, output: Path, passes: Sequence[str], recipe_path: Path | None,
             auto_mode: bool, heldout_path: Path | None, score_threshold: float,
             metric_spec: str | None, labels_path: Path | None,
             save_recipe: Path | None, report_path: Path | None, bench: bool, provider: str,
             threads: int, runs: int, jobs: int, latency_cache: Path | None,
             groups: str | None,
             depth_multiplier: str | None, **kw: Any) -> None:
    """Rewrite IN.onnx with the given passes, verify, benchmark and write -o OUT.onnx."""
    from onnxcomp.passes import REGISTRY

    if sum([recipe_path is not None, bool(passes), auto_mode]) > 1:
        fail("give one of --pass, --recipe and --auto", code=2)
    if recipe_path is None and not passes and not auto_mode:
        fail("nothing to do: give --pass NAME (repeatable), --recipe FILE or --auto", code=2)
    unknown = [p for p in passes if p not in REGISTRY]
    if unknown:
        fail(f"unknown pass '{unknown[0]}' (available: {', '.join(REGISTRY)})", code=2)
    if output.resolve() == model_path.resolve():
        fail("output path is the input path: onnxcomp never overwrites its input", code=2)
    fields = pass_fields()
    calib_kw = {k: v for k, v in kw.items() if k not in fields}
    options: dict[str, Any] = {k: v for k, v in kw.items() if k in fields
                               and v is not None and v != ()}
    options.update(provider=provider, threads=threads,
                   latency_cache=str(latency_cache) if latency_cache else None)
    if recipe_path is not None:
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params
                 if p.name in PASS_FLAGS
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            fail(f"{given[0]}: with --recipe, pass options belong in the recipe", code=2)
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
        calib = load_calib(model, calib_kw)
        if calib.synthetic and any(s.name in LOWRANK and getattr(s.config, "rank", "") == "auto"
                                   for s in steps):
            err_console.print("[bold yellow]warning:[/] --rank auto without --calib: ranks are "
                              "chosen from weights alone", highlight=False)
        heldout = (load_calib(model, {**calib_kw, "calib_path": heldout_path})
                   if heldout_path is not None else None)
        metric, metric_name = (judge_mod.load_metric(metric_spec) if metric_spec
                               else (None, ""))
        judge = judge_mod.Judge(
            score_threshold, metric, metric_name,
            judge_mod.load_labels(labels_path) if labels_path is not None else None)
        run_ctx = passbase.RunContext(judge=judge, executor=executor_mod.make("local", jobs))
        chosen = None
        with progress_bar() as progress:
            task = progress.add_task("optimizing", total=None)
            if auto_mode:
                chosen = auto_mod.run_auto(model, calib, auto_mod.AutoConfig(
                    target_speedup=options.get("target_speedup"),
                    max_drop=options.get("max_drop", auto_mod.DEFAULT_MAX_DROP),
                    provider=provider, threads=threads, latency_cache=options["latency_cache"]),
                    context=run_ctx, on_step=lambda n: progress.update(task, description=n))
                result, steps = chosen.result, chosen.steps
            else:
                result = pipeline.run_pipeline(
                    model, steps, calib, context=run_ctx,
                    on_step=lambda n: progress.update(task, description=f"pass {n}"))
            if save_recipe is not None:
                write_text(save_recipe, recipe_mod.dump(steps))
            # Costs per sample (batch 1), like the latency figures.
            shapes = {k: (1, *v.shape[1:]) for k, v in calib.batches[0].items()}
            cost_before = cost.model_cost(model, shapes)
            cost_after = cost.model_cost(result.model, shapes)
            latency = None
            if bench:
                progress.update(task, description="benchmarking original vs optimized")
                latency = _latency(model, result.model, calib, provider, threads, runs,
                                   options.get("target_speedup"))
                provenance.set_model_meta(result.model, "onnxcomp.speedup",
                                          f"{latency['speedup']:.3f}")
            model_io.save(result.model, output)
        size_before = cost.file_size(model_path)
        size_after = cost.file_size(output)
        for step in result.steps:
            console.print(report.step_table(step))
        rows = report.summary_rows(cost_before, cost_after, size_before, size_after, latency,
                                   result)
        console.print(report.summary_table(rows, f"{model_path.name} -> {output.name}"))
        if latency is not None:
            console.print(f"speed: {latency['verdict']}", highlight=False)
        if calib.synthetic:
            console.print("[yellow]fidelity measured on synthetic inputs (no --calib)[/]")
        for step in result.steps:
            for warning in step.report.warnings:
                err_console.print(f"[bold yellow]warning:[/] {step.name}: {escape(warning.text)}",
                                  highlight=False)
        if chosen is not None:
            console.print(report.auto_table(chosen))
            if chosen.code != "target_met" and options.get("target_speedup") is not None:
                err_console.print(f"[bold yellow]warning:[/] auto: {escape(chosen.why)}",
                                  highlight=False)
        held = None
        if heldout is not None:
            held = report.heldout(model, result.model, calib, heldout,
                                  options.get("max_drop") if auto_mode else None, judge)
            console.print(held["text"], highlight=False)
            if held.get("warning"):
                err_console.print(f"[bold yellow]warning:[/] {escape(held['warning'])}",
                                  highlight=False)
        if report_path is not None:
            doc = {
                "input": str(model_path),
                "output": str(output),
                "measured_on": executor_mod.where(),
                "jobs": jobs,
                "calibration": {"source": calib.source, "synthetic": calib.synthetic,
                                "samples": calib.num_samples},
                "cost_before": cost_before.to_dict(),
                "cost_after": cost_after.to_dict(),
                "file_size": {"before": size_before, "after": size_after},
                "latency": latency,
                "realized": report.realized(latency, cost_before, cost_after),
                **result.to_dict(),
                **({"auto": chosen.to_dict()} if chosen is not None else {}),
                **({"heldout": held} if held is not None else {}),
            }
            if report_path.suffix.lower() in (".html", ".htm"):
                write_text(report_path, htmlreport.render(
                    json.loads(json.dumps(doc, default=str))))
            else:
                write_json(report_path, doc)

    run_body(body)


@main.command("optimize-many")
@click.argument("model_paths", metavar="IN.onnx...", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("-o", "--out-dir", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the outputs: NAME.onnx and NAME.report.json per model.")
@click.option("--pass", "passes", multiple=True, metavar="NAME",
              help="Pass to run on every model, with its default options (repeatable).")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Run this recipe on every model.")
@click.option("--auto", "auto_mode", is_flag=True,
              help="Choose the passes for every model (see optimize --auto).")
@click.option("--target-speedup", "target_speedup", type=float,
              help="--auto: the speed target.")
@click.option("--max-drop", "max_drop", type=float,
              help=f"--auto: the fidelity budget [default: {auto_mod.DEFAULT_MAX_DROP}].")
@click.option("--executor", "executor_kind", type=click.Choice(executor_mod.KINDS),
              default="local", show_default=True,
              help="local: --jobs worker processes here; ray: tasks of a Ray cluster "
                   "(--ray-address, or a local Ray runtime; pip install 'onnxcomp[ray]').")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Models compiled at once (local workers, or the CPUs of a local Ray).")
@click.option("--ray-address", "ray_address", help="--executor ray: the cluster to join.")
@measure_options
@calib_options
def optimize_many(model_paths: Sequence[Path], out_dir: Path, passes: Sequence[str],
                  recipe_path: Path | None, auto_mode: bool, target_speedup: float | None,
                  max_drop: float | None, executor_kind: str, jobs: int,
                  ray_address: str | None, bench: bool, provider: str, threads: int,
                  runs: int, **kw: Any) -> None:
    """Compile several models in one command, each with the same passes, recipe or --auto.

    Every model is one task of the executor; a model that fails is listed with its error and
    the others still compile (exit 1 when any failed). Latencies are measured where a task
    runs, which each report records (measured_on).
    """
    from onnxcomp.passes import REGISTRY

    if sum([recipe_path is not None, bool(passes), auto_mode]) != 1:
        fail("give one of --pass, --recipe and --auto", code=2)
    unknown = [p for p in passes if p not in REGISTRY]
    if unknown:
        fail(f"unknown pass '{unknown[0]}' (available: {', '.join(REGISTRY)})", code=2)
    stems = [p.stem for p in model_paths]
    if len(set(stems)) != len(stems):
        fail("two models share a file name; their outputs would collide", code=2)

    def body() -> None:
        base = {"provider": provider, "threads": threads}
        steps: tuple[pipeline.Step, ...] = ()
        auto_config = None
        if recipe_path is not None:
            steps = tuple(recipe_mod.load(recipe_path).steps(REGISTRY, base))
        elif passes:
            steps = tuple(pipeline.Step(n, REGISTRY[n].config_cls.from_options(base))
                          for n in passes)
        else:
            auto_config = auto_mod.AutoConfig(
                target_speedup=target_speedup,
                max_drop=auto_mod.DEFAULT_MAX_DROP if max_drop is None else max_drop,
                provider=provider, threads=threads)
        for path in model_paths:
            if not path.is_file():
                raise InputError(f"{path}: no such model file")
        out_dir.mkdir(parents=True, exist_ok=True)
        jobs_ = [api.Job(model=p, output=out_dir / f"{p.stem}.onnx", steps=steps,
                         auto=auto_config, calib=kw["calib_path"], image=image_preprocessing(kw),
                         calib_batch=kw["calib_batch"], num_calib=kw["num_calib"],
                         bench=bench, provider=provider, threads=threads, runs=runs,
                         report=out_dir / f"{p.stem}.report.json") for p in model_paths]
        runner = executor_mod.make(executor_kind, jobs, ray_address)
        with progress_bar() as progress:
            progress.add_task(f"compiling {len(jobs_)} models ({runner.kind}, "
                              f"{runner.jobs} at once)", total=None)
            try:
                summaries = api.many(jobs_, runner)
            finally:
                if hasattr(runner, "close"):
                    runner.close()
        console.print(report.many_table(summaries))
        failed = [s for s in summaries if s["error"]]
        for s in failed:
            err_console.print(f"[bold red]error:[/] {s['model']}: {escape(s['error'])}",
                              highlight=False)
        if failed:
            fail(f"{len(failed)} of {len(summaries)} models failed (listed above)")

    run_body(body)


def _latency(a: Any, b: Any, calib: calibration.Calibration, provider: str, threads: int,
             runs: int, target: float | None) -> dict[str, Any]:
    """Original vs optimized, interleaved, with a verdict that says how sure it is.

    The noise-aware timer measures longer while the rounds spread wide around the target.
    """
    first = {k: v[:1] for k, v in calib.batches[0].items()}
    config = bench_mod.BenchConfig(provider=provider, threads=threads, batch=1, runs=runs)
    timer = timing.Timer()
    res = timer.compare([a, b], config, first, around=target)
    sp = res.speedups[0]
    latency = {
        "provider": provider, "threads": threads, "runs": res.rounds,
        "before_ms": res.models[0].median_ms, "after_ms": res.models[1].median_ms,
        "speedup": sp.median, "speedup_p10": sp.p10, "speedup_p90": sp.p90,
        "repeats_for_noise": timer.spent.repeats,
    }
    latency["verdict"], latency["noisy"] = report.speed_verdict(latency, target)
    return latency


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="Show every layer (default: top 40).")
@input_options
def inspect(model_path: Path, as_json: bool, input_shapes: Sequence[str],
            show_all: bool, **kw: Any) -> None:
    """Per-layer params and MACs of MODEL, with totals."""
    shapes = parse_shapes(input_shapes)

    def body() -> None:
        model = model_io.load(model_path)
        feeds = first_inputs(model, kw, 1) or (synthetic.random_feeds(model, shapes) if shapes
                                          else None)
        mc = cost.cost_on(model, feeds)
        if mc.unknown_shapes:
            err_console.print(
                f"[bold yellow]warning:[/] {len(mc.unknown_shapes)} layers have symbolic input "
                "dims, their MACs are counted as 0: give --shape NAME=1x3xHxW or --inputs "
                "data.npz", highlight=False)
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

    run_body(body)


@main.command(name="bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(min=3), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for pipelines.")
@input_options
def bench_cmd(models: Sequence[Path], provider: str, threads: int, batch: int, runs: int,
              warmup: int, as_json: bool, input_shapes: Sequence[str], **kw: Any) -> None:
    """Latency of one or more models on ONNX Runtime, runs interleaved (first = baseline).

    Models with symbolic input dims need --inputs (real data) or --shape (random inputs).
    """
    shapes = parse_shapes(input_shapes)

    def body() -> None:
        loaded = [model_io.load(p) for p in models]
        feeds = first_inputs(loaded[0], kw, batch) or (
            synthetic.random_feeds(loaded[0], shapes) if shapes else None)
        config = bench_mod.BenchConfig(provider=provider, threads=threads, batch=batch,
                                       runs=runs, warmup=warmup)
        with progress_bar() as progress:
            progress.add_task(f"benchmarking {len(loaded)} model(s), {runs} rounds", total=None)
            res = bench_mod.benchmark(loaded, config, feeds, labels=[p.name for p in models])
        costs = [cost.cost_on(m, feeds) for m in loaded]
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

    run_body(body)


for _command in cli_tools.COMMANDS:
    main.add_command(_command)

__all__ = ["main", "InputError"]
