"""Kernel sharing (KSC / weighted KSC): input channels grouped to share one kernel (lossy).

Source: the "Efficient Kernel Sharing Convolutional Neural Networks" thesis this project is
seeded with (it trains the shared structure; here a trained conv is converted to it). The
fit is in :mod:`onnxcomp.sharing`; refit and rank (group count) choice in
:mod:`onnxcomp.decompose`, shared with the low-rank passes.

Before / after::

    x[C,H,W] -> Conv kh x kw (W[O,C,kh,kw], b) -> y

    x -> Conv 1x1 (S[G,C]: S[g,c] = alpha_c if channel c is in group g, else 0)
      -> Conv kh x kw (K[O,G,kh,kw], b; the original stride/pads/dilations) -> y
         W[:, c] ~ alpha_c K[:, g(c)]    (KSC: alpha_c = 1; WKSC: one weight per channel)

MACs per output pixel: G*O*kh*kw, plus C*G per input pixel for the 1x1. The shared kernels
``K`` and the bias are refit by least squares on calibration data (the 1x1 stays fixed).
``--groups G`` (``--rank`` works too), ``--groups auto`` with the low-rank targets;
``--no-weighted`` for plain KSC.

Supported: 2-D Conv, group 1, kh*kw > 1, constant float weights. Skipped, with a reason:
1x1 kernels (use svd), grouped convs, non-constant or shared weights, tiny layers, no MAC or
latency win.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxcomp import passbase as pb
from onnxcomp import sharing
from onnxcomp.chain import conv_hw, full_attrs
from onnxcomp.decompose import DecompositionPass, LowRankConfig
from onnxcomp.linear import Layer, Plan, Stage, rank_ladder, round_up, skip_pointwise


@dataclasses.dataclass(frozen=True)
class KernelSharingConfig(LowRankConfig):
    """Low-rank options, with ``rank`` = the number of groups; ``weighted``: WKSC."""

    weighted: bool = pb.option(
        True,
        'kernel_sharing: one weight per input channel (weighted KSC) or plain KSC.')


class KernelSharingMethod:
    """KSC / WKSC for dense 2-D convs."""

    name = "kernel_sharing"
    ops = ("Conv",)

    def check(self, layer: Layer) -> pb.Skip | None:
        """Skip 1x1 kernels: sharing there is a (worse) low-rank factorization."""
        return skip_pointwise(layer)

    @staticmethod
    def macs(layer: Layer, groups: int) -> int:
        """MACs of the 1x1 sharing stage plus the shared kxk conv."""
        o, c, kh, kw = layer.weight.shape
        in_hw, out_hw = conv_hw(layer)
        return c * groups * in_hw[0] * in_hw[1] + groups * o * kh * kw * out_hw[0] * out_hw[1]

    def max_groups(self, layer: Layer) -> int:
        """The largest group count below C that costs fewer MACs than the layer."""
        c = layer.weight.shape[1]
        per = self.macs(layer, 1)
        return max(1, min(c - 1, (layer.macs - 1) // max(per, 1)))

    def rank_options(self, layer: Layer, config: LowRankConfig) -> list[tuple[int, ...]]:
        """Group counts (multiples of ``rank_multiple``) below the MAC break-even."""
        return [(g,) for g in rank_ladder(self.max_groups(layer), config.rank_multiple)]

    def fixed_rank(self, layer: Layer, config: LowRankConfig) -> tuple[int, ...]:
        """``--groups G`` (capped at C); ``--groups f``: f of the break-even group count."""
        c = layer.weight.shape[1]
        if isinstance(config.rank, int):
            return (min(config.rank, c),)
        assert isinstance(config.rank, float)
        top = self.max_groups(layer)
        return (min(top, round_up(config.rank * top, config.rank_multiple)),)

    def plan(self, layer: Layer, ranks: tuple[int, ...], config: LowRankConfig) -> Plan:
        """Fit the shared kernels and build the 1x1 -> kxk chain."""
        (groups,) = ranks
        g = layer.geom
        assert g is not None
        weighted = bool(getattr(config, "weighted", True))
        o, c, kh, kw = layer.weight.shape
        res = sharing.kernel_sharing(layer.weight, groups, weighted=weighted, seed=config.seed)
        share = res.share_matrix()  # [G, C]
        sizes = np.bincount(res.groups, minlength=groups)
        k = kh * kw
        prefix = np.kron(share, np.eye(k))  # [(g,i,j), (c,i,j)]
        stages = [Stage("conv", share.reshape(groups, c, 1, 1), {}, "share")]
        return Plan(
            method=self.name, ranks=(groups,), stages=stages, last_attrs=full_attrs(g),
            last_shape=(o, groups, kh, kw), prefix=prefix,
            last=res.kernels.reshape(o, groups * k), weight_error=res.rel_error,
            macs=self.macs(layer, groups), params=groups * c + groups * o * k + o,
            extra={"weighted": weighted, "group_size_range": [int(sizes.min()),
                                                               int(sizes.max())]},
        )


class KernelSharing(DecompositionPass, name="kernel_sharing", lossless=False,
                    config=KernelSharingConfig):
    """The ``kernel_sharing`` pass."""

    method_cls = KernelSharingMethod


PASS = KernelSharing()
