"""CP decomposition of Conv into a 1x1 -> depthwise kx1 -> depthwise 1xk -> 1x1 chain (lossy).

Papers: V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky, "Speeding-up
Convolutional Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015, arXiv:1412.6553;
A.-H. Phan et al., "Stable Low-rank Tensor Decomposition for Compression of Convolutional Neural
Network", ECCV 2020, arXiv:2008.05441 (CP degeneracy); X. Zhang et al., "Accelerating Very
Deep Convolutional Networks for Classification and Detection", 2016, arXiv:1505.06798
(data-driven reconstruction, which replaces fine-tuning here).

Before::

    x[C,H,W] -> Conv(W[O,C,kh,kw], b, stride, pads, dilation) -> y[O,H',W']

After (rank R; W ~ sum_r A[:,r] (x) B[:,r] (x) Kh[:,r] (x) Kw[:,r])::

    x -> Conv 1x1 (B^T: C->R) -> Conv kh x 1 depthwise (Kh, group R, vertical stride/pads)
      -> Conv 1 x kw depthwise (Kw, group R, horizontal stride/pads) -> Conv 1x1 (A: R->O, b)

MACs per output pixel drop from O*C*kh*kw to about R*(C + kh + kw + O). A kernel with kh = 1
or kw = 1 gets the three-layer form (the size-1 factor folds into the first 1x1).
By default (``--cp-depthwise auto``) kernels of at most 9 taps (3x3) get the two depthwise
stages as one depthwise kh x kw conv whose kernels are the rank-one products Kh[:,r] Kw[:,r]^T:
the same CP model, about R*(C + kh*kw + O) MACs per pixel, one memory pass fewer, measured
5-25 % faster per chain here; on the Fashion-MNIST VGG at --target-speedup 2 the model went
from 1.67-1.74x (separate, accuracy -0.50/-0.88) to 1.94-2.02x (-0.52). ``separate`` always
writes the classic four-layer chain above, ``merged`` always merges. The last 1x1
and the bias are refit by least squares on calibration data (see onnxcomp/decompose.py).

Supported: 2-D Conv, group 1, constant float weights, any stride/pads/dilation/auto_pad.
Skipped, with a reason: 1x1 kernels (use svd), grouped/depthwise convs, non-constant or shared
weights, tiny layers, degenerate CP fits (component norms blowing up), no MAC or latency win.
"""

from __future__ import annotations

import hashlib

import numpy as np

from onnxcomp import cp_als, lowrank
from onnxcomp import passbase as pb
from onnxcomp.chain import conv_hw, full_attrs, horizontal_attrs, vertical_attrs
from onnxcomp.decompose import DecompositionPass, LowRankConfig
from onnxcomp.linear import Layer, Plan, Stage, rank_ladder, round_up, skip_pointwise

# Phan et al.'s degeneracy shows as rank-one terms far larger than W that cancel. Mild
# cancellation (a few times ||W||) costs fp32 a digit at most and the refit and the measured
# error account for it; beyond this ratio the chain is numerically fragile and is not used.
SEVERE_CANCELLATION = 30.0
# With --cp-depthwise auto, kernels of at most this many taps get one depthwise kh x kw stage
# (the outer product of the vertical and horizontal factors) instead of two. Measured on this
# CPU (ORT 1.32, 1 thread): for 3x3 kernels the single stage made the chain 5-25 % faster at
# every shape tried (one memory pass fewer outweighs 3 more MACs per pixel); for 5x5 and 7x7
# it was a wash or slower.
MERGE_MAX_TAPS = 9
# A warm-started fit down the rank ladder gets at least this long, whatever the layer spent.
MIN_FIT_SECONDS = 1.0


def merge_depthwise(kh: int, kw: int, mode: str) -> bool:
    """True when the CP chain uses one depthwise kh x kw stage rather than kh x 1 and 1 x kw."""
    if kh == 1 or kw == 1 or mode == "separate":
        return False
    return mode == "merged" or kh * kw <= MERGE_MAX_TAPS


class CPMethod:
    """CP chains for 2-D convs."""

    name = "cp"
    ops = ("Conv",)

    def __init__(self) -> None:
        self._fits: dict[tuple[str, int], cp_als.CPResult] = {}
        self._spent = 0.0  # ALS seconds spent on the current layer

    def check(self, layer: Layer) -> pb.Skip | None:
        """Skip 1x1 kernels (nothing spatial to separate)."""
        return skip_pointwise(layer)

    def max_rank(self, layer: Layer) -> int:
        """The largest rank whose chain costs fewer MACs than the layer."""
        o, c, kh, kw = layer.weight.shape
        in_hw, out_hw = conv_hw(layer)
        per_rank = lowrank.cp_macs((o, c, kh, kw), 1, in_hw, out_hw)
        return max(1, (layer.macs - 1) // per_rank)

    def rank_options(self, layer: Layer, config: LowRankConfig) -> list[tuple[int, ...]]:
        """Ranks (multiples of ``rank_multiple``), largest first, up to 0.6 of break-even.

        Chains near break-even are never measured faster (their depthwise and 1x1 stages are
        memory-bound), so the ladder stops at 0.6 of it and at max(O, C). Largest first, so
        each smaller rank warm-starts from the previous fit's leading components.
        """
        o, c = layer.weight.shape[:2]
        top = max(1, min(int(0.6 * self.max_rank(layer)), max(o, c)))
        return [(r,) for r in reversed(rank_ladder(top, config.rank_multiple))]

    def fixed_rank(self, layer: Layer, config: LowRankConfig) -> tuple[int, ...]:
        """``--rank N`` as is; ``--rank f`` as a fraction of the break-even rank."""
        if isinstance(config.rank, int):
            return (config.rank,)
        assert isinstance(config.rank, float)
        return (round_up(config.rank * self.max_rank(layer), config.rank_multiple),)

    def plan(self, layer: Layer, ranks: tuple[int, ...], config: LowRankConfig) -> Plan:
        """CP-ALS at rank R and the chain's stages."""
        (rank,) = ranks
        g = layer.geom
        assert g is not None
        w = layer.weight.astype(np.float64)
        o, c, kh, kw = w.shape
        key = (hashlib.sha1(w.tobytes()).hexdigest(), config.seed)
        warm = self._fits.get(key)
        if warm is not None and warm.rank >= rank:
            # One time budget per layer, shared down the rank ladder (warm starts converge
            # in a few sweeps; a 512-channel layer's largest fit may take most of it).
            left = max(config.max_seconds_per_layer - self._spent, MIN_FIT_SECONDS)
            res = cp_als.cp_conv(w, rank, max_iter=40, max_seconds=left, seed=config.seed,
                                 init=warm)
            self._spent += res.seconds
        else:
            res = cp_als.cp_conv(w, rank, max_seconds=config.max_seconds_per_layer,
                                 seed=config.seed)
            self._fits = {key: res}  # keep only the current layer's largest fit
            self._spent = res.seconds
        b, kh_f, kw_f, a = res.B, res.Kh, res.Kw, res.A
        stages = []
        if kh == 1:  # fold the scalar vertical factor; the horizontal stage takes the geometry
            b = b * kh_f[0][None, :]
        if kw == 1:
            b = b * kw_f[0][None, :]
        stages.append(Stage("conv", b.T.reshape(rank, c, 1, 1), {}, "pw_in"))
        merged = merge_depthwise(kh, kw, config.cp_depthwise)
        if merged:  # one depthwise kh x kw stage whose kernels are the rank-one Kh (x) Kw
            kernels = np.einsum("ar,br->rab", kh_f, kw_f).reshape(rank, 1, kh, kw)
            stages.append(Stage("conv", kernels, full_attrs(g) | {"group": rank}, "dw"))
        if kh > 1 and not merged:
            attrs = vertical_attrs(g) | {"group": rank}
            if kw == 1:
                attrs = {"strides": [g.sh, g.sw], "dilations": [g.dh, g.dw],
                         "pads": list(g.pads), "group": rank}
            stages.append(Stage("conv", kh_f.T.reshape(rank, 1, kh, 1), attrs, "dw_v"))
        if kw > 1 and not merged:
            attrs = horizontal_attrs(g) | {"group": rank}
            if kh == 1:
                attrs = {"strides": [g.sh, g.sw], "dilations": [g.dh, g.dw],
                         "pads": list(g.pads), "group": rank}
            stages.append(Stage("conv", kw_f.T.reshape(rank, 1, 1, kw), attrs, "dw_h"))
        prefix = np.einsum("cr,ar,br->rcab", res.B, res.Kh, res.Kw).reshape(rank, -1)
        in_hw, out_hw = conv_hw(layer)
        macs = lowrank.cp_macs((o, c, kh, kw), rank, in_hw, out_hw, merged=merged)
        params = rank * (c + (kh * kw if merged else kh + kw) + o) + o
        return Plan(
            method=self.name, ranks=(rank,), stages=stages, last_attrs={},
            last_shape=(o, rank, 1, 1), prefix=prefix, last=a.copy(),
            weight_error=res.rel_error, macs=macs, params=params,
            extra={"degenerate": res.degenerate and res.cancellation > SEVERE_CANCELLATION,
                   "degenerate_reason": res.degenerate_reason,
                   "als_iterations": res.iterations, "als_seconds": round(res.seconds, 3)},
        )


class CP(DecompositionPass, name="cp", lossless=False, config=LowRankConfig):
    """The ``cp`` pass."""

    method_cls = CPMethod


PASS = CP()
