"""Low-rank SVD: spatial SVD of kxk convs, truncated SVD of 1x1 convs and FC layers (lossy).

Papers: M. Jaderberg, A. Vedaldi, A. Zisserman, "Speeding up Convolutional Neural Networks
with Low Rank Expansions", BMVC 2014, arXiv:1405.3866 (scheme 2: kx1 then 1xk); E. Denton et
al., "Exploiting Linear Structure Within Convolutional Networks for Efficient Evaluation",
NIPS 2014, arXiv:1404.0736 (SVD of fully connected layers); refit as in Zhang et al. 2016,
arXiv:1505.06798.

Before / after::

    Conv kh x kw (C->O)   =>  Conv kh x 1 (C->R, vertical stride/pads)
                              -> Conv 1 x kw (R->O, horizontal stride/pads, bias)
        W[o,c,i,j] ~ sum_r H[o,r,j] V[r,c,i]   (SVD of W arranged as [(c,i), (o,j)])

    Conv 1x1 (C->O)       =>  Conv 1x1 (C->R, original stride) -> Conv 1x1 (R->O, bias)
    Gemm/MatMul W[K,N]    =>  MatMul (K->R) -> Gemm or MatMul+Add (R->N, bias)
        W ~ U_R S_R V_R^T, sqrt(S) on each side

The last stage and the bias are refit by least squares on calibration data. For 1x1 convs and
FC layers the first stage is data-aware by default (``--basis data``): ``V = U^T W`` with
``U`` the top-R principal directions of the layer's outputs on the calibration data, the rank-R
map with the least output error (reduced-rank regression; Zhang et al. 2016 reconstruct
responses the same way). ``--basis weights`` uses the SVD of ``W`` alone.

Supported: 2-D Conv with group 1, Gemm (transA = 0, per-output bias) and MatMul with a 2-D
constant weight. Skipped, with a reason: grouped convs, non-constant or shared weights, tiny
layers, no MAC or latency win.
"""

from __future__ import annotations

import numpy as np

from onnxcomp import lowrank
from onnxcomp import passbase as pb
from onnxcomp.chain import conv_hw, full_attrs, horizontal_attrs, vertical_attrs
from onnxcomp.decompose import DecompositionPass, LowRankConfig
from onnxcomp.linear import Layer, Plan, Stage, rank_ladder, round_up
from onnxcomp.moments import OutputBases, data_basis_generalizes

# A matrix larger than this in float64 is factored from its Gram matrix (lowrank.gram_svd):
# a full SVD of it would hold several float64 copies at once.
LEAN_SVD_BYTES = 1 << 28


class SVDMethod:
    """Spatial SVD for kxk convs; matrix SVD for 1x1 convs and FC layers."""

    name = "svd"
    ops = ("Conv", "Gemm", "MatMul")
    data_basis = True  # the driver gathers input covariances for --basis data

    def __init__(self) -> None:
        self._basis = OutputBases()
        self._svd: tuple[str, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _weights_svd(self, layer: Layer, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
        """``lowrank.svd_matrix(layer.matrix, rank)`` from one SVD per layer (not per rank)."""
        n, k = layer.matrix_shape
        if 8 * n * k > LEAN_SVD_BYTES:
            return lowrank.gram_svd(layer.weight.reshape(n, k), rank)
        if self._svd is None or self._svd[0] != layer.name:
            self._svd = None  # the previous layer's factors go before this one's are made
            u, sv, vt = np.linalg.svd(layer.matrix, full_matrices=False)
            self._svd = (layer.name, u, sv, vt)
        _, u, sv, vt = self._svd
        return lowrank.truncate_svd(u, sv, vt, min(rank, len(sv)))


    def check(self, layer: Layer) -> pb.Skip | None:
        """Every layer find_layers accepts is supported."""
        return None

    @staticmethod
    def _kind(layer: Layer) -> str:
        if not layer.is_conv:
            return "fc"
        g = layer.geom
        assert g is not None
        return "pointwise" if g.kh * g.kw == 1 else "spatial"

    def _macs(self, layer: Layer, rank: int) -> int:
        kind = self._kind(layer)
        if kind == "fc":
            n, k = layer.matrix_shape
            return layer.rows_per_sample * rank * (n + k)
        o, c, kh, kw = layer.weight.shape
        in_hw, out_hw = conv_hw(layer)
        if kind == "pointwise":
            return (c * rank + rank * o) * out_hw[0] * out_hw[1]
        return lowrank.spatial_svd_macs((o, c, kh, kw), rank, in_hw, out_hw)

    def max_rank(self, layer: Layer) -> int:
        """The largest rank cheaper than the layer in MACs (and within the matrix rank)."""
        per = self._macs(layer, 1)
        if self._kind(layer) == "spatial":
            o, c, kh, kw = layer.weight.shape
            bound = min(c * kh, o * kw)
        else:
            bound = min(layer.matrix_shape)
        return max(1, min(bound, (layer.macs - 1) // max(per, 1)))

    def rank_options(self, layer: Layer, config: LowRankConfig) -> list[tuple[int, ...]]:
        """Ranks (multiples of ``rank_multiple``) below the MAC break-even rank."""
        return [(r,) for r in rank_ladder(self.max_rank(layer), config.rank_multiple)]

    def fixed_rank(self, layer: Layer, config: LowRankConfig) -> tuple[int, ...]:
        """``--rank N`` as is (capped at the matrix rank); ``--rank f`` of the break-even rank."""
        if isinstance(config.rank, int):
            bound = (min(layer.weight.shape[1] * layer.weight.shape[2],
                         layer.weight.shape[0] * layer.weight.shape[3])
                     if self._kind(layer) == "spatial" else min(layer.matrix_shape))
            return (min(config.rank, bound),)
        assert isinstance(config.rank, float)
        return (round_up(config.rank * self.max_rank(layer), config.rank_multiple),)

    def plan(self, layer: Layer, ranks: tuple[int, ...], config: LowRankConfig) -> Plan:
        """The truncated SVD at rank R and the stages."""
        (rank,) = ranks
        kind = self._kind(layer)
        if kind == "spatial":
            return self._spatial(layer, rank)
        basis = "weights"
        if config.basis == "data" and layer.input_cov is not None:
            def fit(cov: np.ndarray | None, half: int) -> np.ndarray:
                if cov is None:
                    a, b, _ = self._weights_svd(layer, rank)
                else:
                    a, b, _ = lowrank.svd_matrix_data(layer.matrix, cov, rank,
                                                      basis=self._basis.get(layer, half))
                return np.asarray(a @ b)

            basis = ("data" if data_basis_generalizes(layer.matrix, layer.input_cov_halves, fit)
                     else "weights (the data basis did not help across calibration halves)")
        if basis == "data":
            assert layer.input_cov is not None
            u, v, err = lowrank.svd_matrix_data(layer.matrix, layer.input_cov, rank,
                                                basis=self._basis.get(layer, -1))
        else:
            u, v, err = self._weights_svd(layer, rank)  # W[y, x] ~ U[y, R] V[R, x]
        n, k = layer.matrix_shape
        if kind == "fc":
            stages = [Stage("matmul", v, {}, "proj")]
            last_shape: tuple[int, ...] = (n, rank)
        else:
            g = layer.geom
            assert g is not None
            stages = [Stage("conv", v.reshape(rank, k, 1, 1), full_attrs(g), "proj")]
            last_shape = (n, rank, 1, 1)
        return Plan(
            method=self.name, ranks=(rank,), stages=stages, last_attrs={},
            last_shape=last_shape, prefix=v.copy(), last=u.copy(), weight_error=err,
            macs=self._macs(layer, rank), params=rank * (n + k) + n,
            extra={"form": kind, "basis": basis},
        )

    def _spatial(self, layer: Layer, rank: int) -> Plan:
        g = layer.geom
        assert g is not None
        o, c, kh, kw = layer.weight.shape
        res = lowrank.spatial_svd_conv(layer.weight.astype(np.float64), rank)
        stages = [Stage("conv", res.V, vertical_attrs(g), "vertical")]
        # Features of the last (1 x kw) stage: f = r*kw + b' = sum_{c,a} V[r,c,a] x[c,a,b'].
        v = res.V[:, :, :, 0]  # [R, C, kh]
        prefix = np.einsum("rca,bd->rbcad", v, np.eye(kw)).reshape(rank * kw, c * kh * kw)
        last = res.H[:, :, 0, :].reshape(o, rank * kw)
        return Plan(
            method=self.name, ranks=(rank,), stages=stages, last_attrs=horizontal_attrs(g),
            last_shape=(o, rank, 1, kw), prefix=prefix, last=last,
            weight_error=res.rel_error, macs=self._macs(layer, rank),
            params=rank * (c * kh + o * kw) + o, extra={"form": "spatial"},
        )


class SVD(DecompositionPass, name="svd", lossless=False, config=LowRankConfig):
    """The ``svd`` pass."""

    method_cls = SVDMethod


PASS = SVD()
