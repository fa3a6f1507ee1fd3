"""Kernel sharing and depthwise-separable approximations of a dense conv kernel (numpy only).

Kernel sharing (KSC; weighted KSC): the input channels of ``W[O, C, kh, kw]`` are split into
``G`` groups and every channel of a group uses the group's kernel::

    W[:, c] ~ alpha_c * K[:, g(c)]          (KSC: alpha_c = 1)

so the conv becomes a 1x1 conv ``S[G, C]`` (``S[g, c] = alpha_c`` if ``g(c) = g``, else 0)
followed by a kh x kw conv ``K[O, G, kh, kw]``. Both objectives are fit exactly by Lloyd
iterations on the weight error ``sum_c ||W_c - alpha_c K_g(c)||^2`` (``W_c`` = the slice
``W[:, c]`` flattened):

* KSC: plain k-means on the slices (the best shared kernel of a group is the mean of its
  slices);
* WKSC: one-dimensional k-subspaces: the best ``K_g`` is the leading right singular vector
  of the group's stacked slices, ``alpha_c = <W_c, K_g>``, and a channel joins the group whose
  kernel direction captures most of it (``<W_c, K_g>^2``). Sign does not matter (``alpha`` may
  be negative), so a slice and its negation share a kernel, which normalized k-means would
  not allow.

Depthwise-separable: per input channel, the ``[O, kh*kw]`` slice is approximated at rank ``m``
by SVD, ``W[o, c, :] ~ sum_j P[o, c, j] D[c, j, :]``: a depthwise kh x kw conv with ``C*m``
outputs (``groups = C``, depth multiplier ``m``) followed by a 1x1 conv ``P`` (``C*m -> O``).
Exact when every slice has rank <= m.

Reference: the kernel-sharing thesis (KSC/WKSC) this project is seeded with; MobileNets
(Howard et al. 2017, arXiv:1704.04861) for the depthwise-separable form.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SharingResult:
    """``W[:, c] ~ alpha[c] * kernels[:, groups[c]]``."""

    groups: np.ndarray  # [C] int, group of each input channel
    alpha: np.ndarray  # [C] per-channel weights (all ones for plain KSC)
    kernels: np.ndarray  # [O, G, kh, kw]
    rel_error: float  # ||W - W~|| / ||W||
    iterations: int

    def share_matrix(self) -> np.ndarray:
        """The 1x1 conv weight ``S[G, C]`` that sums each group's (weighted) channels."""
        g = self.kernels.shape[1]
        s = np.zeros((g, self.groups.size))
        s[self.groups, np.arange(self.groups.size)] = self.alpha
        return s

    def reconstruct(self) -> np.ndarray:
        """The approximated kernel ``W~[O, C, kh, kw]``."""
        return self.kernels[:, self.groups] * self.alpha[None, :, None, None]


def _relative(residual_sq: float, total_sq: float) -> float:
    return float(np.sqrt(max(residual_sq, 0.0) / total_sq)) if total_sq > 0 else 0.0


def kernel_sharing(w: np.ndarray, groups: int, weighted: bool = True, seed: int = 0,
                   max_iter: int = 50) -> SharingResult:
    """Fit KSC (``weighted=False``) or WKSC with ``groups`` shared kernels; see module doc."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"expected a conv kernel [O, C, kh, kw], got shape {w.shape}")
    o, c, kh, kw = w.shape
    if not 1 <= groups <= c:
        raise ValueError(f"groups must be in [1, {c}], got {groups}")
    slices = w.transpose(1, 0, 2, 3).reshape(c, -1)  # [C, O*kh*kw]
    total = float(np.sum(slices * slices))
    rng = np.random.default_rng(seed)
    centers = _init_centers(slices, groups, weighted, rng)
    assign = np.zeros(c, dtype=np.int64)
    it = 0
    for it in range(1, max_iter + 1):
        new = _assign(slices, centers, weighted)
        new = _fill_empty(slices, centers, new, weighted)
        if it > 1 and np.array_equal(new, assign):
            break
        assign = new
        centers = _update(slices, assign, groups, weighted)
    alpha = np.einsum("cd,cd->c", slices, centers[assign]) if weighted else np.ones(c)
    approx = alpha[:, None] * centers[assign]
    err = _relative(float(np.sum((slices - approx) ** 2)), total)
    kernels = centers.reshape(groups, o, kh, kw).transpose(1, 0, 2, 3)
    return SharingResult(assign, alpha, np.ascontiguousarray(kernels), err, it)


def _init_centers(slices: np.ndarray, groups: int, weighted: bool,
                  rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (on directions for the weighted objective)."""
    pts = slices
    if weighted:
        norms = np.linalg.norm(slices, axis=1, keepdims=True)
        pts = slices / np.maximum(norms, 1e-30)
    first = int(np.argmax(np.linalg.norm(slices, axis=1)))
    chosen = [first]
    for _ in range(1, groups):
        d = _residuals(slices, pts[chosen], weighted).min(axis=1)
        total = float(d.sum())
        if total <= 0:
            rest = [i for i in range(len(pts)) if i not in chosen]
            chosen.append(int(rng.choice(rest)))
            continue
        chosen.append(int(rng.choice(len(pts), p=d / total)))
    return pts[chosen].copy()


def _residuals(slices: np.ndarray, centers: np.ndarray, weighted: bool) -> np.ndarray:
    """``[C, G]`` squared error of representing each slice by each center."""
    if weighted:  # centers are unit vectors: residual = ||w||^2 - <w, k>^2
        proj = slices @ centers.T
        return np.maximum(np.sum(slices * slices, axis=1)[:, None] - proj * proj, 0.0)
    return np.maximum(np.sum(slices * slices, axis=1)[:, None] - 2 * slices @ centers.T
                      + np.sum(centers * centers, axis=1)[None, :], 0.0)


def _assign(slices: np.ndarray, centers: np.ndarray, weighted: bool) -> np.ndarray:
    return np.argmin(_residuals(slices, centers, weighted), axis=1)


def _fill_empty(slices: np.ndarray, centers: np.ndarray, assign: np.ndarray,
                weighted: bool) -> np.ndarray:
    """Give every empty group the worst-represented channel (of a group with others)."""
    assign = assign.copy()
    g = centers.shape[0]
    for k in range(g):
        if np.any(assign == k):
            continue
        res = _residuals(slices, centers, weighted)[np.arange(len(assign)), assign]
        sizes = np.bincount(assign, minlength=g)
        movable = np.flatnonzero(sizes[assign] > 1)
        if movable.size == 0:
            break
        assign[movable[np.argmax(res[movable])]] = k
    return assign


def _update(slices: np.ndarray, assign: np.ndarray, groups: int, weighted: bool) -> np.ndarray:
    centers = np.zeros((groups, slices.shape[1]))
    for k in range(groups):
        members = slices[assign == k]
        if members.size == 0:
            continue
        if weighted:
            _, _, vt = np.linalg.svd(members, full_matrices=False)
            v = vt[0]
            # A deterministic sign: the group's largest alpha is positive.
            proj = members @ v
            if proj[np.argmax(np.abs(proj))] < 0:
                v = -v
            centers[k] = v
        else:
            centers[k] = members.mean(axis=0)
    return centers


@dataclasses.dataclass(frozen=True)
class SeparableResult:
    """``W[o, c, :, :] ~ sum_j pointwise[o, c*m + j] * depthwise[c*m + j, 0, :, :]``."""

    depthwise: np.ndarray  # [C*m, 1, kh, kw]
    pointwise: np.ndarray  # [O, C*m]
    rel_error: float
    channels: int  # C

    @property
    def multiplier(self) -> int:
        """The depth multiplier ``m``."""
        return int(self.depthwise.shape[0] // self.channels)

    def reconstruct(self) -> np.ndarray:
        """The approximated kernel ``W~[O, C, kh, kw]``."""
        _, _, kh, kw = self.depthwise.shape
        o, m = self.pointwise.shape[0], self.multiplier
        d = self.depthwise.reshape(self.channels, m, kh * kw)
        p = self.pointwise.reshape(o, self.channels, m)
        return np.einsum("ocj,cjk->ock", p, d).reshape(o, self.channels, kh, kw)


def depthwise_separable(w: np.ndarray, multiplier: int) -> SeparableResult:
    """Per-input-channel truncated SVD at rank ``multiplier``; see the module doc."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"expected a conv kernel [O, C, kh, kw], got shape {w.shape}")
    o, c, kh, kw = w.shape
    if not 1 <= multiplier <= min(o, kh * kw):
        raise ValueError(f"depth multiplier must be in [1, {min(o, kh * kw)}], got {multiplier}")
    m = multiplier
    mats = w.transpose(1, 0, 2, 3).reshape(c, o, kh * kw)  # [C, O, k]
    u, s, vt = np.linalg.svd(mats, full_matrices=False)  # [C,O,r], [C,r], [C,r,k]
    root = np.sqrt(s[:, :m])
    depth = vt[:, :m, :] * root[:, :, None]  # [C, m, k]
    point = u[:, :, :m] * root[:, None, :]  # [C, O, m]
    total = float(np.sum(s * s))
    err = _relative(float(np.sum(s[:, m:] ** 2)), total)
    depthwise = depth.reshape(c * m, 1, kh, kw)
    pointwise = point.transpose(1, 0, 2).reshape(o, c * m)
    return SeparableResult(np.ascontiguousarray(depthwise), np.ascontiguousarray(pointwise),
                           err, c)
