"""Least-squares refits of a replacement chain's last stage, and errors in closed form.

A chain ``A (P x) + b`` is refit by solving for ``[A, b]`` from the moments of its input
(:mod:`onnxcomp.moments`): symmetric (targets ``W x + b`` on the same inputs) or asymmetric
(inputs from the compressed network, targets from the original, Zhang et al. 2016,
arXiv:1505.06798). Errors of any ``[A, b]`` follow from the same moments.
"""

from __future__ import annotations

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


def _target_matrix(layer: Layer) -> np.ndarray:
    return np.hstack([layer.matrix, layer.bias_vector[:, None]])


def refit_solution(
    layer: Layer, plan: Plan, xx: np.ndarray, xy: np.ndarray | None, ridge: float
) -> np.ndarray:
    """Least-squares ``[A, b]`` [y_dim, F+1] minimizing ``E||A z + b - y||^2``.

    ``xx`` is ``E[x~ x~^T]`` of the layer input the chain will see; ``xy`` is ``E[x~ y^T]``
    (None: symmetric, ``y = W x + b`` on the same inputs).
    """
    pa = _aug_prefix(plan.prefix)
    gram = pa @ xx @ pa.T
    cross = pa @ (xx @ _target_matrix(layer).T if xy is None else xy)  # [F+1, y_dim]
    reg = ridge * float(np.trace(gram[:-1, :-1])) / max(gram.shape[0] - 1, 1)
    eye = np.eye(gram.shape[0])
    eye[-1, -1] = 0.0  # the bias is not regularized
    gram = gram + reg * eye
    try:
        sol = np.linalg.solve(gram, cross)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(gram, cross, rcond=None)[0]
    return np.asarray(sol.T)


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


def plan_error(layer: Layer, plan: Plan, ab: np.ndarray, xx: np.ndarray,
               xy: np.ndarray | None, yy: float) -> float:
    """Relative RMS error ``sqrt(E||A z + b - y||^2 / E||y||^2)`` from moments."""
    pa = _aug_prefix(plan.prefix)
    m = ab @ pa  # [y_dim, D+1]: the chain as a map of x~
    quad = float(np.sum((m @ xx) * m))
    cross = float(np.sum(m * (xx @ _target_matrix(layer).T).T)) if xy is None else float(
        np.sum(m.T * xy))
    if xy is None:
        t = _target_matrix(layer)
        yy = float(np.sum((t @ xx) * t))
    err = max(quad - 2 * cross + yy, 0.0)
    return float(np.sqrt(err / yy)) if yy > 0 else float(np.sqrt(err))


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
