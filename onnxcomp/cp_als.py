"""CP (CANDECOMP/PARAFAC) of a conv kernel by alternating least squares.

``W ~ sum_r A[:, r] (x) B[:, r] (x) Kh[:, r] (x) Kw[:, r]`` (Lebedev et al., "Speeding-up
Convolutional Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015, arXiv:1412.6553),
fitted by alternating least squares written for small spatial modes, with the degeneracy check
of Phan et al., "Stable Low-rank Tensor Decomposition for Compression of Convolutional Neural
Network", ECCV 2020, arXiv:2008.05441. As a chain of convolutions: 1x1 ``C -> R``, depthwise
``kh x 1``, depthwise ``1 x kw``, 1x1 ``R -> O``.

Pure numpy, float64, deterministic for a given seed (see :mod:`onnxcomp.lowrank`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
from numpy.typing import ArrayLike

from onnxcomp.lowrank import (
    EXACT_FLOOR,
    QUADRATIC_ERROR_FLOOR,
    FloatArray,
    as_kernel,
    check_rank,
    leading_left_vectors,
    relative,
)

log = logging.getLogger(__name__)


CP_MAX_COMPONENT_RATIO = 10.0
"""Degenerate when one rank-one component's norm exceeds this multiple of ``||W||``."""

CP_CANCELLATION_RATIO = 10.0
"""Degenerate when ``sqrt(sum_r norm_r^2)`` exceeds this multiple of ``||W||`` (cancellation)."""

CP_PAIR_CONGRUENCE = -0.9
"""Degenerate when two components, each of norm above ``||W||``, have a congruence below this."""

_RIDGE_REL = 1e-10
"""Ridge added to the ALS normal equations, relative to the trace of their Gram matrix."""

_LINE_SEARCH_START = 3
"""First ALS sweep after which the step ``sweep ** (1/3)`` extrapolation is tried."""


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
        factor = leading_left_vectors(unfolding, rank)
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
    kernel = as_kernel(W)
    rank = check_rank(rank, None, "CP rank")
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
        if error < EXACT_FLOOR or change <= tol * error:
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
    error = relative(kernel_sq - 2.0 * inner + approx_sq, kernel_sq)
    if error < QUADRATIC_ERROR_FLOOR:
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
        error = relative(kernel_sq - 2.0 * inner + float(grams.sum()), kernel_sq)
        if error >= QUADRATIC_ERROR_FLOOR or not math.isfinite(error):
            return error
    residual = matrix - scaled @ right.T
    return relative(float(np.vdot(residual, residual)), kernel_sq)
