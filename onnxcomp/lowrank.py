"""Shared low-rank math for the decomposition passes: CP, Tucker-2, SVD and least-squares refits.

Pure numpy (no ONNX). Every function computes in float64 and returns float64 arrays; callers
cast to the model's dtype. Everything random is drawn from ``numpy.random.default_rng(seed)``,
so results are deterministic for a given seed.

Kernels use the ONNX ``Conv`` layout ``W[O, C, kh, kw]`` (``groups == 1``).

Decompositions
--------------

- :func:`cp_conv` -- CP (CANDECOMP/PARAFAC) of the 4-way kernel,
  ``W ~ sum_r A[:, r] (x) B[:, r] (x) Kh[:, r] (x) Kw[:, r]`` (Lebedev et al., "Speeding-up
  Convolutional Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015,
  arXiv:1412.6553), fitted by alternating least squares written for small spatial modes, with the
  degeneracy check of Phan et al., "Stable Low-rank Tensor Decomposition for Compression of
  Convolutional Neural Network", ECCV 2020, arXiv:2008.05441. As a chain of convolutions:
  1x1 ``C -> R``, depthwise ``kh x 1``, depthwise ``1 x kw``, 1x1 ``R -> O``.
- :func:`tucker2_conv` -- Tucker-2 over the channel modes, ``W ~ core x_0 U_out x_1 U_in``
  (Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
  Applications", ICLR 2016, arXiv:1511.06530), fitted by HOOI from a truncated HOSVD. As a chain:
  1x1 ``C -> R1``, ``kh x kw`` core ``R1 -> R2``, 1x1 ``R2 -> O``.
- :func:`spatial_svd_conv` -- scheme 2 of Jaderberg et al., "Speeding up Convolutional Neural
  Networks with Low Rank Expansions", BMVC 2014, arXiv:1405.3866: ``kh x 1`` conv ``C -> R``
  then ``1 x kw`` conv ``R -> O``, from a truncated SVD of ``W`` arranged as
  ``M[(C, kh), (O, kw)]``.
- :func:`svd_matrix` -- truncated SVD of a 2-D weight (Gemm / MatMul / 1x1 Conv).

Rank conventions (what a ``--rank 0.25`` fraction is a fraction of)
-------------------------------------------------------------------

- CP: the *break-even rank* ``R_eq = O*C*kh*kw / (O + C + kh + kw)``, the rank at which the CP
  chain has the same parameters and MACs per output pixel as the original conv
  (:func:`cp_break_even_rank`). ``0.25`` means a chain with about a quarter of the cost.
- Tucker-2: each channel mode separately, ``R2 = fraction * O`` and ``R1 = fraction * C``.
- Spatial SVD and matrix SVD: the full rank of the matrix that is factorized,
  ``min(C*kh, O*kw)`` and ``min(m, n)`` respectively.

:func:`round_rank` then rounds to a hardware-friendly multiple.

Cost models
-----------

``*_costs`` return weight parameters and MACs per output pixel assuming every stage runs at the
output resolution; the ``*_macs`` variants take the input and output spatial sizes, because with
stride the first 1x1 stage of CP and Tucker-2 runs at the *input* resolution and the ``kh x 1``
stages of CP and spatial SVD produce ``H_out x W_in`` maps.

Least-squares refit
-------------------

:class:`RidgeAccumulator` accumulates the moments ``Z^T Z``, ``Z^T Y`` and ``||Y||^2`` of a
linear map ``Y ~ Z W + b`` chunk by chunk, with memory independent of the number of samples, and
solves the ridge regression -- the building block of the data-driven reconstruction of Zhang et
al., "Accelerating Very Deep Convolutional Networks for Classification and Detection", TPAMI
2016, arXiv:1505.06798.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
from numpy.typing import ArrayLike, NDArray

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
"""A float64 numpy array."""

CP_MAX_COMPONENT_RATIO = 10.0
"""Degenerate when one rank-one component's norm exceeds this multiple of ``||W||``."""

CP_CANCELLATION_RATIO = 10.0
"""Degenerate when ``sqrt(sum_r norm_r^2)`` exceeds this multiple of ``||W||`` (cancellation)."""

CP_PAIR_CONGRUENCE = -0.9
"""Degenerate when two components, each of norm above ``||W||``, have a congruence below this."""

_RIDGE_REL = 1e-10
"""Ridge added to the ALS normal equations, relative to the trace of their Gram matrix."""

_QUADRATIC_ERROR_FLOOR = 1e-5
"""Below this relative error the ALS error is recomputed directly (the quadratic form cancels)."""

_EXACT_FLOOR = 1e-12
"""An ALS relative error below this counts as converged whatever its last change."""

_LINE_SEARCH_START = 3
"""First ALS sweep after which the step ``sweep ** (1/3)`` extrapolation is tried."""


# ---------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class CPResult:
    """A rank-``R`` CP decomposition of a kernel ``W[O, C, kh, kw]``.

    ``W ~ einsum('or,cr,ir,jr->ocij', A, B, Kh, Kw)``: the component weights are folded into the
    factors, balanced so that column ``r`` of every factor has the same norm (the fourth root of
    the component's norm), and components are sorted by decreasing norm.
    """

    A: FloatArray
    """Output-channel factor ``[O, R]`` (the last 1x1 conv, ``R -> O``)."""
    B: FloatArray
    """Input-channel factor ``[C, R]`` (the first 1x1 conv, ``C -> R``)."""
    Kh: FloatArray
    """Vertical factor ``[kh, R]`` (the depthwise ``kh x 1`` conv)."""
    Kw: FloatArray
    """Horizontal factor ``[kw, R]`` (the depthwise ``1 x kw`` conv)."""
    rank: int
    """The rank ``R``."""
    rel_error: float
    """``||W - W_hat||_F / ||W||_F`` (0 for an all-zero kernel)."""
    iterations: int
    """ALS sweeps run."""
    converged: bool
    """Whether the stopping tolerance was met (not the iteration or time limit)."""
    seconds: float
    """Wall time of the whole fit."""
    degenerate: bool
    """Whether the fit shows CP degeneracy (diverging, cancelling components); see Phan et al."""
    degenerate_reason: str
    """Why it is degenerate; empty when it is not."""
    component_norms: FloatArray
    """Norms of the rank-one components ``[R]``, decreasing."""
    cancellation: float
    """``sqrt(sum_r component_norms_r^2) / ||W||``: about 1 unless components cancel."""

    def reconstruct(self) -> FloatArray:
        """The approximated kernel ``[O, C, kh, kw]``."""
        return np.einsum("or,cr,ir,jr->ocij", self.A, self.B, self.Kh, self.Kw, optimize=True)

    def conv_weights(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """The four ``Conv`` weights of the chain, in ONNX layout.

        Returns:
            ``(first [R, C, 1, 1], vertical [R, 1, kh, 1], horizontal [R, 1, 1, kw],
            last [O, R, 1, 1])``; the middle two are depthwise (``group = R``). The vertical
            conv takes the original vertical stride, pads and dilation, the horizontal one the
            horizontal ones; the first conv has none (zero padding commutes with a bias-free
            1x1) and the original bias goes on the last.

        """
        rank = self.rank
        first = np.ascontiguousarray(self.B.T).reshape(rank, -1, 1, 1)
        vertical = np.ascontiguousarray(self.Kh.T).reshape(rank, 1, -1, 1)
        horizontal = np.ascontiguousarray(self.Kw.T).reshape(rank, 1, 1, -1)
        last = np.ascontiguousarray(self.A).reshape(-1, rank, 1, 1)
        return first, vertical, horizontal, last


@dataclasses.dataclass(frozen=True)
class Tucker2Result:
    """A Tucker-2 decomposition ``W ~ core x_0 U_out x_1 U_in`` of a kernel ``W[O, C, kh, kw]``.

    ``W ~ einsum('pqij,op,cq->ocij', core, U_out, U_in)``; ``U_out`` and ``U_in`` have
    orthonormal columns.
    """

    U_out: FloatArray
    """Output factor ``[O, R2]`` (the last 1x1 conv, ``R2 -> O``)."""
    core: FloatArray
    """Core ``[R2, R1, kh, kw]`` (the ``kh x kw`` conv, ``R1 -> R2``)."""
    U_in: FloatArray
    """Input factor ``[C, R1]`` (the first 1x1 conv, ``C -> R1``)."""
    rank_out: int
    """``R2``."""
    rank_in: int
    """``R1``."""
    rel_error: float
    """``||W - W_hat||_F / ||W||_F`` (0 for an all-zero kernel)."""
    iterations: int
    """HOOI sweeps run after the HOSVD initialization."""

    def reconstruct(self) -> FloatArray:
        """The approximated kernel ``[O, C, kh, kw]``."""
        return np.einsum("pqij,op,cq->ocij", self.core, self.U_out, self.U_in, optimize=True)

    def conv_weights(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """The three ``Conv`` weights of the chain, in ONNX layout.

        Returns:
            ``(first [R1, C, 1, 1], core [R2, R1, kh, kw], last [O, R2, 1, 1])``; the core conv
            takes the original strides, pads and dilations, the original bias goes on the last.

        """
        first = np.ascontiguousarray(self.U_in.T).reshape(self.rank_in, -1, 1, 1)
        last = np.ascontiguousarray(self.U_out).reshape(-1, self.rank_out, 1, 1)
        return first, self.core, last


@dataclasses.dataclass(frozen=True)
class SpatialSVDResult:
    """A spatial SVD ``W[o, c, i, j] ~ sum_r H[o, r, 0, j] V[r, c, i, 0]`` (Jaderberg scheme 2)."""

    V: FloatArray
    """First conv ``[R, C, kh, 1]`` (``kh x 1``, ``C -> R``): vertical stride, pads, dilation."""
    H: FloatArray
    """Second conv ``[O, R, 1, kw]`` (``1 x kw``, ``R -> O``): horizontal stride, pads, dilation;
    the original bias goes here."""
    rank: int
    """The rank ``R``."""
    rel_error: float
    """``||W - W_hat||_F / ||W||_F`` (0 for an all-zero kernel)."""
    singular_values: FloatArray
    """All singular values of ``M[(C, kh), (O, kw)]``, decreasing."""

    def reconstruct(self) -> FloatArray:
        """The approximated kernel ``[O, C, kh, kw]``."""
        return np.einsum("orj,rci->ocij", self.H[:, :, 0, :], self.V[:, :, :, 0], optimize=True)


@dataclasses.dataclass(frozen=True)
class FactorCost:
    """Weight parameters and MACs per output pixel of a (factorized) layer."""

    params: int
    """Weight elements (no bias)."""
    macs: int
    """Multiply-accumulates per output pixel, every stage at the output resolution."""


# ---------------------------------------------------------------------------- validation


def _as_kernel(W: ArrayLike) -> FloatArray:
    """``W`` as a finite float64 ``[O, C, kh, kw]`` array, or ``ValueError``."""
    kernel = np.asarray(W, dtype=np.float64)
    if kernel.ndim != 4 or 0 in kernel.shape:
        raise ValueError(f"expected a non-empty 4-D kernel [O, C, kh, kw], got {kernel.shape}")
    if not np.all(np.isfinite(kernel)):
        raise ValueError("kernel has non-finite values")
    return kernel


def _check_rank(rank: int, maximum: int | None, what: str) -> int:
    """``rank`` as an int in ``[1, maximum]``, or ``ValueError``."""
    if isinstance(rank, bool) or int(rank) != rank:
        raise ValueError(f"{what} must be an integer, got {rank!r}")
    value = int(rank)
    if value < 1 or (maximum is not None and value > maximum):
        bound = "" if maximum is None else f", at most {maximum}"
        raise ValueError(f"{what} must be at least 1{bound}, got {value}")
    return value


def _relative(residual_sq: float, total_sq: float) -> float:
    """``sqrt(residual_sq / total_sq)``, 0 for a zero total, clamped at 0 below."""
    if total_sq <= 0.0:
        return 0.0
    return math.sqrt(max(residual_sq, 0.0) / total_sq)


# ---------------------------------------------------------------------------- CP


def _leading_left_vectors(matrix: FloatArray, count: int) -> FloatArray:
    """The ``min(count, rows)`` leading left singular vectors of ``matrix``, from its Gram.

    Cheaper than an SVD of a wide matrix; the subspace is accurate to about
    ``eps * sigma_1^2 / sigma_count^2``, plenty for initializations and HOOI sweeps. The Gram is
    decomposed by SVD rather than ``eigh`` (same vectors for a PSD matrix, already in decreasing
    order): on a busy 2-core machine with multi-threaded OpenBLAS, ``eigh`` with eigenvectors
    was measured 5-10x slower.
    """
    gram = matrix @ matrix.T
    vectors, _, _ = np.linalg.svd(gram)
    return np.ascontiguousarray(vectors[:, : min(count, matrix.shape[0])])


def _normalize_columns(factor: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``(factor / norms, norms)``; a zero column keeps norm 0 and is left as is."""
    norms = np.linalg.norm(factor, axis=0)
    safe = np.where(norms > 0.0, norms, 1.0)
    return factor / safe, norms


def _solve_gram(gram: FloatArray, mttkrp: FloatArray) -> FloatArray:
    """``mttkrp @ inv(gram + ridge I)`` for a symmetric PSD ``gram``, ridge ``1e-10 trace``."""
    ridge = _RIDGE_REL * float(np.trace(gram))
    if ridge <= 0.0:
        ridge = _RIDGE_REL
    regularized = gram + ridge * np.eye(gram.shape[0])
    try:
        solution = np.linalg.solve(regularized, mttkrp.T)
    except np.linalg.LinAlgError:
        solution = np.linalg.lstsq(regularized, mttkrp.T, rcond=None)[0]
    return np.asarray(solution.T, dtype=np.float64)


def _cp_init(kernel: FloatArray, rank: int, rng: np.random.Generator) -> list[FloatArray]:
    """HOSVD-style start: leading left singular vectors per unfolding, seeded random padding."""
    factors = []
    for mode, size in enumerate(kernel.shape):
        unfolding = np.moveaxis(kernel, mode, 0).reshape(size, -1)
        factor = _leading_left_vectors(unfolding, rank)
        if factor.shape[1] < rank:
            extra = rng.standard_normal((size, rank - factor.shape[1]))
            factor = np.concatenate([factor, extra], axis=1)
        factors.append(_normalize_columns(factor)[0])
    return factors


def _cp_degeneracy(
    factors: tuple[FloatArray, FloatArray, FloatArray, FloatArray],
    weights: FloatArray,
    kernel_norm: float,
) -> tuple[str, float]:
    """Why a CP model (unit-column factors, component weights) is degenerate, and its cancellation.

    Returns:
        ``(reason, cancellation)``: ``reason`` is empty when nothing is wrong; ``cancellation`` is
        ``sqrt(sum_r weights_r^2) / ||W||``, about 1 when the components do not cancel.

    """
    if not np.all(np.isfinite(weights)):
        return "non-finite component norms", math.inf
    if kernel_norm <= 0.0:
        return "", 0.0
    cancellation = float(np.linalg.norm(weights)) / kernel_norm
    largest = float(weights.max()) / kernel_norm
    if largest > CP_MAX_COMPONENT_RATIO:
        reason = (
            f"a rank-one component has norm {largest:.3g} x ||W|| "
            f"(> {CP_MAX_COMPONENT_RATIO:g}): diverging components"
        )
        return reason, cancellation
    if cancellation > CP_CANCELLATION_RATIO:
        reason = (
            f"rank-one components have {cancellation:.3g} x the norm of W in root-sum-square "
            f"(> {CP_CANCELLATION_RATIO:g}): cancelling components"
        )
        return reason, cancellation
    # Two-factor degeneracy: a pair of large components pointing in nearly opposite directions.
    congruence = np.ones((weights.size, weights.size))
    for factor in factors:
        congruence *= factor.T @ factor
    large = weights > kernel_norm
    congruence[~large, :] = 1.0
    congruence[:, ~large] = 1.0
    np.fill_diagonal(congruence, 1.0)
    worst = float(congruence.min())
    if worst < CP_PAIR_CONGRUENCE:
        first, second = np.unravel_index(int(np.argmin(congruence)), congruence.shape)
        reason = (
            f"components of norms {weights[first] / kernel_norm:.3g} and "
            f"{weights[second] / kernel_norm:.3g} x ||W|| have congruence {worst:.3f} "
            f"(< {CP_PAIR_CONGRUENCE:g}): a cancelling pair"
        )
        return reason, cancellation
    return "", cancellation


def cp_conv(
    W: ArrayLike,
    rank: int,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
    max_seconds: float = 10.0,
    seed: int = 0,
    init: CPResult | None = None,
) -> CPResult:
    """Rank-``rank`` CP decomposition of a conv kernel ``W[O, C, kh, kw]`` by ALS.

    Each sweep updates ``A, B, Kh, Kw`` in turn by the normal equations. The MTTKRPs are two
    GEMMs over the kernel per sweep (``W[O, C*kh*kw]`` times the small Khatri-Rao product of
    ``B`` with the spatial factors, and its transpose times ``A``); the spatial MTTKRPs reuse the
    second one contracted with ``B``. The Grams are Hadamard products of the ``R x R`` factor
    Grams, regularized by ``1e-10 * trace``. Columns are normalized after every update (their
    norms kept as the component weights), and at the end the weights are folded back evenly.
    ``kh == 1`` or ``kw == 1`` is fine: that factor is then a row of signs times the weights.

    From sweep 3 on, each sweep also tries extrapolating the factors along the last step by
    ``sweep ** (1/3)`` (the line search of Bro, "Multi-way Analysis in the Food Industry", 1998),
    kept only when it lowers the error; it shortens the swamps plain ALS falls into.

    The fit stops when the relative error changes by less than ``tol`` times itself, falls below
    1e-12, after ``max_iter`` sweeps or after ``max_seconds``.

    Degeneracy (Phan et al., ECCV 2020: large rank-one terms that cancel each other, which makes
    the chain sensitive to rounding, quantization and fine-tuning) is flagged when, for the
    final model,

    - a component's norm exceeds ``CP_MAX_COMPONENT_RATIO`` (10) times ``||W||`` (diverging);
    - the root-sum-square of the component norms exceeds ``CP_CANCELLATION_RATIO`` (10) times
      ``||W||``: the terms hold 100x the kernel's energy, nearly all of it cancelling (the
      root-sum-square is used, not the plain sum, which grows like ``sqrt(R)`` even for
      orthogonal components and so would flag every high-rank fit);
    - two components, each larger than ``||W||``, have a congruence (the product over the four
      modes of the cosines between their factor columns) below ``CP_PAIR_CONGRUENCE`` (-0.9):
      the classic two-factor degeneracy, in which such a pair diverges to infinity as ALS goes on
      (e.g. a rank-3 tensor of border rank 2 fitted at rank 2).

    Args:
        W: the kernel ``[O, C, kh, kw]``.
        rank: the CP rank ``R >= 1``.
        max_iter: the most ALS sweeps.
        tol: stopping tolerance on the relative change of the relative error.
        max_seconds: wall-time budget for the sweeps (checked after each sweep).
        seed: seed of the random padding of the initialization.
        init: a fit of the same kernel at a rank >= ``rank`` to warm-start from (its
            ``rank`` largest components); the HOSVD start otherwise.

    Returns:
        The :class:`CPResult`.

    Raises:
        ValueError: for a kernel that is not a finite 4-D array or a rank below 1.

    """
    start = time.perf_counter()
    kernel = _as_kernel(W)
    rank = _check_rank(rank, None, "CP rank")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    c_out, c_in, kh, kw = kernel.shape
    spatial = kh * kw
    matrix = kernel.reshape(c_out, c_in * spatial)
    kernel_sq = float(np.vdot(matrix, matrix))

    if init is not None and init.rank >= rank and init.A.shape[0] == c_out:
        (A, B, Kh, Kw), weights = _cp_normalized(
            [init.A[:, :rank], init.B[:, :rank], init.Kh[:, :rank], init.Kw[:, :rank]])
        A = A * weights  # the sweep starts by updating A: carry the weights in it
        weights = np.ones(rank)
    else:
        A, B, Kh, Kw = _cp_init(kernel, rank, np.random.default_rng(seed))
    weights = np.ones(rank) if kernel_sq > 0.0 else np.zeros(rank)
    error = 1.0 if kernel_sq > 0.0 else 0.0
    converged = kernel_sq == 0.0
    extrapolated = 0
    iterations = 0
    while not converged and iterations < max_iter:
        iterations += 1
        previous = (A, B, Kh, Kw * weights)
        A, B, Kh, Kw, weights, new_error = _cp_sweep(matrix, kernel_sq, (kh, kw), A, B, Kh, Kw)
        if iterations >= _LINE_SEARCH_START and math.isfinite(new_error):
            # Extrapolate along the last step (Bro's line search): cheap insurance against swamps.
            step = iterations ** (1.0 / 3.0)
            current = (A, B, Kh, Kw * weights)
            trial = [old + step * (new - old) for old, new in zip(previous, current, strict=True)]
            trial_factors, trial_weights = _cp_normalized(trial)
            trial_error = _cp_error(matrix, kernel_sq, *trial_factors, trial_weights)
            if trial_error < new_error:
                (A, B, Kh, Kw), weights, new_error = trial_factors, trial_weights, trial_error
                extrapolated += 1
        if not np.all(np.isfinite(weights)) or not math.isfinite(new_error):
            log.warning("CP-ALS rank %d: non-finite values after sweep %d", rank, iterations)
            error = new_error
            break
        change = abs(error - new_error)
        error = new_error
        if error < _EXACT_FLOOR or change <= tol * error:
            converged = True
        elif time.perf_counter() - start > max_seconds:
            log.info("CP-ALS rank %d: time budget %.1f s spent", rank, max_seconds)
            break

    if np.all(np.isfinite(weights)):
        error = _cp_error(matrix, kernel_sq, A, B, Kh, Kw, weights, direct=True)
    reason, cancellation = _cp_degeneracy((A, B, Kh, Kw), weights, math.sqrt(kernel_sq))
    order = np.argsort(-weights, kind="stable")
    scale = np.power(np.abs(weights[order]), 0.25)
    seconds = time.perf_counter() - start
    log.debug(
        "CP-ALS %s rank %d: rel_error %.3g after %d sweeps (%d extrapolated) in %.3f s%s",
        kernel.shape,
        rank,
        error,
        iterations,
        extrapolated,
        seconds,
        f" ({reason})" if reason else "",
    )
    return CPResult(
        A=A[:, order] * scale,
        B=B[:, order] * scale,
        Kh=Kh[:, order] * scale,
        Kw=Kw[:, order] * scale,
        rank=rank,
        rel_error=float(error),
        iterations=iterations,
        converged=bool(converged),
        seconds=seconds,
        degenerate=bool(reason),
        degenerate_reason=reason,
        component_norms=weights[order].copy(),
        cancellation=cancellation,
    )


def _cp_sweep(
    matrix: FloatArray,
    kernel_sq: float,
    spatial_shape: tuple[int, int],
    A: FloatArray,
    B: FloatArray,
    Kh: FloatArray,
    Kw: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, float]:
    """One ALS sweep over ``A, B, Kh, Kw`` (unit columns in and out).

    Returns:
        ``(A, B, Kh, Kw, weights, rel_error)`` after the sweep.

    """
    kh, kw = spatial_shape
    c_in, rank = B.shape
    spatial = kh * kw
    kh_gram, kw_gram = Kh.T @ Kh, Kw.T @ Kw
    spatial_kr = (Kh[:, None, :] * Kw[None, :, :]).reshape(spatial, rank)
    spatial_gram = kh_gram * kw_gram

    # A: W[O, C*S] @ (B khatri-rao S)[C*S, R], one GEMM.
    mttkrp = matrix @ (B[:, None, :] * spatial_kr[None, :, :]).reshape(c_in * spatial, rank)
    A, _ = _normalize_columns(_solve_gram((B.T @ B) * spatial_gram, mttkrp))
    a_gram = A.T @ A

    # B: W^T A (the second GEMM) contracted with the spatial Khatri-Rao product.
    wt_a = (matrix.T @ A).reshape(c_in, spatial, rank)
    mttkrp = np.einsum("csr,sr->cr", wt_a, spatial_kr)
    B, _ = _normalize_columns(_solve_gram(a_gram * spatial_gram, mttkrp))
    ab_gram = a_gram * (B.T @ B)

    # Kh, Kw: the kernel projected on the (A, B) components is a small [kh, kw, R] tensor.
    projected = np.einsum("csr,cr->sr", wt_a, B).reshape(kh, kw, rank)
    mttkrp = np.einsum("ijr,jr->ir", projected, Kw)
    Kh, _ = _normalize_columns(_solve_gram(ab_gram * kw_gram, mttkrp))
    kh_gram = Kh.T @ Kh
    mttkrp = np.einsum("ijr,ir->jr", projected, Kh)
    kw_scaled = _solve_gram(ab_gram * kh_gram, mttkrp)
    Kw, weights = _normalize_columns(kw_scaled)

    # ||W - W_hat||^2 = ||W||^2 - 2 <W, W_hat> + ||W_hat||^2, from the last MTTKRP and R x R Grams.
    inner = float(np.vdot(mttkrp, kw_scaled))
    approx_sq = float(np.sum(ab_gram * kh_gram * (kw_scaled.T @ kw_scaled)))
    error = _relative(kernel_sq - 2.0 * inner + approx_sq, kernel_sq)
    if error < _QUADRATIC_ERROR_FLOOR:
        error = _cp_error(matrix, kernel_sq, A, B, Kh, Kw, weights, direct=True)
    return A, B, Kh, Kw, weights, error


def _cp_normalized(
    factors: list[FloatArray],
) -> tuple[tuple[FloatArray, FloatArray, FloatArray, FloatArray], FloatArray]:
    """Unit-column ``(A, B, Kh, Kw)`` and the component weights of a scaled CP model."""
    units = []
    weights = np.ones(factors[0].shape[1])
    for factor in factors:
        unit, norms = _normalize_columns(factor)
        units.append(unit)
        weights = weights * norms
    A, B, Kh, Kw = units
    return (A, B, Kh, Kw), weights


def _cp_error(
    matrix: FloatArray,
    kernel_sq: float,
    A: FloatArray,
    B: FloatArray,
    Kh: FloatArray,
    Kw: FloatArray,
    weights: FloatArray,
    *,
    direct: bool = False,
) -> float:
    """Relative error of the CP model ``sum_r weights[r] A[:, r] (x) ... (x) Kw[:, r]``.

    One GEMM either way: the quadratic form ``||W||^2 - 2 <W, W_hat> + ||W_hat||^2`` unless
    ``direct`` or the result is small enough to suffer from its cancellation, then the residual.
    """
    c_in, rank = B.shape
    spatial_kr = (Kh[:, None, :] * Kw[None, :, :]).reshape(-1, rank)
    right = (B[:, None, :] * spatial_kr[None, :, :]).reshape(c_in * spatial_kr.shape[0], rank)
    scaled = A * weights
    if not direct:
        inner = float(np.vdot(scaled, matrix @ right))
        grams = (scaled.T @ scaled) * (B.T @ B) * (Kh.T @ Kh) * (Kw.T @ Kw)
        error = _relative(kernel_sq - 2.0 * inner + float(grams.sum()), kernel_sq)
        if error >= _QUADRATIC_ERROR_FLOOR or not math.isfinite(error):
            return error
    residual = matrix - scaled @ right.T
    return _relative(float(np.vdot(residual, residual)), kernel_sq)


def cp_conv_3way(
    W: ArrayLike,
    rank: int,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
    max_seconds: float = 10.0,
    seed: int = 0,
) -> CPResult:
    """CP of a kernel with ``kh == 1`` or ``kw == 1`` (a 3-way tensor); see :func:`cp_conv`.

    The same ALS as :func:`cp_conv`: the size-1 spatial factor comes back as a ``[1, R]`` row
    holding each component's share of the scale, so the chain is built the same way as for the
    4-way case (that depthwise 1x1 conv is a per-channel scale a caller may fold into a
    neighbour). This wrapper only checks the shape.

    Raises:
        ValueError: when neither spatial size is 1, or for what :func:`cp_conv` rejects.

    """
    kernel = _as_kernel(W)
    if 1 not in kernel.shape[2:]:
        raise ValueError(f"cp_conv_3way needs kh == 1 or kw == 1, got {kernel.shape}")
    return cp_conv(kernel, rank, max_iter=max_iter, tol=tol, max_seconds=max_seconds, seed=seed)


# ---------------------------------------------------------------------------- Tucker-2


def _svd_left(matrix: FloatArray, count: int) -> FloatArray:
    """The ``count <= rows`` leading left singular vectors of ``matrix`` (an orthonormal set)."""
    full = count > min(matrix.shape)
    left, _, _ = np.linalg.svd(matrix, full_matrices=full)
    return np.ascontiguousarray(left[:, :count])


def tucker2_conv(
    W: ArrayLike,
    rank_out: int,
    rank_in: int,
    *,
    n_iter: int = 20,
    tol: float = 1e-6,
) -> Tucker2Result:
    """Tucker-2 of a conv kernel over its channel modes: ``W ~ core x_0 U_out x_1 U_in``.

    Truncated HOSVD (leading left singular vectors of the mode-0 and mode-1 unfoldings, by SVD)
    followed by up to ``n_iter`` HOOI sweeps (subspaces from the eigenvectors of the small
    ``O x O`` and ``C x C`` Grams of the partially projected kernel), stopping when a sweep
    improves the relative error by less than ``tol``; a sweep that does not improve it is
    dropped. Exact (to rounding) when ``W`` has multilinear ranks ``(rank_out, rank_in)`` in its
    channel modes.

    Args:
        W: the kernel ``[O, C, kh, kw]``.
        rank_out: ``R2``, ``1 <= R2 <= O``.
        rank_in: ``R1``, ``1 <= R1 <= C``.
        n_iter: the most HOOI sweeps (0: plain truncated HOSVD).
        tol: stop when a sweep lowers the relative error by less than this.

    Returns:
        The :class:`Tucker2Result`.

    Raises:
        ValueError: for a kernel that is not a finite 4-D array or ranks out of range.

    """
    kernel = _as_kernel(W)
    c_out, c_in, kh, kw = kernel.shape
    rank_out = _check_rank(rank_out, c_out, "Tucker-2 rank_out")
    rank_in = _check_rank(rank_in, c_in, "Tucker-2 rank_in")
    kernel_sq = float(np.vdot(kernel, kernel))

    U_out = _svd_left(kernel.reshape(c_out, -1), rank_out)
    U_in = _svd_left(np.moveaxis(kernel, 1, 0).reshape(c_in, -1), rank_in)
    core = np.einsum("ocij,op,cq->pqij", kernel, U_out, U_in, optimize=True)
    error = _tucker2_error(kernel, kernel_sq, core, U_out, U_in)
    iterations = 0
    while iterations < n_iter and error > _EXACT_FLOOR:
        iterations += 1
        partial = np.einsum("ocij,cq->oqij", kernel, U_in, optimize=True)
        new_out = _leading_left_vectors(partial.reshape(c_out, -1), rank_out)
        partial = np.einsum("ocij,op->cpij", kernel, new_out, optimize=True)
        new_in = _leading_left_vectors(partial.reshape(c_in, -1), rank_in)
        new_core = np.einsum("ocij,op,cq->pqij", kernel, new_out, new_in, optimize=True)
        new_error = _tucker2_error(kernel, kernel_sq, new_core, new_out, new_in)
        if new_error >= error:
            break
        improvement = error - new_error
        U_out, U_in, core, error = new_out, new_in, new_core, new_error
        if improvement < tol:
            break
    return Tucker2Result(
        U_out=U_out,
        core=core,
        U_in=U_in,
        rank_out=rank_out,
        rank_in=rank_in,
        rel_error=float(error),
        iterations=iterations,
    )


def tucker2_conv_data(W: ArrayLike, cov: ArrayLike, rank_out: int, rank_in: int,
                      basis: ArrayLike | None = None) -> Tucker2Result:
    """Tucker-2 whose output factor keeps the principal subspace of the layer's outputs.

    ``U_out`` is the top ``R2`` of :func:`output_basis` for the im2col input covariance ``cov``
    (``[C*kh*kw]^2``; pass ``basis`` to reuse it across ranks), the directions of ``W x`` that
    carry the most energy on the data rather than those of ``W`` alone; ``U_in`` is the leading
    ``R1`` input-channel subspace of ``W`` projected on ``U_out``, and the core the projection
    of ``W`` on both. The later least-squares refit of the last stage works within the ``R2``
    features this leaves, so the choice of ``U_out`` is what the data can improve.

    Raises:
        ValueError: for a kernel that is not a finite 4-D array, a covariance that does not
            match it, or ranks out of range.

    """
    kernel = _as_kernel(W)
    c_out, c_in, kh, kw = kernel.shape
    rank_out = _check_rank(rank_out, c_out, "Tucker-2 rank_out")
    rank_in = _check_rank(rank_in, c_in, "Tucker-2 rank_in")
    full = (output_basis(kernel.reshape(c_out, -1), cov) if basis is None
            else np.asarray(basis, dtype=np.float64))
    if full.shape[0] != c_out or full.shape[1] < rank_out:
        raise ValueError(f"basis of shape {full.shape} does not give {rank_out} directions "
                         f"of {c_out} outputs")
    U_out = np.ascontiguousarray(full[:, :rank_out])
    partial = np.einsum("ocij,op->cpij", kernel, U_out, optimize=True)
    U_in = _svd_left(partial.reshape(c_in, -1), rank_in)
    core = np.einsum("ocij,op,cq->pqij", kernel, U_out, U_in, optimize=True)
    error = _tucker2_error(kernel, float(np.vdot(kernel, kernel)), core, U_out, U_in)
    return Tucker2Result(U_out=U_out, core=core, U_in=U_in, rank_out=rank_out,
                         rank_in=rank_in, rel_error=float(error), iterations=0)


def _tucker2_error(
    kernel: FloatArray, kernel_sq: float, core: FloatArray, U_out: FloatArray, U_in: FloatArray
) -> float:
    """Relative error of a Tucker-2 model whose core is the projection of ``W`` on ``U_out, U_in``.

    With orthonormal factors ``||W - W_hat||^2 = ||W||^2 - ||core||^2``; below 1e-5, where that
    difference cancels, the residual is formed directly.
    """
    error = _relative(kernel_sq - float(np.vdot(core, core)), kernel_sq)
    if error >= _QUADRATIC_ERROR_FLOOR:
        return error
    residual = kernel - np.einsum("pqij,op,cq->ocij", core, U_out, U_in, optimize=True)
    return _relative(float(np.vdot(residual, residual)), kernel_sq)


# ---------------------------------------------------------------------------- SVD


def _truncated_svd(
    matrix: FloatArray, rank: int
) -> tuple[FloatArray, FloatArray, float, FloatArray]:
    """``(left [m, R], right [R, n], rel_error, singular values)`` with ``sqrt(S)`` split."""
    left, values, right = np.linalg.svd(matrix, full_matrices=False)
    return (*truncate_svd(left, values, right, rank), values)


def truncate_svd(left: FloatArray, values: FloatArray, right: FloatArray, rank: int
                 ) -> tuple[FloatArray, FloatArray, float]:
    """A full thin SVD ``(U, S, V^T)`` cut to rank R: ``(U_R sqrt(S), sqrt(S) V_R^T, error)``.

    Lets callers that try many ranks of one matrix decompose it once.
    """
    root = np.sqrt(values[:rank])
    total_sq = float(np.sum(values**2))
    error = _relative(float(np.sum(values[rank:] ** 2)), total_sq)
    return left[:, :rank] * root, root[:, None] * right[:rank], error


def spatial_svd_conv(W: ArrayLike, rank: int) -> SpatialSVDResult:
    """Jaderberg scheme 2: ``kh x 1`` conv ``C -> R`` then ``1 x kw`` conv ``R -> O``.

    ``W`` is arranged as ``M[(c, i), (o, j)] = W[o, c, i, j]`` (``C*kh x O*kw``) and truncated to
    rank ``R`` by SVD, the singular values split as square roots between the two convs. The
    error is the exact tail of the singular values, so the result is optimal in Frobenius norm
    among such pairs, and exact at ``R = min(C*kh, O*kw)``.

    Args:
        W: the kernel ``[O, C, kh, kw]``.
        rank: ``1 <= R <= min(C*kh, O*kw)``.

    Returns:
        The :class:`SpatialSVDResult`.

    Raises:
        ValueError: for a kernel that is not a finite 4-D array or a rank out of range.

    """
    kernel = _as_kernel(W)
    c_out, c_in, kh, kw = kernel.shape
    rank = _check_rank(rank, min(c_in * kh, c_out * kw), "spatial SVD rank")
    matrix = kernel.transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)
    left, right, error, values = _truncated_svd(matrix, rank)
    V = np.ascontiguousarray(left.T).reshape(rank, c_in, kh, 1)
    H = np.ascontiguousarray(right.reshape(rank, c_out, kw).transpose(1, 0, 2))
    return SpatialSVDResult(
        V=V,
        H=H.reshape(c_out, rank, 1, kw),
        rank=rank,
        rel_error=error,
        singular_values=values,
    )


def svd_matrix(W: ArrayLike, rank: int) -> tuple[FloatArray, FloatArray, float]:
    """Truncated SVD ``W[m, n] ~ U[m, R] @ V[R, n]`` with the singular values split as roots.

    Args:
        W: a finite 2-D weight.
        rank: ``1 <= R <= min(m, n)``.

    Returns:
        ``(U, V, rel_error)``, the error being ``||W - U V||_F / ||W||_F`` (exact tail of the
        singular values; 0 for an all-zero matrix).

    Raises:
        ValueError: for a matrix that is not a finite non-empty 2-D array or a rank out of range.

    """
    matrix = np.asarray(W, dtype=np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("matrix has non-finite values")
    rank = _check_rank(rank, min(matrix.shape), "SVD rank")
    left, right, error, _ = _truncated_svd(matrix, rank)
    return left, right, error


def output_basis(W: ArrayLike, cov: ArrayLike) -> FloatArray:
    """Principal directions ``[m, min(m, n)]`` of the outputs ``W x``, strongest first.

    For inputs of covariance ``cov``: the left singular vectors of ``W cov^(1/2)``.

    Raises:
        ValueError: for shapes that do not match or non-finite values.

    """
    matrix = np.asarray(W, dtype=np.float64)
    c = np.asarray(cov, dtype=np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {matrix.shape}")
    if c.shape != (matrix.shape[1],) * 2:
        raise ValueError(f"covariance shape {c.shape} does not match W {matrix.shape}")
    if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(c))):
        raise ValueError("non-finite values")
    # SVD of the PSD covariance (its eigenvectors; eigh was measured slower here, see
    # _leading_left_vectors). A tiny floor keeps directions the data never excited.
    vectors, values, _ = np.linalg.svd(0.5 * (c + c.T))
    floor = 1e-6 * max(float(np.mean(values)), 1e-30)
    root = vectors * np.sqrt(values + floor)
    left, _, _ = np.linalg.svd(matrix @ root, full_matrices=False)
    return np.asarray(left)


def svd_matrix_data(W: ArrayLike, cov: ArrayLike, rank: int, basis: ArrayLike | None = None
                    ) -> tuple[FloatArray, FloatArray, float]:
    """The rank-R ``U V`` minimizing ``E||(W - U V) x||^2`` for inputs of covariance ``cov``.

    Reduced-rank regression: ``U`` spans the top-R principal directions of the outputs
    (:func:`output_basis`; pass it as ``basis`` to reuse it across ranks) and ``V = U^T W``,
    so ``U V`` projects the layer's output onto its principal subspace (Zhang et al. 2016's
    response reconstruction, closed form for a linear layer). With ``cov = I`` it is the plain
    truncated SVD. Rows of ``V`` and columns of ``U`` are rescaled to equal norms.

    Returns:
        ``(U [m, R], V [R, n], rel_error)``, the error being ``||W - U V||_F / ||W||_F``.

    Raises:
        ValueError: for shapes that do not match, non-finite values or a rank out of range.

    """
    matrix = np.asarray(W, dtype=np.float64)
    full = output_basis(matrix, cov) if basis is None else np.asarray(basis, dtype=np.float64)
    rank = _check_rank(rank, min(matrix.shape), "SVD rank")
    left = full[:, :rank]
    right = left.T @ matrix
    scale = np.sqrt(np.maximum(np.linalg.norm(right, axis=1), 1e-30))
    left, right = left * scale, right / scale[:, None]
    total = float(np.sum(matrix**2))
    error = _relative(float(np.sum((matrix - left @ right) ** 2)), total)
    return left, right, error


# ---------------------------------------------------------------------------- ranks


def full_rank_cp(W: ArrayLike) -> int:
    """The generic upper bound on the CP rank of ``W``: ``min_k prod_{j != k} n_j``.

    Any tensor is a sum of that many rank-one terms (slice it along its largest mode). Used to cap
    requested ranks, not as a measure of cost; fractions use :func:`cp_break_even_rank`.
    """
    shape = np.shape(W)
    total = math.prod(shape)
    return min(total // size for size in shape if size > 0) if total > 0 else 0


def cp_break_even_rank(c_out: int, c_in: int, kh: int, kw: int) -> float:
    """``O*C*kh*kw / (O + C + kh + kw)``: the CP rank whose chain costs as much as the conv.

    At this rank the CP chain has the conv's parameter count and, at stride 1, its MACs per
    output pixel. A CP rank fraction (``--rank 0.25``) is a fraction of this number.
    """
    return c_out * c_in * kh * kw / (c_out + c_in + kh + kw)


def round_rank(
    r: float, multiple: int = 8, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Round a rank to a hardware-friendly value.

    ``r`` goes to the nearest multiple of ``multiple`` (halves round up), then is raised to
    ``minimum`` (default: ``multiple``) and lowered to ``maximum`` (the largest meaningful rank,
    e.g. the layer's full rank), in that order -- so the cap wins, and a capped result need not be
    a multiple. The result is never below 1.

    Raises:
        ValueError: for a non-finite or non-positive ``r``, or ``multiple``, ``minimum`` or
            ``maximum`` below 1.

    """
    if not math.isfinite(r) or r <= 0:
        raise ValueError(f"rank must be positive and finite, got {r!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    floor = multiple if minimum is None else minimum
    if floor < 1:
        raise ValueError(f"minimum must be >= 1, got {minimum}")
    if maximum is not None and maximum < 1:
        raise ValueError(f"maximum must be >= 1, got {maximum}")
    rounded = math.floor(r / multiple + 0.5) * multiple
    rounded = max(rounded, floor)
    if maximum is not None:
        rounded = min(rounded, maximum)
    return max(int(rounded), 1)


def _check_fraction(fraction: float) -> float:
    """``fraction`` when it is in ``(0, 1]``, else ``ValueError``."""
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"rank fraction must be in (0, 1], got {fraction!r}")
    return float(fraction)


def cp_rank_for_fraction(
    c_out: int, c_in: int, kh: int, kw: int, fraction: float, multiple: int = 8
) -> int:
    """CP rank for a fraction of the break-even rank, rounded and capped at ``full_rank_cp``."""
    target = _check_fraction(fraction) * cp_break_even_rank(c_out, c_in, kh, kw)
    cap = full_rank_cp(np.empty((c_out, c_in, kh, kw), dtype=np.int8))
    return round_rank(target, multiple, maximum=cap)


def tucker2_ranks_for_fraction(
    c_out: int, c_in: int, fraction: float, multiple: int = 8
) -> tuple[int, int]:
    """``(rank_out, rank_in)`` for a fraction of ``O`` and of ``C``, rounded and capped."""
    share = _check_fraction(fraction)
    return (
        round_rank(share * c_out, multiple, maximum=c_out),
        round_rank(share * c_in, multiple, maximum=c_in),
    )


def svd_rank_for_fraction(rows: int, cols: int, fraction: float, multiple: int = 8) -> int:
    """Rank for a fraction of ``min(rows, cols)``, rounded and capped at it.

    For spatial SVD pass ``rows = C*kh`` and ``cols = O*kw``.
    """
    full = min(rows, cols)
    return round_rank(_check_fraction(fraction) * full, multiple, maximum=full)


# ---------------------------------------------------------------------------- costs


def conv_costs(c_out: int, c_in: int, kh: int, kw: int) -> FactorCost:
    """The dense ``kh x kw`` conv ``C -> O``: ``O*C*kh*kw`` parameters and MACs per pixel."""
    size = c_out * c_in * kh * kw
    return FactorCost(params=size, macs=size)


def cp_costs(c_out: int, c_in: int, kh: int, kw: int, rank: int) -> FactorCost:
    """The CP chain: ``R*(C + kh + kw + O)`` parameters and MACs per output pixel."""
    size = rank * (c_in + kh + kw + c_out)
    return FactorCost(params=size, macs=size)


def tucker2_costs(
    c_out: int, c_in: int, kh: int, kw: int, rank_in: int, rank_out: int
) -> FactorCost:
    """The Tucker-2 chain: ``C*R1 + R2*R1*kh*kw + R2*O`` parameters and MACs per output pixel."""
    size = c_in * rank_in + rank_out * rank_in * kh * kw + rank_out * c_out
    return FactorCost(params=size, macs=size)


def spatial_svd_costs(c_out: int, c_in: int, kh: int, kw: int, rank: int) -> FactorCost:
    """The spatial SVD pair: ``R*C*kh + O*R*kw`` parameters and MACs per output pixel."""
    size = rank * c_in * kh + c_out * rank * kw
    return FactorCost(params=size, macs=size)


def svd_matrix_costs(rows: int, cols: int, rank: int) -> FactorCost:
    """The factorized matrix ``[m, R] @ [R, n]``: ``R*(m + n)`` parameters and MACs per row."""
    size = rank * (rows + cols)
    return FactorCost(params=size, macs=size)


def _area(hw: tuple[int, int]) -> int:
    """``H * W`` of a spatial size, checked."""
    height, width = hw
    if height < 1 or width < 1:
        raise ValueError(f"spatial size must be positive, got {hw}")
    return height * width


def conv_macs(c_out: int, c_in: int, kh: int, kw: int, out_hw: tuple[int, int]) -> int:
    """MACs of the dense conv for one image: ``O*C*kh*kw*H_out*W_out``."""
    return c_out * c_in * kh * kw * _area(out_hw)


def cp_macs(
    c_out: int,
    c_in: int,
    kh: int,
    kw: int,
    rank: int,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    merged: bool = False,
) -> int:
    """MACs of the CP chain for one image, each stage at the resolution it runs at.

    1x1 ``C -> R`` at ``H_in x W_in``; ``kh x 1`` depthwise (vertical stride) to
    ``H_out x W_in``; ``1 x kw`` depthwise (horizontal stride) to ``H_out x W_out``; 1x1
    ``R -> O`` at ``H_out x W_out``. ``merged``: one ``kh x kw`` depthwise stage instead.
    """
    _area(in_hw)
    _area(out_hw)
    (h_in, w_in), (h_out, w_out) = in_hw, out_hw
    if merged:
        return rank * c_in * h_in * w_in + (rank * kh * kw + c_out * rank) * h_out * w_out
    return (
        rank * c_in * h_in * w_in
        + rank * kh * h_out * w_in
        + rank * kw * h_out * w_out
        + c_out * rank * h_out * w_out
    )


def tucker2_macs(
    c_out: int,
    c_in: int,
    kh: int,
    kw: int,
    rank_in: int,
    rank_out: int,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
) -> int:
    """MACs of the Tucker-2 chain for one image.

    1x1 ``C -> R1`` at ``H_in x W_in``; ``kh x kw`` core ``R1 -> R2`` and 1x1 ``R2 -> O`` at
    ``H_out x W_out``.
    """
    return c_in * rank_in * _area(in_hw) + (
        rank_out * rank_in * kh * kw + c_out * rank_out
    ) * _area(out_hw)


def spatial_svd_macs(
    c_out: int,
    c_in: int,
    kh: int,
    kw: int,
    rank: int,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
) -> int:
    """MACs of the spatial SVD pair for one image.

    ``kh x 1`` conv ``C -> R`` (vertical stride) to ``H_out x W_in``; ``1 x kw`` conv
    ``R -> O`` (horizontal stride) to ``H_out x W_out``.
    """
    _area(in_hw)
    _area(out_hw)
    (_, w_in), (h_out, w_out) = in_hw, out_hw
    return rank * c_in * kh * h_out * w_in + c_out * rank * kw * h_out * w_out


# ---------------------------------------------------------------------------- least squares


def conv_io_to_rows(x: ArrayLike) -> np.ndarray:
    """Channels-last rows of an NCHW activation: ``[N, C, H, W] -> [N*H*W, C]``.

    The dtype is kept (the accumulator casts each chunk to float64 itself).
    """
    array = np.asarray(x)
    if array.ndim != 4:
        raise ValueError(f"expected an NCHW array, got shape {array.shape}")
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)).reshape(-1, array.shape[1])


class RidgeAccumulator:
    """Streaming ridge regression ``Y ~ Z @ Wt + b`` with memory independent of the samples.

    :meth:`add` takes chunks of rows (samples or pixels) and accumulates, in float64,
    ``Z~^T Z~`` and ``Z~^T Y`` for ``Z~ = [Z, 1]`` (the column of ones only with ``fit_bias``),
    the per-target sums of squares ``diag(Y^T Y)``, the column sums of ``Z`` and ``Y`` and the row
    count. That is
    ``O((F + 1)^2 + (F + 1) T)`` numbers whatever the number of rows.
    """

    def __init__(self, n_features: int, n_targets: int, fit_bias: bool = True) -> None:
        if n_features < 1 or n_targets < 1:
            raise ValueError(f"need n_features, n_targets >= 1, got {n_features}, {n_targets}")
        self.n_features = int(n_features)
        self.n_targets = int(n_targets)
        self.fit_bias = bool(fit_bias)
        width = self.n_features + (1 if self.fit_bias else 0)
        self.zz: FloatArray = np.zeros((width, width))
        """``Z~^T Z~``."""
        self.zy: FloatArray = np.zeros((width, self.n_targets))
        """``Z~^T Y``."""
        self.yy: FloatArray = np.zeros(self.n_targets)
        """``diag(Y^T Y)``: the sum of squares of each target."""
        self.z_sum: FloatArray = np.zeros(self.n_features)
        """Column sums of ``Z``."""
        self.y_sum: FloatArray = np.zeros(self.n_targets)
        """Column sums of ``Y``."""
        self.count = 0
        """Rows accumulated."""

    def add(self, Z: ArrayLike, Y: ArrayLike) -> None:
        """Accumulate a chunk of ``N`` rows: ``Z[N, n_features]`` and ``Y[N, n_targets]``.

        Raises:
            ValueError: on shapes that do not match or non-finite values.

        """
        features = np.asarray(Z, dtype=np.float64)
        targets = np.asarray(Y, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"Z must be [N, {self.n_features}], got {features.shape}")
        if targets.ndim != 2 or targets.shape != (features.shape[0], self.n_targets):
            raise ValueError(
                f"Y must be [{features.shape[0]}, {self.n_targets}], got {targets.shape}"
            )
        if not (np.all(np.isfinite(features)) and np.all(np.isfinite(targets))):
            raise ValueError("non-finite values in a least-squares chunk")
        self.z_sum += features.sum(axis=0)
        self.y_sum += targets.sum(axis=0)
        if self.fit_bias:
            features = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
        self.zz += features.T @ features
        self.zy += features.T @ targets
        self.yy += np.einsum("nt,nt->t", targets, targets)
        self.count += features.shape[0]

    def solve(self, ridge: float = 1e-4) -> tuple[FloatArray, FloatArray]:
        """Solve the (ridge) normal equations.

        Args:
            ridge: penalty on ``Wt`` relative to the mean diagonal of ``Z^T Z`` (the bias is not
                penalized); 0 gives ordinary least squares (minimum-norm when singular).

        Returns:
            ``(Wt [n_features, n_targets], b [n_targets])``; ``b`` is zeros without ``fit_bias``.

        Raises:
            ValueError: for a negative ridge or when nothing was added.

        """
        if not (math.isfinite(ridge) and ridge >= 0.0):
            raise ValueError(f"ridge must be finite and >= 0, got {ridge!r}")
        if self.count == 0:
            raise ValueError("no data accumulated")
        features = self.n_features
        scale = float(np.mean(np.diag(self.zz)[:features]))
        penalty = np.zeros(self.zz.shape[0])
        penalty[:features] = ridge * scale
        system = self.zz + np.diag(penalty)
        try:
            solution = np.linalg.solve(system, self.zy)
        except np.linalg.LinAlgError:
            solution = np.linalg.lstsq(system, self.zy, rcond=None)[0]
        if not np.all(np.isfinite(solution)):
            solution = np.linalg.lstsq(system, self.zy, rcond=None)[0]
        weights = np.ascontiguousarray(solution[:features])
        bias = solution[features] if self.fit_bias else np.zeros(self.n_targets)
        return weights, np.ascontiguousarray(bias)

    def residual(self, Wt: ArrayLike, b: ArrayLike | None = None) -> float:
        """``||Z Wt + b - Y||_F^2 / ||Y||_F^2`` over all rows added, from the moments alone.

        Returns:
            The relative squared residual (0 when ``Y`` is all zero and so is the fit).

        Raises:
            ValueError: on shapes that do not match.

        """
        weights = np.asarray(Wt, dtype=np.float64)
        if weights.shape != (self.n_features, self.n_targets):
            raise ValueError(
                f"Wt must be [{self.n_features}, {self.n_targets}], got {weights.shape}"
            )
        bias = np.zeros(self.n_targets) if b is None else np.asarray(b, dtype=np.float64)
        if bias.shape != (self.n_targets,):
            raise ValueError(f"b must be [{self.n_targets}], got {bias.shape}")
        target_sq = float(self.yy.sum())
        if self.fit_bias:
            full = np.concatenate([weights, bias[None, :]], axis=0)
            bias_terms = 0.0
        else:
            # No ones column: add 2 b.(sum_n z_n Wt - sum_n y_n) + N ||b||^2 from the column sums.
            full = weights
            column_sums = self.z_sum @ weights - self.y_sum
            bias_terms = 2.0 * float(bias @ column_sums) + self.count * float(bias @ bias)
        quadratic = float(np.sum(full * (self.zz @ full)))
        cross = float(np.sum(full * self.zy))
        residual_sq = max(quadratic - 2.0 * cross + target_sq + bias_terms, 0.0)
        if target_sq == 0.0:
            return 0.0 if residual_sq == 0.0 else math.inf
        return residual_sq / target_sq
