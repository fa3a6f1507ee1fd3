"""Recipes: the passes of a run and their options, in a file a deployment pipeline can keep.

A recipe is TOML (or JSON with the same structure)::

    [defaults]              # optional: options for every pass that has them (like CLI flags)
    provider = "cpu"

    [[pass]]
    name = "canonicalize"

    [[pass]]
    name = "cp"
    rank = "auto"
    target-speedup = 2.0    # dashes or underscores

Option names are the pass config's fields (the CLI flag names without ``--``); a key that no
pass of the recipe knows is an error, so a typo never passes silently. ``onnxcomp optimize
--save-recipe`` writes the recipe of a command-line run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from onnxcomp.errors import ConfigError
from onnxcomp.passbase import PassConfig

if TYPE_CHECKING:
    from onnxcomp.passbase import Pass
    from onnxcomp.pipeline import Step

# Per-pass names of the rank option (the CLI's --groups / --depth-multiplier).
RANK_ALIASES = {"kernel_sharing": "groups", "depthwise_separable": "depth_multiplier"}


# Options that belong to one machine's run, not to the recipe (given on the command line).
NOT_SAVED = frozenset({"latency_cache"})


class RecipeError(ConfigError):
    """A recipe that cannot be read or does not describe a valid run."""


def _key(name: str) -> str:
    return name.replace("-", "_")


def _field_types(cls: type[PassConfig]) -> dict[str, set[type]]:
    """The plain types each config field accepts (``float | None`` -> {float, NoneType})."""
    hints = typing.get_type_hints(cls)
    out: dict[str, set[type]] = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name, Any)
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        out[f.name] = {typing.get_origin(a) or a for a in args if a is not Any}
    return out


def _coerce(value: Any, accepted: set[type], where: str) -> Any:
    """Turn a TOML/JSON value into the field's type; reject what does not fit."""
    if not accepted or type(value) in accepted:
        return value
    if isinstance(value, list) and tuple in accepted:
        return tuple(value)
    if isinstance(value, bool):
        raise RecipeError(f"{where}: expected {_names(accepted)}, got a boolean")
    if isinstance(value, int) and float in accepted:
        return float(value)
    if isinstance(value, int | float) and str in accepted:
        return str(value)  # rank = 0.25 or rank = 8 mean what "--rank 0.25" means
    raise RecipeError(f"{where}: expected {_names(accepted)}, got {type(value).__name__} "
                      f"{value!r}")


def _names(types_: set[type]) -> str:
    return " or ".join(sorted(t.__name__ for t in types_ if t is not type(None)))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Passes in order with their own options, and options shared by all of them."""

    passes: tuple[tuple[str, dict[str, Any]], ...]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    def steps(self, registry: Mapping[str, Pass[Any]],
              base: Mapping[str, Any] | None = None) -> list[Step]:
        """Pipeline steps: per-pass options over ``defaults`` over ``base`` (run-level flags).

        Raises :class:`RecipeError` for an unknown pass or option, a value of the wrong type,
        or a config that rejects its values.
        """
        from onnxcomp.pipeline import Step

        known_anywhere: set[str] = set()
        steps = []
        for index, (name, options) in enumerate(self.passes, start=1):
            where = f"pass {index} ({name})"
            if name not in registry:
                raise RecipeError(f"{where}: unknown pass (available: {', '.join(registry)})")
            cls = registry[name].config_cls
            fields = _field_types(cls)
            known_anywhere |= set(fields)
            alias = RANK_ALIASES.get(name)
            if alias:
                known_anywhere.add(alias)
            merged: dict[str, Any] = {k: v for k, v in (base or {}).items() if k in fields}
            for source, opts in (("defaults", self.defaults), (where, options)):
                for key, value in opts.items():
                    field = "rank" if alias and key == alias else key
                    if field not in fields:
                        if source == "defaults":
                            continue  # checked below: some pass must know it
                        known = sorted(f.replace("_", "-") for f in fields
                                       if f not in NOT_SAVED)
                        close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
                        raise RecipeError(f"{where}: unknown option '{key}'"
                                          + (f" (did you mean '{close[0]}'?)" if close else "")
                                          + f" (known: {', '.join(known)})")
                    merged[field] = _coerce(value, fields[field], f"{where}: option '{key}'")
            try:
                config = cls(**merged)
            except (ConfigError, TypeError) as exc:
                raise RecipeError(f"{where}: {exc}") from exc
            steps.append(Step(name, config))
        unused = sorted(set(self.defaults) - known_anywhere)
        if unused:
            raise RecipeError(f"[defaults]: no pass of the recipe has option '{unused[0]}'")
        return steps


def parse(doc: Mapping[str, Any]) -> Recipe:
    """A recipe from its parsed TOML/JSON document."""
    if not isinstance(doc, Mapping):
        raise RecipeError("a recipe is a table with a 'pass' list")
    extra = sorted(set(doc) - {"pass", "defaults", "version"})
    if extra:
        raise RecipeError(f"unknown top-level key '{extra[0]}' (known: pass, defaults, "
                          f"version)")
    if doc.get("version", 1) != 1:
        raise RecipeError(f"recipe version {doc['version']!r} is not supported (1 is)")
    entries = doc.get("pass")
    if not isinstance(entries, list) or not entries:
        raise RecipeError("a recipe needs at least one [[pass]] with a name")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise RecipeError("[defaults] must be a table of options")
    passes = []
    for index, entry in enumerate(entries, start=1):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise RecipeError(f"pass {index}: needs name = \"<pass>\"")
        passes.append((entry["name"], {_key(k): v for k, v in entry.items() if k != "name"}))
    return Recipe(tuple(passes), {_key(k): v for k, v in defaults.items()})


def load(path: Path) -> Recipe:
    """Read a recipe file (``.json`` as JSON, anything else as TOML)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(text) if Path(path).suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"recipe {path} is not valid "
                          f"{'JSON' if Path(path).suffix == '.json' else 'TOML'}: {exc}") from exc
    return parse(doc)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise RecipeError(f"cannot write {value!r} to a recipe")


def dump(steps: Sequence[Step]) -> str:
    """TOML text of ``steps``: each pass with the options that differ from its defaults."""
    lines = ["# onnxcomp recipe: onnxcomp optimize IN.onnx -o OUT.onnx --recipe THIS "
             "--calib DATA", ""]
    for step in steps:
        lines.append("[[pass]]")
        lines.append(f"name = {json.dumps(step.name)}")
        defaults = type(step.config)()
        for f in dataclasses.fields(step.config):
            value = getattr(step.config, f.name)
            if value == getattr(defaults, f.name) or f.name in NOT_SAVED:
                continue
            lines.append(f"{f.name.replace('_', '-')} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
