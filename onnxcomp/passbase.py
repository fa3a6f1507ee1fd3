"""The pass contract: Pass protocol, PassResult, Report, Change, Skip, SkipReason and errors.

A pass is a callable object ``pass_(model, config, calib) -> PassResult``. It never mutates its
input model; every candidate node it looks at ends up in ``report.applied`` or
``report.skipped`` (with a :class:`SkipReason`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from collections import Counter
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from onnxcomp import provenance
from onnxcomp.errors import (  # noqa: F401 - the pass contract names its errors
    ConfigError,
    InputError,
    OnnxcompError,
    PassError,
    PreconditionError,
)
from onnxcomp.executor import Executor, Serial
from onnxcomp.judge import Judge
from onnxcomp.timing import Timer

if TYPE_CHECKING:
    import onnx

    from onnxcomp.calibration import Calibration


class SkipReason(str, enum.Enum):
    """Why a candidate node was left alone. The value is the human-readable reason."""

    NOT_CONSTANT = "weight is not a constant (graph input or computed)"
    SHARED_WEIGHT = "weight is shared with a node outside the rewrite"
    UNSUPPORTED_DTYPE = "weight dtype is not supported"
    UNSUPPORTED_ATTRIBUTE = "attribute combination is not supported"
    UNSUPPORTED_PRODUCER = "the producer is not a supported op"
    MULTIPLE_CONSUMERS = "the tensor feeds more than one node"
    GRAPH_OUTPUT = "the tensor is a graph output"
    GROUPED = "grouped or depthwise conv"
    TOO_SMALL = "layer too small to be worth rewriting"
    NO_LATENCY_WIN = "no latency win"
    NO_MAC_WIN = "rewrite does not reduce MACs"
    ERROR_TOO_HIGH = "measured error above the bound"
    NOT_SELECTED = "rank allocation left it alone (error too high for its saving)"
    QUANTIZED = "already quantized"
    UNKNOWN_SHAPE = "shape could not be inferred"
    BLOCKED = "blocked by a coupled node"
    NOT_NEEDED = "no-op: nothing to change"
    DEGENERATE = "decomposition degenerate or did not converge"
    USER_EXCLUDED = "excluded by the user"


@dataclasses.dataclass(frozen=True)
class Change:
    """One applied rewrite of one original node."""

    node: str
    op_type: str
    what: str
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    error: float | None = None
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        d = dataclasses.asdict(self)
        d["details"] = dict(self.details)
        return d


@dataclasses.dataclass(frozen=True)
class Skip:
    """One candidate node the pass left alone, and why."""

    node: str
    op_type: str
    reason: SkipReason
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "node": self.node,
            "op_type": self.op_type,
            "reason": self.reason.name,
            "reason_text": self.reason.value,
            "detail": self.detail,
        }


TARGET_NOT_MET = "target_not_met"


@dataclasses.dataclass(frozen=True)
class ReportWarning:
    """Something the user must see: a stable ``code`` (what tools match) and the text."""

    code: str
    text: str

    def to_dict(self) -> dict[str, str]:
        """JSON-serializable form."""
        return {"code": self.code, "text": self.text}


class Note(str):
    """A note of a report: its text, and a stable ``code`` that tools and tests match.

    A ``str`` (the text) so notes print and join as before; the wording may change, the
    code does not.
    """

    code: str

    def __new__(cls, code: str, text: str) -> Note:
        """A note ``text`` under ``code``."""
        obj = super().__new__(cls, text)
        obj.code = code
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (Note, (self.code, str(self)))

    def to_dict(self) -> dict[str, str]:
        """JSON-serializable form."""
        return {"code": self.code, "text": str(self)}


@dataclasses.dataclass
class Report:
    """What one pass did: applied changes, skipped candidates, notes and warnings."""

    pass_name: str
    applied: list[Change] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    notes: list[Note] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[ReportWarning] = dataclasses.field(default_factory=list)

    def note(self, code: str, text: str, *, first: bool = False) -> None:
        """Record a note (``first``: ahead of the others)."""
        self.notes.insert(0 if first else len(self.notes), Note(code, text))

    @property
    def codes(self) -> set[str]:
        """The codes of every note and warning."""
        return {n.code for n in self.notes} | {w.code for w in self.warnings}

    def warn(self, code: str, text: str) -> None:
        """Record a warning the front ends show loudly (the CLI prints it to stderr)."""
        self.warnings.append(ReportWarning(code, text))

    def target_missed(self, text: str) -> None:
        """The pass could not reach the target it was given: say why (once), as a warning."""
        self.metrics["target_met"] = False
        if not any(w.code == TARGET_NOT_MET for w in self.warnings):
            self.warn(TARGET_NOT_MET, text)
        self.note(TARGET_NOT_MET, text)

    def apply(self, change: Change) -> None:
        """Record an applied change."""
        self.applied.append(change)

    def skip(self, node: str, op_type: str, reason: SkipReason, detail: str = "") -> None:
        """Record a skipped candidate."""
        self.skipped.append(Skip(node, op_type, reason, detail))

    def add_skip(self, skip: Skip) -> None:
        """Record a skip produced by a ``check()`` function."""
        self.skipped.append(skip)

    @property
    def totals(self) -> dict[str, int]:
        """Sums over the applied changes."""
        return {
            "applied": len(self.applied),
            "skipped": len(self.skipped),
            "params_before": sum(c.params_before for c in self.applied),
            "params_after": sum(c.params_after for c in self.applied),
            "macs_before": sum(c.macs_before for c in self.applied),
            "macs_after": sum(c.macs_after for c in self.applied),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {
            "pass": self.pass_name,
            "applied": [c.to_dict() for c in self.applied],
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": [n.to_dict() for n in self.notes],
            "warnings": [w.to_dict() for w in self.warnings],
            "metrics": dict(self.metrics),
            "totals": self.totals,
        }


@dataclasses.dataclass(frozen=True)
class PassResult:
    """A pass's output: the new model (a fresh object) and its report."""

    model: onnx.ModelProto
    report: Report

    @property
    def modified(self) -> bool:
        """True when at least one change was applied."""
        return bool(self.report.applied)


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base class of pass configurations (frozen, validated in ``__post_init__``)."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any], strict: bool = False) -> PassConfig:
        """Build a config from a mapping, keeping only the keys this config knows.

        ``strict``: a key it does not know is an error (naming the closest option), not
        dropped (the command line hands every pass the options of all of them).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in options if k not in names)
        if strict and unknown:
            raise ConfigError(unknown_option(unknown[0], names, cls.__name__))
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})


def unknown_option(key: str, known: Collection[str], where: str) -> str:
    """``unknown option 'x' for where (did you mean 'y'?)``."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown option '{key}' for {where}{hint}"


C = TypeVar("C", bound=PassConfig, contravariant=True)
CC = TypeVar("CC", bound=PassConfig)
# Node provenance (see graph.py, which writes it) and warning codes the base class uses.
PROVENANCE_KEY = provenance.PASS_KEY
SYNTHETIC_CALIBRATION = "synthetic_calibration"
NOTHING_TO_DO = "nothing_to_do"


@dataclasses.dataclass
class RunContext:
    """What a run hands every pass besides the model: the services they share.

    ``timer`` is the one measurement service (memo, latency cache, noise handling); a
    pipeline gives all its passes the same one, and tests give a :class:`Timer` over a
    modelled benchmark instead of timing.
    """

    timer: Timer = dataclasses.field(default_factory=Timer)
    # How fidelity is judged beyond what the outputs' producers say (threshold, metric, labels).
    judge: Judge = dataclasses.field(default_factory=Judge)
    # Where independent expensive work runs (onnxcomp/executor.py): here, or --jobs workers.
    executor: Executor = dataclasses.field(default_factory=Serial)


class Pass(Protocol[C]):
    """A functional graph rewrite."""

    name: ClassVar[str]
    lossless: ClassVar[bool]
    config_cls: ClassVar[type[PassConfig]]

    def __call__(
        self, model: onnx.ModelProto, config: C, calib: Calibration | None = None,
        context: RunContext | None = None,
    ) -> PassResult:
        """Rewrite a copy of ``model``; never mutate ``model``."""
        ...


SYNTHETIC_NOTE = ("synthetic calibration: refits, ranges and errors come from random inputs "
                  "(weights alone); give --calib for meaningful results")


class PassBase(Generic[CC]):
    """The base of every pass: ``__call__`` enforces the contract, passes implement ``call``.

    (After onnx-ir's PassBase.) ``__call__`` checks the config's type, runs :meth:`requires`
    (raise :class:`PreconditionError` before any work), gives passes that read calibration
    data synthetic inputs when there are none (and says so), runs :meth:`call` and checks
    :meth:`ensures`: a new model object, every node the pass created tagged with its name.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool]
    config_cls: ClassVar[type[PassConfig]]
    # Passes whose rewrite reads calibration data (refits, ranges, sensitivity).
    uses_calibration: ClassVar[bool] = False
    # A pass that rewrites ops through a converter it does not control (opset) cannot tag.
    tags_new_nodes: ClassVar[bool] = True

    def __init_subclass__(cls, *, name: str | None = None, lossless: bool | None = None,
                          config: type[PassConfig] | None = None,
                          calibration: bool | None = None, **kwargs: Any) -> None:
        """A pass states its contract in its class line.

        ``class P(PassBase[PConfig], name="p", lossless=False)``: ``config`` defaults to the
        type argument.
        """
        super().__init_subclass__(**kwargs)
        if config is None:  # class P(PassBase[PConfig], ...): the config type is the argument
            for base in getattr(cls, "__orig_bases__", ()):
                args = typing.get_args(base)
                if typing.get_origin(base) is PassBase and args and isinstance(args[0], type):
                    config = args[0]
        for attr, value in (("name", name), ("lossless", lossless), ("config_cls", config),
                            ("uses_calibration", calibration)):
            if value is not None:
                setattr(cls, attr, value)

    def __call__(self, model: onnx.ModelProto, config: CC, calib: Calibration | None = None,
                 context: RunContext | None = None) -> PassResult:
        """Rewrite a copy of ``model``; never mutate ``model``."""
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"{self.name} needs a {self.config_cls.__name__}, got "
                              f"{type(config).__name__}")
        self.requires(model, config)
        synthetic = False
        if self.needs_calibration(config) and (calib is None or calib.synthetic):
            if calib is None:
                from onnxcomp.synthetic import synthetic_calibration

                calib = synthetic_calibration(model, num_samples=8)
            synthetic = True
        result = self.call(model, config, calib, context or RunContext())
        if synthetic:
            result.report.metrics[SYNTHETIC_CALIBRATION] = True
            if SYNTHETIC_CALIBRATION not in {n.code for n in result.report.notes}:
                result.report.note(SYNTHETIC_CALIBRATION, SYNTHETIC_NOTE)
        self.ensures(model, result)
        # In-place changes get their tag too; replaced nodes' stand-ins get the error measured.
        provenance.tag_changed(model, result.model, self.name)
        provenance.record_errors(result.model, {c.node: c.error for c in result.report.applied
                                                if c.error is not None})
        return result

    def needs_calibration(self, config: CC) -> bool:
        """Whether this run reads calibration data (by default: ``uses_calibration``)."""
        return self.uses_calibration

    def requires(self, model: onnx.ModelProto, config: CC) -> None:
        """Raise :class:`PreconditionError` when the model as a whole is not supported."""

    def call(self, model: onnx.ModelProto, config: CC, calib: Calibration | None,
             ctx: RunContext) -> PassResult:
        """The rewrite itself (on a copy; ``calib`` is synthetic when the user gave none)."""
        raise NotImplementedError

    def ensures(self, before: onnx.ModelProto, result: PassResult) -> None:
        """Raise :class:`PassError` when the result breaks the contract."""
        if result.model is before:
            raise PassError(f"pass '{self.name}' returned its input model object")
        if not self.tags_new_nodes:
            return
        old = {n.name for n in before.graph.node}
        # Unnamed nodes of the input come back named (the export names them): not new.
        unnamed = Counter(n.op_type for n in before.graph.node if not n.name)
        tag = f"{PROVENANCE_KEY}={self.name}"
        untagged = []
        for n in result.model.graph.node:
            if n.name in old or tag in n.doc_string or any(
                    p.key == PROVENANCE_KEY and p.value == self.name for p in n.metadata_props):
                continue
            if unnamed[n.op_type] > 0:
                unnamed[n.op_type] -= 1
                continue
            untagged.append(n.name or n.op_type)
        if untagged:
            raise PassError(f"pass '{self.name}' created nodes without its provenance tag: "
                            f"{', '.join(untagged[:5])}")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           flag: str | None = None) -> Any:
    """A config field that is also a command-line option (``--field-name``).

    The CLI generates its pass options from these fields: ``help`` is the option's help,
    ``choices`` restricts a string, ``flag`` overrides the option's declaration (e.g.
    ``"--reduce-range/--full-range"``). Fields made without it are not on the command line.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "flag": flag})


# Options several passes share: one definition, one help text.
def exclude_option() -> Any:
    """``--exclude NODE`` (repeatable)."""
    return option((), "Leave this node alone (repeatable).")


def seed_option() -> Any:
    """``--seed``."""
    return option(0, "Seed of every random choice (same inputs and seed: same bytes out).")


def refit_option() -> Any:
    """``--refit/--no-refit``."""
    return option(True, "Refit the rewritten layers on the calibration data (--no-refit "
                        "keeps the raw decomposition).")


def refit_mode_option() -> Any:
    """``--refit-mode``."""
    return option("asymmetric", "asymmetric: refit on the compressed network's activations; "
                                "symmetric: on the original's.",
                  choices=("asymmetric", "symmetric"))


def target_speedup_option() -> Any:
    """``--target-speedup``."""
    return option(None, "--rank auto and prune_*: measured ORT speedup of the output model "
                        "over IN.onnx (what earlier passes of the run bring counts).")


@dataclasses.dataclass(frozen=True)
class TargetConfig(PassConfig):
    """The options of a pass that refits and reaches a measured ``--target-speedup``."""

    target_speedup: float | None = target_speedup_option()
    refit: bool = refit_option()
    exclude: tuple[str, ...] = exclude_option()
    provider: str = "cpu"
    threads: int = 1
    bench_runs: int = 30
