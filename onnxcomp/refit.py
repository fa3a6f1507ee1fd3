"""Least-squares refits of a replacement chain's last stage, and errors in closed form.

A chain ``A (P x) + b`` is refit by solving for ``[A, b]`` from the moments of its input
(:mod:`onnxcomp.moments`): symmetric (targets ``W x + b`` on the same inputs) or asymmetric
(inputs from the compressed network, targets from the original, Zhang et al. 2016,
arXiv:1505.06798). Errors of any ``[A, b]`` follow from the same moments.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from onnxcomp.linear import Layer, Plan

# A refit needs this many sampled rows per unknown of each output (see refit_rows_needed).
REFIT_ROWS_PER_UNKNOWN = 10


def _aug_prefix(p: np.ndarray) -> np.ndarray:
    f, d = p.shape
    out = np.zeros((f + 1, d + 1))
    out[:f, :d] = p
    out[f, d] = 1.0
    return out


def _target_blocks(layer: Layer, block_bytes: int = 1 << 26) -> Iterator[np.ndarray]:
    """Rows of ``[W, b]`` in float64, in blocks of about ``block_bytes``."""
    n, d = layer.matrix_shape
    weight = layer.weight.reshape(n, d)
    bias = layer.bias_vector
    step = max(1, block_bytes // (8 * (d + 1)))
    for start in range(0, n, step):
        rows = weight[start:start + step].astype(np.float64)
        yield np.hstack([rows, bias[start:start + step, None]])


class ChainFit:
    """Refits and errors of every chain of one layer, from one set of moments.

    The work that does not depend on the chain is done once per layer: the target's moments
    ``T E[x~ x~^T]`` (symmetric) and ``E||y||^2``. Per chain only ``P E[x~ x~^T] P^T`` and
    ``P E[x~ y^T]`` remain, of size (rank + 1)^2 and (rank + 1) x outputs; a plan's error and
    refit follow from them. On a 512-channel 3x3 conv (4,609-wide inputs) that is one product
    of the 4,609^2 moment matrix with a 512-row target per layer instead of about five per
    rank option.

    ``xy`` None: symmetric (targets ``W x + b`` on the same inputs); else the asymmetric
    ``E[x~ y^T]`` and ``yy`` = ``E||y||^2``.
    """

    def __init__(self, layer: Layer, xx: np.ndarray, xy: np.ndarray | None = None,
                 yy: float = 0.0) -> None:
        self.xx = xx
        # Symmetric: E[x~ y^T] = xx T^T is not stored (as large as the layer's weight, in
        # float64); each plan's cross moments are formed from the target in row blocks.
        self._layer: Layer | None = layer if xy is None else None
        self.xy: np.ndarray | None = xy
        if xy is None:
            self.yy = sum(float(np.sum((t @ xx) * t)) for t in _target_blocks(layer))
        else:
            self.yy = float(yy)
        # Per plan (by identity): its moments and refits; small, (rank + 1)-sized.
        self._per_plan: dict[int, tuple[Plan, np.ndarray, np.ndarray]] = {}
        self._refits: dict[tuple[int, float], np.ndarray] = {}

    def _moments(self, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """``(P~ xx P~^T, P~ xy)`` for the plan's augmented prefix (cached per plan)."""
        hit = self._per_plan.get(id(plan))
        if hit is None or hit[0] is not plan:
            pa = _aug_prefix(plan.prefix)
            pxx = pa @ self.xx
            if self.xy is not None:
                cross = pa @ self.xy
            else:
                assert self._layer is not None
                cross = np.hstack([pa @ (self.xx @ t.T) for t in _target_blocks(self._layer)])
            hit = (plan, pxx @ pa.T, cross)  # gram, cross [F+1, y_dim]
            self._per_plan[id(plan)] = hit
        return hit[1], hit[2]

    def refit(self, plan: Plan, ridge: float) -> np.ndarray:
        """Least-squares ``[A, b]`` [y_dim, F+1] minimizing ``E||A z + b - y||^2``."""
        key = (id(plan), ridge)
        if key not in self._refits:
            self._refits[key] = self._solve(plan, ridge)
        return self._refits[key]

    def _solve(self, plan: Plan, ridge: float) -> np.ndarray:
        gram, cross = self._moments(plan)
        reg = ridge * float(np.trace(gram[:-1, :-1])) / max(gram.shape[0] - 1, 1)
        eye = np.eye(gram.shape[0])
        eye[-1, -1] = 0.0  # the bias is not regularized
        try:
            sol = np.linalg.solve(gram + reg * eye, cross)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(gram + reg * eye, cross, rcond=None)[0]
        return np.asarray(sol.T)

    def error(self, plan: Plan, ab: np.ndarray) -> float:
        """Relative RMS error ``sqrt(E||A z + b - y||^2 / E||y||^2)`` of ``ab``."""
        gram, cross = self._moments(plan)
        quad = float(np.sum((ab @ gram) * ab))
        err = max(quad - 2 * float(np.sum(ab * cross.T)) + self.yy, 0.0)
        return float(np.sqrt(err / self.yy)) if self.yy > 0 else float(np.sqrt(err))


def refit_solution(
    layer: Layer, plan: Plan, xx: np.ndarray, xy: np.ndarray | None, ridge: float
) -> np.ndarray:
    """Least-squares ``[A, b]`` of one chain (see :class:`ChainFit` for many)."""
    return ChainFit(layer, xx, xy).refit(plan, ridge)


def refit_rows_needed(plan: Plan) -> int:
    """Sampled rows a refit of ``plan`` needs: :data:`REFIT_ROWS_PER_UNKNOWN` per unknown.

    Each output's refit has ``F + 1`` unknowns (``F`` = the chain's width before its last
    stage). With fewer rows the least squares interpolates the calibration data and
    generalizes badly (a 1280-wide FC layer refit on 32 samples matched them to 4e-5 and
    lost every held-out prediction), so the raw decomposition is kept instead.
    """
    return REFIT_ROWS_PER_UNKNOWN * (int(plan.prefix.shape[0]) + 1)


def optimism(plan: Plan, rows: int) -> float:
    """Factor from in-sample to expected out-of-sample RMS error of a least-squares refit.

    For ordinary least squares with ``p`` unknowns and ``n`` rows, the expected residual is
    ``s^2 (1 - p/n)`` on the fitted rows and ``s^2 (1 + p/n)`` on new ones.
    """
    ratio = (int(plan.prefix.shape[0]) + 1) / max(rows, 1)
    if ratio >= 1:
        return float("inf")
    return float(np.sqrt((1 + ratio) / (1 - ratio)))


def plan_ab(layer: Layer, plan: Plan) -> np.ndarray:
    """The plan's own ``[A, b]`` (no refit)."""
    return np.hstack([plan.last, layer.bias_vector[:, None]])


def shrunk_solve(gram: np.ndarray, cross: np.ndarray, start: np.ndarray, ridge: float
                 ) -> np.ndarray:
    """Least squares shrunk toward ``start``: ``argmin_A E||A x - y||^2 + lam ||A - start||^2``.

    ``gram = E[x x^T]``, ``cross = E[y x^T]``, ``lam = ridge * mean(diag(gram))``.

    Shrinking toward the starting weights (not toward zero) keeps what calibration data
    cannot pin down as it was: a few dozen images leave many directions unseen, and a
    plain least squares fits them to noise.
    """
    lam = ridge * float(np.trace(gram)) / max(gram.shape[0], 1)
    lhs = gram + lam * np.eye(gram.shape[0])
    return np.asarray(np.linalg.solve(lhs, (cross + lam * start).T).T)
