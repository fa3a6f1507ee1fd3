"""How much of a layer's error reaches the model's outputs: one blended probe model.

Used by ``--rank auto`` to weight each layer's isolated error (:func:`layer_gains`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxcomp import runtime, verify
from onnxcomp.chain import np_dtype, write_chain
from onnxcomp.graph import Graph
from onnxcomp.refit import plan_ab, refit_rows_needed, refit_solution

if TYPE_CHECKING:
    from onnxcomp.allocate import LayerChoice, Option, Probes

# Sensitivity probes: calibration samples run (at least, at most: as many as fit the time
# budget in seconds) and the isolated error of the option each layer is probed with.
SENSITIVITY_SAMPLES = (8, 32)
SENSITIVITY_SECONDS = 6.0
SENSITIVITY_PROBE_ERROR = 0.05


def layer_gains(probes: Probes, usable: list[LayerChoice]) -> dict[int, float]:
    """Each layer's sensitivity: model output error per unit of its isolated error.

    One probe model holds every usable layer twice, the original and one rewritten option (the
    one whose isolated error is nearest :data:`SENSITIVITY_PROBE_ERROR`, symmetric refit),
    blended by a switch input per layer: ``y = y_orig + s * (y_chain - y_orig)``. Running it
    on 8 to 32 calibration samples (as many as fit :data:`SENSITIVITY_SECONDS`; whole batches
    spread over the set, see :func:`spread_batches`) with
    one switch on at a time gives the relative error of the model's outputs with that layer
    alone rewritten; divided by the option's isolated error, that is the layer's gain (about 1
    when its errors pass through, far below 1 when later layers wash them out, above 1 when
    they grow).
    """
    config = probes.config
    graph = Graph(probes.model, infer=False)  # chains are written from the layers' own shapes
    switches: dict[int, tuple[str, np.dtype[Any]]] = {}
    probed: dict[int, Option] = {}
    for ch in usable:
        opt = min(ch.options, key=lambda o: abs(np.log(max(o.error, 1e-6)
                                                        / SENSITIVITY_PROBE_ERROR)))
        if opt.error <= 0:
            continue
        node = next(n for n in graph.nodes if n.name == ch.layer.name)
        layer = dataclasses.replace(ch.layer, node=node)
        m = probes.moments[ch.index]
        xx, _, _ = m.normalized()
        ab = (refit_solution(layer, opt.plan, xx, None, config.ridge)
              if config.refit and m.rows >= refit_rows_needed(opt.plan)
              else plan_ab(layer, opt.plan))
        dtype = np_dtype(layer)
        x, y = node.inputs[0], node.outputs[0]
        y_orig = graph.variable(f"{node.name}_orig", dtype=dtype)
        node.outputs[0] = y_orig
        y_chain = graph.variable(f"{node.name}_chain", dtype=dtype)
        write_chain(graph, layer, opt.plan, ab, x, y_chain, "sensitivity")
        switch = graph.add_input(f"sensitivity_switch_{ch.index}", dtype=dtype, shape=[1])
        delta = graph.variable(f"{node.name}_delta", dtype=dtype)
        scaled = graph.variable(f"{node.name}_scaled", dtype=dtype)
        kw: dict[str, Any] = {"pass_name": "sensitivity", "origin": layer.name}
        graph.add_node("Sub", [y_chain, y_orig], [delta], suffix="delta", **kw)
        graph.add_node("Mul", [delta, switch], [scaled], suffix="scale", **kw)
        graph.add_node("Add", [y_orig, scaled], [y], suffix="blend", **kw)
        switches[ch.index] = (switch.name, dtype)
        probed[ch.index] = opt
    if not switches:
        return {}
    blended = graph.export(check=False)
    # Compile-time work, not a latency measurement: every core, graph optimizations on.
    session = runtime.make_session(blended, config.provider,
                                   max(config.threads, runtime.compute_threads()), optimize=True)
    names = runtime.output_names(session)
    sizes = probes.calib.batch_sizes()
    pairs = list(zip(probes.calib.batches, sizes, strict=True))

    def flags(on: int | None) -> dict[str, np.ndarray]:
        return {name: np.array([1.0 if i == on else 0.0], dtype=dt)
                for i, (name, dt) in switches.items()}

    # As many samples as fit the time budget (whole batches: a model may have a fixed batch).
    def fitting() -> float:
        start = time.perf_counter()
        session.run(names, {**pairs[0][0], **flags(None)})
        per_sample = (time.perf_counter() - start) / max(pairs[0][1], 1)
        want = int(SENSITIVITY_SECONDS / ((len(switches) + 1) * max(per_sample, 1e-6)))
        return float(min(max(want, SENSITIVITY_SAMPLES[0]), SENSITIVITY_SAMPLES[1]))

    want = int(probes.cached(f"sensitivity_samples {len(switches)}", fitting))
    batches = [pairs[i][0] for i in spread_batches([size for _, size in pairs], want)]

    def outputs(on: int | None) -> list[np.ndarray]:
        runs = [session.run(names, {**b, **flags(on)}) for b in batches]
        return [np.concatenate([r[k] for r in runs]) for k in range(len(names))]

    ref = outputs(None)
    gains = {}
    for index, opt in probed.items():
        err = verify.compare_outputs(names, ref, outputs(index)).rel_l2
        gains[index] = float(err / opt.error)
    return gains


def spread_batches(sizes: Sequence[int], want: int) -> list[int]:
    """Indices of whole batches holding about ``want`` samples, spread evenly over the set.

    Calibration sets come in runs of related samples (crops of one page or photo, files of one
    folder); the first batches alone would see only the first run.
    """
    total = sum(sizes)
    if want >= total:
        return list(range(len(sizes)))
    mean = total / max(len(sizes), 1)
    count = min(len(sizes), max(1, int(np.ceil(want / mean))))
    return sorted({int(round(i)) for i in np.linspace(0, len(sizes) - 1, count)})
