"""Per layer, the best of every factorization: svd, cp, tucker, kernel sharing, depthwise-separable.

Each layer gets the rank options of every method that can rewrite it (a 1x1 conv or an FC
layer: svd only; a kxk conv: all five), each with its isolated error after the refit and its
measured latency. The allocation (``onnxcomp.allocate``: the Lagrangian path of least
weighted error per saving, measured whole-model targets, fidelity bounds) then picks at most
one option per layer, whichever method it comes from: a layer whose kernels are nearly
separable gets spatial SVD, one whose channels are redundant gets Tucker-2 or kernel sharing.

Before / after: a layer is rewritten as the chain of the method its option comes from (see
passes/svd.py, cp.py, tucker.py, kernel_sharing.py, depthwise_separable.py); the report's
``details.method`` of each change names it.

Options: those of the low-rank passes (``--rank auto`` only: a fixed rank means one method),
``--methods`` to restrict the candidates. Compile time grows with the number of methods (each
layer's options are fit and timed for every method).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxcomp import passbase as pb
from onnxcomp.decompose import DecompositionPass, LowRankConfig
from onnxcomp.linear import Layer, Plan
from onnxcomp.passes.cp import CPMethod
from onnxcomp.passes.depthwise_separable import SeparableMethod
from onnxcomp.passes.kernel_sharing import KernelSharingMethod
from onnxcomp.passes.svd import SVDMethod
from onnxcomp.passes.tucker import TuckerMethod

METHODS: dict[str, Any] = {
    "svd": SVDMethod,
    "cp": CPMethod,
    "tucker": TuckerMethod,
    "kernel_sharing": KernelSharingMethod,
    "depthwise_separable": SeparableMethod,
}


@dataclasses.dataclass(frozen=True)
class FactorizeConfig(LowRankConfig):
    """Low-rank options (rank auto) and the methods to choose from."""

    methods: tuple[str, ...] = pb.option(
        tuple(METHODS),
        "factorize: the methods each layer may take (repeatable; default: all of "
        + ", ".join(METHODS) + ").", choices=tuple(METHODS))
    weighted: bool = True  # kernel sharing: one weight per input channel (WKSC)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.auto:
            raise pb.ConfigError("factorize chooses ranks itself: use --rank auto (a fixed rank "
                              "means one method: run that pass)")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise pb.ConfigError(f"--methods must name some of {', '.join(METHODS)}, got "
                              f"{', '.join(unknown) or 'none'}")


class MixedMethod:
    """Every option of several methods; an option's ranks start with its method's index."""

    name = "factorize"

    def __init__(self, methods: tuple[str, ...]) -> None:
        self.methods = [METHODS[m]() for m in methods]
        self.ops = tuple(dict.fromkeys(op for m in self.methods for op in m.ops))
        self.data_basis = any(getattr(m, "data_basis", False) for m in self.methods)

    def _able(self, layer: Layer) -> list[int]:
        return [k for k, m in enumerate(self.methods)
                if layer.op in m.ops and m.check(layer) is None]

    def check(self, layer: Layer) -> pb.Skip | None:
        """The first method's reason when no method can rewrite ``layer``."""
        if self._able(layer):
            return None
        for m in self.methods:
            if layer.op in m.ops and (skip := m.check(layer)) is not None:
                return skip
        return None

    def rank_options(self, layer: Layer, config: LowRankConfig) -> list[tuple[int, ...]]:
        """Every able method's options, tagged with the method's index."""
        return [(k, *ranks) for k in self._able(layer)
                for ranks in self.methods[k].rank_options(layer, config)]

    def fixed_rank(self, layer: Layer, config: LowRankConfig) -> tuple[int, ...]:
        """Not used: the config insists on --rank auto."""
        raise pb.ConfigError("factorize needs --rank auto")

    def plan(self, layer: Layer, ranks: tuple[int, ...], config: LowRankConfig) -> Plan:
        """The plan of the tagged method at the rest of ``ranks``."""
        return self.methods[ranks[0]].plan(layer, tuple(ranks[1:]), config)


class Factorize(DecompositionPass, name="factorize", lossless=False, config=FactorizeConfig):
    """The ``factorize`` pass."""

    def method_for(self, config: LowRankConfig) -> MixedMethod:
        """The mixed method over ``config.methods``."""
        assert isinstance(config, FactorizeConfig)
        return MixedMethod(config.methods)


PASS = Factorize()
