"""Shared low-rank math for the decomposition passes: Tucker-2, SVD, output bases, MACs.

Pure numpy (no ONNX). Every function computes in float64 and returns float64 arrays; callers
cast to the model's dtype. Everything random is drawn from ``numpy.random.default_rng(seed)``,
so results are deterministic for a given seed. CP lives in :mod:`onnxcomp.cp_als`.

Kernels use the ONNX ``Conv`` layout ``W[O, C, kh, kw]`` (``groups == 1``).

- :func:`tucker2_conv` -- Tucker-2 over the channel modes, ``W ~ core x_0 U_out x_1 U_in``
  (Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
  Applications", ICLR 2016, arXiv:1511.06530), fitted by HOOI from a truncated HOSVD. As a chain:
  1x1 ``C -> R1``, ``kh x kw`` core ``R1 -> R2``, 1x1 ``R2 -> O``. :func:`tucker2_conv_data`
  fits the output factor to the layer's outputs on calibration data instead.
- :func:`spatial_svd_conv` -- scheme 2 of Jaderberg et al., "Speeding up Convolutional Neural
  Networks with Low Rank Expansions", BMVC 2014, arXiv:1405.3866: ``kh x 1`` conv ``C -> R``
  then ``1 x kw`` conv ``R -> O``, from a truncated SVD of ``W`` arranged as
  ``M[(C, kh), (O, kw)]``.
- :func:`svd_matrix` -- truncated SVD of a 2-D weight (Gemm / MatMul / 1x1 Conv);
  :func:`svd_matrix_data` keeps the principal subspace of the outputs (reduced-rank regression).

``*_macs`` count multiply-adds from the input and output spatial sizes: with stride the first
1x1 stage of CP and Tucker-2 runs at the *input* resolution and the ``kh x 1`` stages of CP and
spatial SVD produce ``H_out x W_in`` maps.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
"""A float64 numpy array."""

QUADRATIC_ERROR_FLOOR = 1e-5
"""Below this relative error an error from a quadratic form is recomputed (it cancels)."""

EXACT_FLOOR = 1e-12
"""A relative error below this counts as converged whatever its last change."""


# ---------------------------------------------------------------------------- results


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


# ---------------------------------------------------------------------------- validation


def as_kernel(W: ArrayLike) -> FloatArray:
    """``W`` as a finite float64 ``[O, C, kh, kw]`` array, or ``ValueError``."""
    kernel = np.asarray(W, dtype=np.float64)
    if kernel.ndim != 4 or 0 in kernel.shape:
        raise ValueError(f"expected a non-empty 4-D kernel [O, C, kh, kw], got {kernel.shape}")
    if not np.all(np.isfinite(kernel)):
        raise ValueError("kernel has non-finite values")
    return kernel


def check_rank(rank: int, maximum: int | None, what: str) -> int:
    """``rank`` as an int in ``[1, maximum]``, or ``ValueError``."""
    if isinstance(rank, bool) or int(rank) != rank:
        raise ValueError(f"{what} must be an integer, got {rank!r}")
    value = int(rank)
    if value < 1 or (maximum is not None and value > maximum):
        bound = "" if maximum is None else f", at most {maximum}"
        raise ValueError(f"{what} must be at least 1{bound}, got {value}")
    return value


def relative(residual_sq: float, total_sq: float) -> float:
    """``sqrt(residual_sq / total_sq)``, 0 for a zero total, clamped at 0 below."""
    if total_sq <= 0.0:
        return 0.0
    return math.sqrt(max(residual_sq, 0.0) / total_sq)


# ---------------------------------------------------------------------------- CP


def leading_left_vectors(matrix: FloatArray, count: int) -> FloatArray:
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
    kernel = as_kernel(W)
    c_out, c_in, kh, kw = kernel.shape
    rank_out = check_rank(rank_out, c_out, "Tucker-2 rank_out")
    rank_in = check_rank(rank_in, c_in, "Tucker-2 rank_in")
    kernel_sq = float(np.vdot(kernel, kernel))

    U_out = _svd_left(kernel.reshape(c_out, -1), rank_out)
    U_in = _svd_left(np.moveaxis(kernel, 1, 0).reshape(c_in, -1), rank_in)
    core = np.einsum("ocij,op,cq->pqij", kernel, U_out, U_in, optimize=True)
    error = _tucker2_error(kernel, kernel_sq, core, U_out, U_in)
    iterations = 0
    while iterations < n_iter and error > EXACT_FLOOR:
        iterations += 1
        partial = np.einsum("ocij,cq->oqij", kernel, U_in, optimize=True)
        new_out = leading_left_vectors(partial.reshape(c_out, -1), rank_out)
        partial = np.einsum("ocij,op->cpij", kernel, new_out, optimize=True)
        new_in = leading_left_vectors(partial.reshape(c_in, -1), rank_in)
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
    kernel = as_kernel(W)
    c_out, c_in, kh, kw = kernel.shape
    rank_out = check_rank(rank_out, c_out, "Tucker-2 rank_out")
    rank_in = check_rank(rank_in, c_in, "Tucker-2 rank_in")
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
    error = relative(kernel_sq - float(np.vdot(core, core)), kernel_sq)
    if error >= QUADRATIC_ERROR_FLOOR:
        return error
    residual = kernel - np.einsum("pqij,op,cq->ocij", core, U_out, U_in, optimize=True)
    return relative(float(np.vdot(residual, residual)), kernel_sq)


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
    error = relative(float(np.sum(values[rank:] ** 2)), total_sq)
    return left[:, :rank] * root, root[:, None] * right[:rank], error


def gram_svd(w: np.ndarray, rank: int, block_bytes: int = 1 << 26
             ) -> tuple[FloatArray, FloatArray, float]:
    """What :func:`truncate_svd` gives, from the Gram matrix of ``w``'s shorter side.

    For a very wide or tall matrix a full SVD holds several float64 copies of it; here only the
    ``m x m`` Gram matrix (``m`` the shorter side) and the ``R`` kept rows of the other factor
    are formed, reading ``w`` (any float dtype) in column blocks. Singular values come from
    eigenvalues, so they are accurate to about ``sqrt(eps)`` of the largest: enough for the
    leading directions a truncation keeps, not for the tail.
    """
    wide = w.shape[0] <= w.shape[1]
    a = w if wide else w.T  # [m, K], m <= K
    m, k = a.shape
    step = max(1, block_bytes // (8 * m))
    gram = np.zeros((m, m))
    for j in range(0, k, step):
        block = a[:, j:j + step].astype(np.float64)
        gram += block @ block.T
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0.0, None)
    r = min(rank, m)
    left = vectors[:, order[:r]]
    sv = np.sqrt(values[:r])
    right = np.empty((r, k))
    for j in range(0, k, step):
        right[:, j:j + step] = left.T @ a[:, j:j + step].astype(np.float64)
    right /= np.where(sv > 0, sv, 1.0)[:, None]
    error = relative(float(np.sum(values[r:])), float(np.sum(values)))
    root = np.sqrt(sv)
    if wide:
        return left * root, root[:, None] * right, error
    return right.T * root, root[:, None] * left.T, error


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
    kernel = as_kernel(W)
    c_out, c_in, kh, kw = kernel.shape
    rank = check_rank(rank, min(c_in * kh, c_out * kw), "spatial SVD rank")
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
    rank = check_rank(rank, min(matrix.shape), "SVD rank")
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
    # leading_left_vectors). A tiny floor keeps directions the data never excited.
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
    rank = check_rank(rank, min(matrix.shape), "SVD rank")
    left = full[:, :rank]
    right = left.T @ matrix
    scale = np.sqrt(np.maximum(np.linalg.norm(right, axis=1), 1e-30))
    left, right = left * scale, right / scale[:, None]
    total = float(np.sum(matrix**2))
    error = relative(float(np.sum((matrix - left @ right) ** 2)), total)
    return left, right, error


# ---------------------------------------------------------------------------- ranks


# ---------------------------------------------------------------------------- costs


Size = tuple[int, int]


def _sizes(in_hw: Size, out_hw: Size) -> tuple[int, int, int, int]:
    """``H_in, W_in, H_out, W_out``, checked positive."""
    for hw in (in_hw, out_hw):
        if hw[0] < 1 or hw[1] < 1:
            raise ValueError(f"spatial size must be positive, got {hw}")
    return (*in_hw, *out_hw)


def cp_macs(weight: tuple[int, ...], rank: int, in_hw: Size, out_hw: Size,
            merged: bool = False) -> int:
    """MACs of the CP chain of a ``(O, C, kh, kw)`` conv for one image, each stage at its size.

    1x1 ``C -> R`` at ``H_in x W_in``; ``kh x 1`` depthwise (vertical stride) to
    ``H_out x W_in``; ``1 x kw`` depthwise (horizontal stride) to ``H_out x W_out``; 1x1
    ``R -> O`` at ``H_out x W_out``. ``merged``: one ``kh x kw`` depthwise stage instead.
    """
    c_out, c_in, kh, kw = weight
    h_in, w_in, h_out, w_out = _sizes(in_hw, out_hw)
    if merged:
        return rank * c_in * h_in * w_in + (rank * kh * kw + c_out * rank) * h_out * w_out
    return (rank * c_in * h_in * w_in + rank * kh * h_out * w_in + rank * kw * h_out * w_out
            + c_out * rank * h_out * w_out)


def tucker2_macs(weight: tuple[int, ...], rank_in: int, rank_out: int, in_hw: Size,
                 out_hw: Size) -> int:
    """MACs of the Tucker-2 chain of a ``(O, C, kh, kw)`` conv for one image.

    1x1 ``C -> R1`` at ``H_in x W_in``; ``kh x kw`` core ``R1 -> R2`` and 1x1 ``R2 -> O`` at
    ``H_out x W_out``.
    """
    c_out, c_in, kh, kw = weight
    h_in, w_in, h_out, w_out = _sizes(in_hw, out_hw)
    return (c_in * rank_in * h_in * w_in
            + (rank_out * rank_in * kh * kw + c_out * rank_out) * h_out * w_out)


def spatial_svd_macs(weight: tuple[int, ...], rank: int, in_hw: Size, out_hw: Size) -> int:
    """MACs of the spatial SVD pair of a ``(O, C, kh, kw)`` conv for one image.

    ``kh x 1`` conv ``C -> R`` (vertical stride) to ``H_out x W_in``; ``1 x kw`` conv
    ``R -> O`` (horizontal stride) to ``H_out x W_out``.
    """
    c_out, c_in, kh, kw = weight
    _, w_in, h_out, w_out = _sizes(in_hw, out_hw)
    return rank * c_in * kh * h_out * w_in + c_out * rank * kw * h_out * w_out


# ---------------------------------------------------------------------------- least squares


