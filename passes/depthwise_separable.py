"""Depthwise-separable approximation of a dense conv (optionally after kernel sharing) (lossy).

MobileNet's building block (Howard et al. 2017, arXiv:1704.04861) obtained from a trained
dense conv instead of trained from scratch: per input channel, the ``[O, kh*kw]`` slice of
the kernel is truncated by SVD to rank ``m`` (the depth multiplier); see
:mod:`onnxcomp.sharing`. With ``--share-groups G`` it follows weighted kernel sharing, the
combination the kernel-sharing thesis proposes: the channels are first folded into ``G``
shared groups, then the shared kernel is made depthwise-separable.

Before / after::

    x[C,H,W] -> Conv kh x kw (W[O,C,kh,kw], b) -> y

    x -> Conv kh x kw depthwise (D[C*m,1,kh,kw], group C; original stride/pads/dilations)
      -> Conv 1x1 (P[O, C*m], b) -> y
         W[o,c] ~ sum_j P[o, c*m+j] D[c*m+j]

    with --share-groups G:
    x -> Conv 1x1 (S[G,C], weighted sharing) -> Conv kh x kw depthwise (G*m, group G)
      -> Conv 1x1 (P[O, G*m], b) -> y

MACs per output pixel: C*m*kh*kw + C*m*O (G in place of C with sharing, plus C*G per input
pixel). The last 1x1 and the bias are refit by least squares on calibration data.
``--depth-multiplier m`` (``--rank`` works too) or ``auto`` with the low-rank targets.

Supported: 2-D Conv, group 1, kh*kw > 1, constant float weights. Skipped, with a reason:
1x1 kernels, grouped convs, non-constant or shared weights, tiny layers, no MAC or latency win.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxcomp import passbase as pb
from onnxcomp import sharing
from onnxcomp.chain import conv_hw, full_attrs
from onnxcomp.decompose import DecompositionPass, LowRankConfig
from onnxcomp.errors import ConfigError
from onnxcomp.linear import Layer, Plan, Stage, skip_pointwise


@dataclasses.dataclass(frozen=True)
class SeparableConfig(LowRankConfig):
    """Low-rank options with ``rank`` = the depth multiplier; ``share_groups``: WKSC first."""

    share_groups: int | None = pb.option(
        None,
        'depthwise_separable: fold input channels into G shared groups first (weighted kernel'
        ' sharing).')

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.share_groups is not None and self.share_groups < 1:
            raise ConfigError(f"--share-groups must be >= 1, got {self.share_groups}")


class SeparableMethod:
    """Depthwise-separable chains for dense 2-D convs."""

    name = "depthwise_separable"
    ops = ("Conv",)

    def __init__(self, share_groups: int | None = None) -> None:
        self.share_groups = share_groups

    def check(self, layer: Layer) -> pb.Skip | None:
        """Skip 1x1 kernels (nothing spatial to separate)."""
        return skip_pointwise(layer, "1x1 kernel: nothing to separate (use --pass svd)")

    def _channels(self, layer: Layer) -> int:
        c = layer.weight.shape[1]
        return c if self.share_groups is None else min(self.share_groups, c)

    def macs(self, layer: Layer, m: int) -> int:
        """MACs of the chain at depth multiplier ``m``."""
        o, c, kh, kw = layer.weight.shape
        in_hw, out_hw = conv_hw(layer)
        ch = self._channels(layer)
        out = ch * m * (kh * kw + o) * out_hw[0] * out_hw[1]
        if self.share_groups is not None:
            out += c * ch * in_hw[0] * in_hw[1]
        return out

    def max_multiplier(self, layer: Layer) -> int:
        """The largest multiplier within the slice rank that costs fewer MACs than the layer."""
        o, _, kh, kw = layer.weight.shape
        top = min(o, kh * kw)
        ok = [m for m in range(1, top + 1) if self.macs(layer, m) < layer.macs]
        return max(ok) if ok else 0

    def rank_options(self, layer: Layer, config: LowRankConfig) -> list[tuple[int, ...]]:
        """Every multiplier below the MAC break-even."""
        return [(m,) for m in range(1, self.max_multiplier(layer) + 1)]

    def fixed_rank(self, layer: Layer, config: LowRankConfig) -> tuple[int, ...]:
        """``--depth-multiplier m`` (capped at kh*kw); a fraction of the break-even one."""
        o, _, kh, kw = layer.weight.shape
        if isinstance(config.rank, int):
            return (min(config.rank, o, kh * kw),)
        assert isinstance(config.rank, float)
        return (max(1, int(round(config.rank * max(self.max_multiplier(layer), 1)))),)

    def plan(self, layer: Layer, ranks: tuple[int, ...], config: LowRankConfig) -> Plan:
        """Fit (sharing and) per-channel SVDs; build the chain."""
        (m,) = ranks
        g = layer.geom
        assert g is not None
        o, c, kh, kw = layer.weight.shape
        k = kh * kw
        kernel = layer.weight.astype(np.float64)
        stages: list[Stage] = []
        share = None
        extra: dict[str, object] = {"depth_multiplier": m}
        if self.share_groups is not None:
            groups = min(self.share_groups, c)
            shared = sharing.kernel_sharing(kernel, groups, weighted=True, seed=config.seed)
            share = shared.share_matrix()  # [G, C]
            kernel = shared.kernels
            stages.append(Stage("conv", share.reshape(groups, c, 1, 1), {}, "share"))
            extra["share_groups"] = groups
        ch = kernel.shape[1]
        m = min(m, kh * kw, o)
        res = sharing.depthwise_separable(kernel, m)
        stages.append(Stage("conv", res.depthwise, {**full_attrs(g), "group": ch},
                            "depthwise"))
        d = res.depthwise.reshape(ch, m, k)
        prefix = np.zeros((ch * m, ch * k))
        for i in range(ch):
            prefix[i * m:(i + 1) * m, i * k:(i + 1) * k] = d[i]
        if share is not None:
            prefix = prefix @ np.kron(share, np.eye(k))
        approx = res.reconstruct()
        if share is not None:
            approx = np.einsum("ogij,gc->ocij", approx, share)
        w = layer.weight.astype(np.float64)
        err = float(np.linalg.norm(approx - w) / max(float(np.linalg.norm(w)), 1e-30))
        params = ch * m * (k + o) + o + (c * ch if share is not None else 0)
        return Plan(
            method=self.name, ranks=(m,), stages=stages, last_attrs={},
            last_shape=(o, ch * m, 1, 1), prefix=prefix, last=res.pointwise.copy(),
            weight_error=err, macs=self.macs(layer, m), params=params, extra=extra,
        )


class DepthwiseSeparable(DecompositionPass, name="depthwise_separable", lossless=False,
                         config=SeparableConfig):
    """The ``depthwise_separable`` pass."""

    method_cls = SeparableMethod

    def method_for(self, config: LowRankConfig) -> SeparableMethod:
        """A method carrying ``share_groups``."""
        return SeparableMethod(getattr(config, "share_groups", None))


PASS = DepthwiseSeparable()
