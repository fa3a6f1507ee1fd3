"""What the ``onnxcomp`` commands share: consoles, one-line errors, and their options.

Pass options are generated from the pass config fields (:func:`pass_options`), so an option
lives in one place; calibration, input and image options are shared by the commands that read
data. The commands themselves are in cli.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from onnxcomp import calibration, synthetic
from onnxcomp.errors import ConfigError, OnnxcompError

F = TypeVar("F", bound=Callable[..., Any])

# Wide tables when piped (CI logs, pipelines); the terminal's width otherwise.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


class CliError(click.ClickException):
    """A one-line error with its exit code (1: bad input, 2: usage, 3: internal).

    click's own UsageError prints the usage lines too; onnxcomp's rule is one line.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = code

    def show(self, file: Any = None) -> None:
        """Print ``error: message`` on stderr."""
        err_console.print(f"[bold red]error:[/] {escape(self.message)}", highlight=False,
                          soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Stop with ``error: message`` and exit ``code``."""
    raise CliError(message, code)


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


def apply(options: Sequence[Callable[[F], F]], func: F) -> F:
    """``func`` with ``options`` added, listed in --help in their order."""
    for option in reversed(options):
        func = option(func)
    return func


def measure_options(func: F) -> F:
    """Where and how the final benchmark measures: provider, threads, rounds."""
    return apply([
        click.option("--bench/--no-bench", default=True, show_default=True,
                     help="Measure ORT latency of original vs optimized (interleaved)."),
        click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]),
                     default="cpu", show_default=True),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True),
        click.option("--runs", type=click.IntRange(min=3), default=50, show_default=True,
                     help="Benchmark rounds."),
    ], func)


def calib_options(func: F) -> F:
    """Options shared by commands that read calibration data."""
    options = [
        click.option("--calib", "calib_path", type=click.Path(path_type=Path),
                     help="Calibration data: .npz (keys = input names), .npy, or image folder."),
        click.option("--num-calib", type=click.IntRange(min=1), default=None,
                     help="Use at most this many calibration samples."),
        click.option("--calib-batch", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Batch size for running calibration data."),
    ]
    return image_options(apply(options, func))


def input_options(func: F) -> F:
    """How ``inspect`` and ``bench`` learn input shapes: real inputs, or shapes."""
    options = [
        click.option("--inputs", "calib_path", type=click.Path(path_type=Path),
                     help="Inputs to measure with / infer shapes from: .npz (keys = input "
                          "names), .npy, or an image folder (see the image options)."),
        click.option("--shape", "--input-shape", "input_shapes", multiple=True,
                     metavar="NAME=1x3x640x640",
                     help="A concrete shape for an input with symbolic dims (repeatable)."),
    ]
    return image_options(apply(options, func))


def image_options(func: F) -> F:
    """Preprocessing of an image folder given as data."""
    options = [
        click.option("--size", help="Image folder: resize to H,W (default: model input)."),
        click.option("--mean", help="Image folder: per-channel mean, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Image folder: per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--scale", type=float, default=1 / 255, show_default="1/255",
                     help="Image folder: pixel scale applied before mean/std."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw",
                     show_default=True, help="Image folder: tensor layout."),
        click.option("--bgr", is_flag=True, help="Image folder: BGR channel order."),
    ]
    return apply(options, func)


@functools.cache
def pass_fields() -> dict[str, tuple[dataclasses.Field[Any], Any, list[str]]]:
    """Every pass config field made with :func:`onnxcomp.passbase.option`: (field, type, passes).

    One source for an option: its config field (name, default, help in the metadata). A field
    several passes share (``--exclude``, ``--target-speedup``) is one option.
    """
    from onnxcomp.passes import REGISTRY

    fields: dict[str, tuple[dataclasses.Field[Any], Any, list[str]]] = {}
    for name, pass_ in REGISTRY.items():
        hints = typing.get_type_hints(pass_.config_cls)
        for f in dataclasses.fields(pass_.config_cls):
            if "help" not in f.metadata:
                continue
            if f.name in fields:
                fields[f.name][2].append(name)
            else:
                fields[f.name] = (f, hints[f.name], [name])
    return fields


def _click_option(f: dataclasses.Field[Any], kind: Any) -> Callable[[F], F]:
    """The click option of one config field; unset options leave the config's default."""
    meta = f.metadata
    decl = meta.get("flag") or f"--{f.name.replace('_', '-')}"
    default = f.default
    shown = "inf" if default == float("inf") else default
    help_ = meta["help"] + ("" if default in (None, ()) else f" [default: {shown}]")
    args = typing.get_args(kind)
    base = next((a for a in args if a is not type(None)), kind) if args else kind
    if base is bool or kind == (bool | None):
        if meta.get("flag") is None:
            decl = f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}"
        return click.option(decl, f.name, default=None, help=help_)
    if typing.get_origin(kind) is tuple:
        if meta.get("choices"):
            return click.option(decl, f.name, multiple=True, help=help_,
                                type=click.Choice(meta["choices"]))
        return click.option(decl, f.name, multiple=True, metavar="NODE", help=help_)
    if meta.get("choices"):
        return click.option(decl, f.name, type=click.Choice(meta["choices"]), help=help_)
    click_type = {int: int, float: float}.get(base, str) if kind != (str | int | float) else str
    return click.option(decl, f.name, type=click_type, help=help_)


# Parameters of `optimize` that configure passes (a recipe holds them instead).
PASS_FLAGS = frozenset({*pass_fields(), "groups", "depth_multiplier"})
LOWRANK = ("cp", "tucker", "svd", "kernel_sharing", "depthwise_separable", "factorize")


def pass_options(func: F) -> F:
    """Every pass's options, generated from the config fields (see :func:`pass_fields`)."""
    options = [_click_option(f, kind) for f, kind, _ in pass_fields().values()]
    options += [
        click.option("--groups", help="kernel_sharing: shared kernels per layer (like --rank: "
                                      "auto, N or a fraction)."),
        click.option("--depth-multiplier", help="depthwise_separable: auto or N (like --rank)."),
    ]
    return apply(options, func)


def load_calib(model: Any, kw: dict[str, Any]) -> calibration.Calibration:
    """The calibration set of the calibration options (synthetic, said, without --calib)."""
    path = kw["calib_path"]
    if path is None:
        err_console.print(
            "[bold yellow]warning:[/] no --calib given: using synthetic random inputs; "
            "refits and fidelity figures are then meaningless", highlight=False)
        return synthetic.synthetic_calibration(
            model, num_samples=kw["num_calib"] or 8, batch_size=kw["calib_batch"])
    return calibration.load_calibration(path, model, image_preprocessing(kw),
                                        batch_size=kw["calib_batch"], limit=kw["num_calib"])


def image_preprocessing(kw: dict[str, Any]) -> calibration.ImageOptions | None:
    """The image preprocessing of the calibration options (None: not an image folder)."""
    image_given = (kw["size"] is not None or kw["mean"] is not None or kw["std"] is not None
                   or kw["scale"] != 1 / 255 or kw["layout"] != "nchw" or kw["bgr"])
    if not image_given and not (kw["calib_path"] and Path(kw["calib_path"]).is_dir()):
        return None
    return calibration.ImageOptions(
        size=_size(kw["size"]),
        mean=_floats(kw["mean"]) or (0.0, 0.0, 0.0),
        std=_floats(kw["std"]) or (1.0, 1.0, 1.0),
        scale=kw["scale"],
        layout=kw["layout"],
        bgr=kw["bgr"],
    )


def run_body(func: Callable[[], None]) -> None:
    """Run a command body, turning onnxcomp's own errors into a one-line message."""
    try:
        func()
    except click.ClickException:
        raise
    except ConfigError as exc:
        fail(str(exc), code=2)
    except OnnxcompError as exc:
        fail(str(exc))
    except Exception as exc:  # a bug or a runtime failure: one line, traceback with -v
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        text = str(exc).strip().splitlines()
        fail(f"internal error ({type(exc).__name__}): {text[0] if text else ''} "
              "(run with -vv for the traceback)", code=3)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (a half-written file never replaces a good one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON, atomically."""
    write_text(path, json.dumps(doc, indent=2, default=str))


def progress_bar() -> Progress:
    """A transient spinner on stderr."""
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    console=err_console, transient=True)


def parse_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """``NAME=1x3x640x640`` (or ``NAME=1,3,640,640``) specs as a dict."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.replace("x", ",").split(",")]
        except ValueError:
            fail(f"bad --shape '{spec}' (expected NAME=1x3x640x640)", code=2)
        if not name or any(d < 1 for d in shapes[name]):
            fail(f"bad --shape '{spec}' (expected NAME=1x3x640x640)", code=2)
    return shapes


def first_inputs(model: Any, kw: dict[str, Any], batch: int) -> dict[str, Any] | None:
    """The first ``batch`` samples of ``--inputs`` (None without it)."""
    if kw.get("calib_path") is None:
        return None
    data = calibration.load_calibration(kw["calib_path"], model, image_preprocessing(kw),
                                        batch_size=batch, limit=batch)
    return dict(data.batches[0])


# `optimize --help`: the run's own options first, then each kind of pass option.
RUN_GROUPS: dict[str, str] = {
    **dict.fromkeys(["output", "passes", "recipe_path", "auto_mode", "save_recipe",
                     "report_path", "help"], "What to run"),
    **dict.fromkeys(["calib_path", "num_calib", "calib_batch", "size", "mean", "std", "scale",
                     "layout", "bgr", "heldout_path"], "Data (--calib: .npz, .npy or images)"),
    **dict.fromkeys(["score_threshold", "metric_spec", "labels_path"],
                    "How fidelity is judged"),
    **dict.fromkeys(["bench", "provider", "threads", "runs", "jobs", "latency_cache"],
                    "Where and how latency is measured"),
}
EXAMPLES = """\b
Examples:
  onnxcomp optimize m.onnx -o out.onnx --pass fold_bn --pass cp \\
      --rank auto --target-speedup 2 --calib data.npz
  onnxcomp optimize m.onnx -o out.onnx --auto --target-speedup 2 \\
      --max-drop 0.01 --calib imgs/ --size 224 --report out.html
  onnxcomp optimize m.onnx -o out.onnx --recipe deploy.toml --calib data.npz

`onnxcomp explain PASS` describes one pass and its options; docs/options.md all of them."""


def option_group(name: str) -> str:
    """The --help section of an ``optimize`` parameter."""
    if name in RUN_GROUPS:
        return RUN_GROUPS[name]
    fields = pass_fields()
    if name in ("groups", "depth_multiplier"):
        return "Options of kernel_sharing / depthwise_separable"
    if name not in fields or len(fields[name][2]) > 2:
        return "Options several passes share"
    return f"Options of {' / '.join(fields[name][2])}"


class GroupedCommand(click.Command):
    """A command whose --help lists its options in sections (:func:`option_group`)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Options grouped by section, sections in first-seen order (run options first)."""
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(option_group(param.name or ""), []).append(record)
        order = [*dict.fromkeys(RUN_GROUPS.values()), "Options several passes share"]
        for title in sorted(sections, key=lambda t: (order.index(t) if t in order
                                                      else len(order), t)):
            with formatter.section(title):
                formatter.write_dl(sections[title])
