"""Tucker-2 decomposition of Conv into 1x1 -> kh x kw core -> 1x1 (lossy).

Paper: Y.-D. Kim, E. Park, S. Yoo, T. Choi, L. Yang, D. Shin, "Compression of Deep
Convolutional Neural Networks for Fast and Low Power Mobile Applications", ICLR 2016,
arXiv:1511.06530 (Tucker-2 on the channel modes); refit as in Zhang et al. 2016,
arXiv:1505.06798.

Before::

    x[C,H,W] -> Conv(W[O,C,kh,kw], b) -> y

After (ranks R1 <= C, R2 <= O; W ~ core x_0 U_out x_1 U_in)::

    x -> Conv 1x1 (U_in^T: C->R1) -> Conv kh x kw (core: R1->R2, original stride/pads)
      -> Conv 1x1 (U_out: R2->O, b)

With calibration data (``--basis data``, the default) ``U_out`` keeps the principal subspace
of the layer's outputs on that data instead of the leading singular vectors of ``W``'s output
unfolding (see ``lowrank.tucker2_conv_data``); ``--basis weights`` is the plain HOOI.

MACs per output pixel: C*R1 (at input resolution) + R1*R2*kh*kw + R2*O. Ranks keep the
layer's C:O proportions. The last 1x1 and the bias are refit by least squares.

Supported: 2-D Conv, group 1, kh*kw > 1, constant float weights. Skipped, with a reason:
1x1 kernels (use svd), grouped convs, non-constant or shared weights, tiny layers, no MAC or
latency win.
"""

from __future__ import annotations

import numpy as np

from onnxcomp import lowrank
from onnxcomp import passbase as pb
from onnxcomp.chain import conv_hw, full_attrs
from onnxcomp.decompose import DecompositionPass, LowRankConfig
from onnxcomp.linear import Layer, Plan, Stage, round_up, skip_pointwise
from onnxcomp.moments import OutputBases, data_basis_generalizes

FRACTIONS = (0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5, 0.625, 0.75)


class TuckerMethod:
    """Tucker-2 chains for 2-D convs."""

    name = "tucker"
    ops = ("Conv",)
    data_basis = True  # the driver gathers input covariances for --basis data

    def __init__(self) -> None:
        self._basis = OutputBases()


    def check(self, layer: Layer) -> pb.Skip | None:
        """Skip 1x1 kernels."""
        return skip_pointwise(layer)

    def _ranks(self, layer: Layer, fraction: float, multiple: int) -> tuple[int, int]:
        o, c = layer.weight.shape[:2]
        return (min(c, round_up(fraction * c, multiple)), min(o, round_up(fraction * o, multiple)))

    def _macs(self, layer: Layer, r_in: int, r_out: int) -> int:
        o, c, kh, kw = layer.weight.shape
        in_hw, out_hw = conv_hw(layer)
        return lowrank.tucker2_macs((o, c, kh, kw), r_in, r_out, in_hw, out_hw)

    def rank_options(self, layer: Layer, config: LowRankConfig) -> list[tuple[int, ...]]:
        """(R1, R2) pairs at fixed fractions of (C, O) that cost fewer MACs than the layer."""
        out: list[tuple[int, ...]] = []
        for f in FRACTIONS:
            ranks = self._ranks(layer, f, config.rank_multiple)
            if ranks not in out and self._macs(layer, *ranks) < layer.macs:
                out.append(ranks)
        return out

    def fixed_rank(self, layer: Layer, config: LowRankConfig) -> tuple[int, ...]:
        """``--rank N``: (min(N, C), min(N, O)); ``--rank f``: f of (C, O)."""
        o, c = layer.weight.shape[:2]
        if isinstance(config.rank, int):
            return (min(config.rank, c), min(config.rank, o))
        assert isinstance(config.rank, float)
        return self._ranks(layer, config.rank, config.rank_multiple)

    def plan(self, layer: Layer, ranks: tuple[int, ...], config: LowRankConfig) -> Plan:
        """HOOI Tucker-2 at (R1, R2) and the chain's stages."""
        r_in, r_out = ranks
        g = layer.geom
        assert g is not None
        w = layer.weight.astype(np.float64)
        o, c, kh, kw = w.shape
        weights_fit = lowrank.tucker2_conv(w, rank_out=r_out, rank_in=r_in)
        res, basis = weights_fit, "weights"
        if config.basis == "data" and layer.input_cov is not None:
            def fit(cov: np.ndarray | None, half: int) -> np.ndarray:
                if cov is None:
                    return weights_fit.reconstruct().reshape(o, -1)
                return lowrank.tucker2_conv_data(w, cov, r_out, r_in, basis=self._basis.get(
                    layer, half)).reconstruct().reshape(o, -1)

            if data_basis_generalizes(layer.matrix, layer.input_cov_halves, fit):
                res = lowrank.tucker2_conv_data(w, layer.input_cov, r_out, r_in,
                                                basis=self._basis.get(layer, -1))
                basis = "data"
            else:
                basis = "weights (the data basis did not help across calibration halves)"
        first, core, last = res.conv_weights()
        stages = [
            Stage("conv", first, {}, "pw_in"),
            Stage("conv", core, full_attrs(g), "core"),
        ]
        prefix = np.einsum("pqab,cq->pcab", res.core, res.U_in).reshape(r_out, -1)
        return Plan(
            method=self.name, ranks=(r_in, r_out), stages=stages, last_attrs={},
            last_shape=(o, r_out, 1, 1), prefix=prefix, last=res.U_out.copy(),
            weight_error=res.rel_error, macs=self._macs(layer, r_in, r_out),
            params=c * r_in + r_in * r_out * kh * kw + r_out * o + o,
            extra={"basis": basis},
        )


class Tucker(DecompositionPass, name="tucker", lossless=False, config=LowRankConfig):
    """The ``tucker`` pass."""

    method_cls = TuckerMethod


PASS = Tucker()
