"""A file of measured latencies, so that a compile can be replayed.

Rank selection measures latencies (each rank option of each layer alone, and candidate models
whole), and on a shared machine those measurements move from run to run, so two compiles of
the same model can choose different ranks. With ``--latency-cache FILE`` every measurement is
looked up in the file first and recorded there otherwise: the second compile of the same model
with the same options reads the first one's measurements and writes the same bytes. Entries
are kept per machine (CPU model, core count, ONNX Runtime version, provider and threads); a
file measured elsewhere is ignored, never trusted.

Several compiles may share one file at once (``--jobs``, two pipelines): ``save`` takes an
exclusive lock on ``FILE.lock``, reads the file again, adds this run's new entries to what is
there and replaces the file atomically, so no entry is lost and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from onnxcomp.errors import InputError

FORMAT = "onnxcomp-latency-cache"
VERSION = 1


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(provider: str, threads: int) -> str:
    """What a measurement depends on besides the model: machine, runtime, provider, threads."""
    return (f"{cpu_name()} | {os.cpu_count()} cpus | onnxruntime {ort.__version__} | "
            f"{provider} x{threads}")


def structure_hash(model: onnx.ModelProto) -> str:
    """A digest of what a model's latency depends on: nodes, shapes, weight shapes (not values)."""
    h = hashlib.sha256()
    g = model.graph
    for node in g.node:
        h.update(node.SerializeToString())
    for init in g.initializer:
        h.update(f"{init.name}:{init.data_type}:{list(init.dims)};".encode())
    for value in [*g.input, *g.output]:
        h.update(value.SerializeToString())
    for opset in model.opset_import:
        h.update(f"{opset.domain}:{opset.version};".encode())
    return h.hexdigest()[:32]


class LatencyCache:
    """Measurements of one machine, read from and written back to ``path``."""

    def __init__(self, path: Path, provider: str, threads: int) -> None:
        self.path = Path(path)
        self.machine = machine_key(provider, threads)
        self.hits = 0
        self.measured = 0
        self._doc = self._read()
        self._entries: dict[str, Any] = self._doc["machines"].setdefault(self.machine, {})
        self._new: dict[str, Any] = {}  # put since the last save

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT, "version": VERSION, "machines": {}}
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"latency cache {self.path} cannot be read: {exc}") from exc
        if (not isinstance(doc, dict) or doc.get("format") != FORMAT
                or not isinstance(doc.get("machines"), dict)):
            raise InputError(f"latency cache {self.path} is not an onnxcomp latency cache")
        if doc.get("version") != VERSION:
            raise InputError(f"latency cache {self.path} has version {doc.get('version')!r}; "
                             f"this onnxcomp reads version {VERSION}")
        return doc

    def get(self, key: str) -> Any:
        """The recorded value of ``key`` on this machine, or None."""
        value = self._entries.get(key)
        if value is not None:
            self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        """Record a measurement."""
        self.measured += 1
        self._entries[key] = value
        self._new[key] = value

    def save(self) -> None:
        """Merge this run's new entries into the file, atomically and under its lock."""
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_name(f"{self.path.name}.lock")):
            doc = self._read()  # what other runs wrote since this one read the file
            entries = doc["machines"].setdefault(self.machine, {})
            entries.update(self._new)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
            tmp.replace(self.path)
        self._doc, self._entries = doc, entries
        self._new = {}

    def stats(self) -> dict[str, Any]:
        """Hits and new measurements, for the report."""
        return {"file": str(self.path), "hits": self.hits, "measured": self.measured}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; elsewhere none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
