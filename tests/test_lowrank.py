from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from onnxcomp.cp_als import CPResult, cp_conv
from onnxcomp.lowrank import (
    cp_macs,
    spatial_svd_conv,
    spatial_svd_macs,
    svd_matrix,
    svd_matrix_data,
    tucker2_conv,
    tucker2_conv_data,
    tucker2_macs,
)

RNG_SEED = 0

Shape4 = tuple[int, int, int, int]


def rng(seed: int = RNG_SEED) -> np.random.Generator:
    return np.random.default_rng(seed)


def cp_kernel(shape: Shape4, rank: int, seed: int = RNG_SEED) -> np.ndarray:
    """A kernel of exact CP rank ``rank`` with generic Gaussian factors."""
    gen = rng(seed)
    factors = [gen.standard_normal((size, rank)) for size in shape]
    return np.einsum("or,cr,ir,jr->ocij", *factors)


def classic_degenerate(shape: Shape4, seed: int = RNG_SEED) -> np.ndarray:
    """d/dt (x)_k (a_k + t b_k) at t = 0: rank 4 (generically), border rank 2."""
    gen = rng(seed)
    a = [gen.standard_normal(size) for size in shape]
    b = [gen.standard_normal(size) for size in shape]
    kernel = np.zeros(shape)
    for mode in range(4):
        vectors = [b[m] if m == mode else a[m] for m in range(4)]
        kernel += np.einsum("o,c,i,j->ocij", *vectors)
    return kernel


def rel_error(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def conv2d(
    x: np.ndarray, w: np.ndarray, stride: tuple[int, int] = (1, 1), groups: int = 1
) -> np.ndarray:
    """Reference NCHW convolution without padding: dense (groups=1) or depthwise."""
    kh, kw = w.shape[2:]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, :: stride[0], :: stride[1]]
    if groups == 1:
        return np.einsum("nchwij,ocij->nohw", windows, w)
    assert groups == x.shape[1] == w.shape[0] and w.shape[1] == 1
    return np.einsum("nchwij,cij->nchw", windows, w[:, 0])


def macs_of(output: np.ndarray, w: np.ndarray) -> int:
    """MACs of a conv that produced ``output`` with weight ``w`` (any groups)."""
    return int(output[0].size * np.prod(w.shape[1:]))


# ---------------------------------------------------------------------------- CP


@pytest.mark.parametrize(
    ("shape", "rank"),
    [((16, 8, 3, 3), 4), ((12, 6, 1, 3), 3), ((10, 5, 3, 1), 2), ((32, 16, 5, 5), 6)],
)
def test_cp_recovers_exact_rank_kernel(shape: Shape4, rank: int) -> None:
    kernel = cp_kernel(shape, rank)
    result = cp_conv(kernel, rank)
    assert result.rel_error <= 1e-6
    assert rel_error(result.reconstruct(), kernel) <= 1e-6
    assert result.rel_error == pytest.approx(rel_error(result.reconstruct(), kernel), abs=1e-9)
    assert result.converged
    assert not result.degenerate and result.degenerate_reason == ""
    assert result.cancellation == pytest.approx(1.0, abs=0.1)
    out, inp, kh, kw = shape
    assert result.A.shape == (out, rank) and result.B.shape == (inp, rank)
    assert result.Kh.shape == (kh, rank) and result.Kw.shape == (kw, rank)
    assert all(f.dtype == np.float64 for f in (result.A, result.B, result.Kh, result.Kw))


def test_cp_factors_are_balanced_and_sorted() -> None:
    result = cp_conv(cp_kernel((16, 8, 3, 3), 4, seed=3), 4)
    norms = np.stack(
        [np.linalg.norm(f, axis=0) for f in (result.A, result.B, result.Kh, result.Kw)]
    )
    np.testing.assert_allclose(norms, np.broadcast_to(norms[0], norms.shape), rtol=1e-12)
    np.testing.assert_allclose(np.prod(norms, axis=0), result.component_norms, rtol=1e-12)
    assert np.all(np.diff(result.component_norms) <= 0)


def test_cp_chain_equals_conv_with_stride() -> None:
    kernel = cp_kernel((6, 5, 3, 2), 3, seed=1)
    result = cp_conv(kernel, 3)
    first, vertical, horizontal, last = result.conv_weights()
    assert first.shape == (3, 5, 1, 1) and last.shape == (6, 3, 1, 1)
    assert vertical.shape == (3, 1, 3, 1) and horizontal.shape == (3, 1, 1, 2)
    x = rng(7).standard_normal((2, 5, 11, 9))
    y1 = conv2d(x, first)
    y2 = conv2d(y1, vertical, stride=(2, 1), groups=3)
    y3 = conv2d(y2, horizontal, stride=(1, 3), groups=3)
    y4 = conv2d(y3, last)
    expected = conv2d(x, kernel, stride=(2, 3))
    np.testing.assert_allclose(y4, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    # The staged cost model counts exactly the MACs of these four convs.
    in_hw, out_hw = x.shape[2:], expected.shape[2:]
    assert y2.shape[2:] == (out_hw[0], in_hw[1])
    counted = sum(
        macs_of(y, w) for y, w in [(y1, first), (y2, vertical), (y3, horizontal), (y4, last)]
    )
    assert cp_macs((6, 5, 3, 2), 3, in_hw, out_hw) == counted


def test_cp_error_decreases_with_rank() -> None:
    kernel = rng(1).standard_normal((16, 12, 3, 3))
    errors = [cp_conv(kernel, rank, max_iter=60).rel_error for rank in (1, 4, 16, 48, 96)]
    assert errors[0] < 1.0
    for lower, higher in zip(errors, errors[1:], strict=False):
        assert higher <= lower + 1e-3
    assert errors[-1] < 0.5 * errors[0]


def test_cp_flags_two_factor_degeneracy() -> None:
    kernel = classic_degenerate((6, 5, 3, 3), seed=1)
    early = cp_conv(kernel, 2, max_iter=50, tol=0.0)
    late = cp_conv(kernel, 2, max_iter=400, tol=0.0)
    assert late.degenerate
    assert "cancelling pair" in late.degenerate_reason
    # The signature of degeneracy: the error creeps down while the two terms grow apart.
    assert late.rel_error < early.rel_error
    assert late.component_norms[0] > 1.5 * early.component_norms[0]
    assert late.component_norms[0] > np.linalg.norm(kernel)


def test_cp_not_degenerate_on_well_conditioned_kernels() -> None:
    for seed in range(3):
        result = cp_conv(cp_kernel((16, 8, 3, 3), 5, seed=seed), 5)
        assert not result.degenerate, result.degenerate_reason


def test_cp_is_deterministic() -> None:
    kernel = rng(2).standard_normal((8, 6, 3, 3))
    first = cp_conv(kernel, 12, max_iter=20, seed=5)
    second = cp_conv(kernel, 12, max_iter=20, seed=5)
    for name in ("A", "B", "Kh", "Kw"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert first.rel_error == second.rel_error


def test_cp_zero_kernel_and_bad_input() -> None:
    result = cp_conv(np.zeros((4, 3, 3, 3)), 2)
    assert result.rel_error == 0.0 and result.converged
    assert np.all(result.reconstruct() == 0.0)
    with pytest.raises(ValueError, match="4-D"):
        cp_conv(np.ones((4, 3, 3)), 2)
    with pytest.raises(ValueError, match="non-finite"):
        cp_conv(np.full((2, 2, 1, 1), np.nan), 1)
    with pytest.raises(ValueError, match="at least 1"):
        cp_conv(np.ones((2, 2, 1, 1)), 0)


def test_cp_time_budget_stops_the_sweeps() -> None:
    result = cp_conv(rng(3).standard_normal((32, 32, 3, 3)), 40, tol=0.0, max_seconds=0.0)
    assert result.iterations == 1 and not result.converged


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 6),
    inp=st.integers(1, 6),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_cp_property_finite_and_shaped(out: int, inp: int, kh: int, kw: int, seed: int) -> None:
    kernel = rng(seed).standard_normal((out, inp, kh, kw)).astype(np.float32)
    rank = min(inp * kh * kw, out * kh * kw, out * inp, 12)
    result = cp_conv(kernel, rank, max_iter=40, seed=seed)
    factors = (result.A, result.B, result.Kh, result.Kw)
    assert [f.shape for f in factors] == [(out, rank), (inp, rank), (kh, rank), (kw, rank)]
    assert all(np.all(np.isfinite(f)) for f in factors)
    assert 0.0 <= result.rel_error <= 1.0
    assert result.rel_error == pytest.approx(
        rel_error(result.reconstruct(), kernel.astype(np.float64)), abs=1e-7
    )


# ---------------------------------------------------------------------------- Tucker-2


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [
        ((12, 8, 3, 3), (5, 3)),
        ((10, 6, 1, 3), (4, 6)),
        ((9, 7, 1, 1), (2, 2)),
        ((8, 4, 5, 2), (8, 1)),
    ],
)
def test_tucker2_recovers_exact_multilinear_ranks(shape: Shape4, ranks: tuple[int, int]) -> None:
    rank_out, rank_in = ranks
    gen = rng(1)
    core = gen.standard_normal((rank_out, rank_in, *shape[2:]))
    kernel = np.einsum(
        "pqij,op,cq->ocij",
        core,
        gen.standard_normal((shape[0], rank_out)),
        gen.standard_normal((shape[1], rank_in)),
    )
    result = tucker2_conv(kernel, rank_out, rank_in)
    assert result.rel_error <= 1e-10
    assert rel_error(result.reconstruct(), kernel) <= 1e-10
    assert result.U_out.shape == (shape[0], rank_out) and result.U_in.shape == (shape[1], rank_in)
    assert result.core.shape == (rank_out, rank_in, *shape[2:])
    np.testing.assert_allclose(result.U_out.T @ result.U_out, np.eye(rank_out), atol=1e-12)
    np.testing.assert_allclose(result.U_in.T @ result.U_in, np.eye(rank_in), atol=1e-12)


def test_tucker2_hooi_improves_on_hosvd_and_error_falls_with_rank() -> None:
    kernel = rng(2).standard_normal((24, 16, 3, 3))
    hosvd = tucker2_conv(kernel, 8, 6, n_iter=0)
    hooi = tucker2_conv(kernel, 8, 6)
    assert hosvd.iterations == 0 and hooi.iterations >= 1
    assert hooi.rel_error <= hosvd.rel_error
    assert hooi.rel_error == pytest.approx(rel_error(hooi.reconstruct(), kernel), abs=1e-12)
    errors = [tucker2_conv(kernel, r, r).rel_error for r in (2, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True)
    assert tucker2_conv(kernel, 24, 16).rel_error <= 1e-12


def test_tucker2_chain_equals_conv() -> None:
    gen = rng(3)
    kernel = np.einsum(
        "pqij,op,cq->ocij",
        gen.standard_normal((4, 3, 3, 3)),
        gen.standard_normal((7, 4)),
        gen.standard_normal((5, 3)),
    )
    first, core, last = tucker2_conv(kernel, 4, 3).conv_weights()
    x = gen.standard_normal((1, 5, 10, 8))
    y1 = conv2d(x, first)
    y2 = conv2d(y1, core, stride=(2, 2))
    y3 = conv2d(y2, last)
    expected = conv2d(x, kernel, stride=(2, 2))
    np.testing.assert_allclose(y3, expected, atol=1e-9 * np.abs(expected).max())
    counted = sum(macs_of(y, w) for y, w in [(y1, first), (y2, core), (y3, last)])
    assert tucker2_macs((7, 5, 3, 3), 3, 4, x.shape[2:], expected.shape[2:]) == counted


def test_tucker2_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError, match="rank_out"):
        tucker2_conv(np.ones((4, 3, 3, 3)), 5, 2)
    with pytest.raises(ValueError, match="rank_in"):
        tucker2_conv(np.ones((4, 3, 3, 3)), 2, 0)


# ---------------------------------------------------------------------------- spatial SVD


def test_spatial_svd_exact_at_full_rank_and_for_low_rank_kernels() -> None:
    kernel = rng(4).standard_normal((6, 4, 3, 3))
    full = spatial_svd_conv(kernel, 12)
    assert full.rel_error <= 1e-12 and rel_error(full.reconstruct(), kernel) <= 1e-12

    # M[(c, i), (o, j)] of rank 2.
    matrix = rng(5).standard_normal((4 * 3, 2)) @ rng(6).standard_normal((2, 6 * 5))
    low = matrix.reshape(4, 3, 6, 5).transpose(2, 0, 1, 3)
    result = spatial_svd_conv(low, 2)
    assert result.V.shape == (2, 4, 3, 1) and result.H.shape == (6, 2, 1, 5)
    assert result.rel_error <= 1e-12 and rel_error(result.reconstruct(), low) <= 1e-12


def test_spatial_svd_error_is_the_measured_one_and_falls_with_rank() -> None:
    kernel = rng(7).standard_normal((8, 6, 3, 3))
    errors = []
    for rank in (1, 3, 6, 12, 18):
        result = spatial_svd_conv(kernel, rank)
        assert result.rel_error == pytest.approx(rel_error(result.reconstruct(), kernel), abs=1e-12)
        errors.append(result.rel_error)
    assert errors == sorted(errors, reverse=True) and errors[-1] <= 1e-12
    with pytest.raises(ValueError, match="at most 18"):
        spatial_svd_conv(kernel, 19)


def test_spatial_svd_chain_equals_conv() -> None:
    kernel = rng(8).standard_normal((5, 4, 3, 2))
    result = spatial_svd_conv(kernel, 10)  # full rank min(4*3, 5*2)
    x = rng(9).standard_normal((2, 4, 9, 7))
    y1 = conv2d(x, result.V, stride=(2, 1))
    y2 = conv2d(y1, result.H, stride=(1, 2))
    expected = conv2d(x, kernel, stride=(2, 2))
    np.testing.assert_allclose(y2, expected, atol=1e-9 * np.abs(expected).max())
    counted = macs_of(y1, result.V) + macs_of(y2, result.H)
    assert spatial_svd_macs((5, 4, 3, 2), 10, x.shape[2:], expected.shape[2:]) == counted


# ---------------------------------------------------------------------------- matrix SVD


def test_svd_matrix_exact_optimal_and_balanced() -> None:
    low = rng(10).standard_normal((9, 3)) @ rng(11).standard_normal((3, 7))
    U, V, error = svd_matrix(low, 3)
    assert U.shape == (9, 3) and V.shape == (3, 7)
    assert error <= 1e-12 and rel_error(U @ V, low) <= 1e-12
    np.testing.assert_allclose(np.linalg.norm(U, axis=0), np.linalg.norm(V, axis=1), rtol=1e-12)

    dense = rng(12).standard_normal((9, 7))
    values = np.linalg.svd(dense, compute_uv=False)
    U, V, error = svd_matrix(dense, 4)
    assert error == pytest.approx(rel_error(U @ V, dense), abs=1e-12)
    assert error == pytest.approx(np.sqrt(np.sum(values[4:] ** 2) / np.sum(values**2)))
    with pytest.raises(ValueError, match="2-D"):
        svd_matrix(np.ones((2, 2, 2)), 1)
    with pytest.raises(ValueError, match="at most 7"):
        svd_matrix(dense, 8)


# ---------------------------------------------------------------------------- ranks and costs


def test_costs_match_hand_counts() -> None:
    # O=64, C=32, 3x3: CP R=16, Tucker R1=8 R2=16, spatial SVD R=16, stride 2 from 32x32 to 16x16.
    # 16*32*32*32 + 16*3*16*32 + 16*3*16*16 + 64*16*16*16
    assert cp_macs((64, 32, 3, 3), 16, (32, 32), (16, 16)) == 524288 + 24576 + 12288 + 262144
    # 32*8*32*32 + (16*8*9 + 64*16)*16*16
    assert tucker2_macs((64, 32, 3, 3), 8, 16, (32, 32), (16, 16)) == 262144 + 557056
    # 16*32*3*16*32 + 64*16*3*16*16
    assert spatial_svd_macs((64, 32, 3, 3), 16, (32, 32), (16, 16)) == 786432 + 786432
    # Without stride every stage runs at one resolution: per-pixel costs times pixels.
    assert cp_macs((64, 32, 3, 3), 16, (8, 8), (8, 8)) == 1632 * 64
    assert tucker2_macs((64, 32, 3, 3), 8, 16, (8, 8), (8, 8)) == 2432 * 64
    assert spatial_svd_macs((64, 32, 3, 3), 16, (8, 8), (8, 8)) == 4608 * 64
    with pytest.raises(ValueError, match="positive"):
        cp_macs((64, 32, 3, 3), 16, (0, 8), (8, 8))


# ---------------------------------------------------------------------------- least squares


def test_results_are_frozen_dataclasses() -> None:
    result = cp_conv(cp_kernel((4, 3, 2, 2), 2), 2)
    assert isinstance(result, CPResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.rank = 3  # type: ignore[misc]


def test_svd_matrix_data_with_identity_covariance_is_the_truncated_svd() -> None:
    w = rng(11).standard_normal((20, 30))
    u, v, err = svd_matrix(w, 5)
    ud, vd, errd = svd_matrix_data(w, np.eye(30), 5)
    np.testing.assert_allclose(ud @ vd, u @ v, atol=1e-5 * np.abs(w).max())
    assert errd == pytest.approx(err, rel=1e-4)


def test_svd_matrix_data_minimizes_the_output_error() -> None:
    """No rank-R map does better on the data than the data-aware one; the weight SVD does worse."""
    g = rng(12)
    w = g.standard_normal((16, 24))
    x = g.standard_normal((24, 500)) * np.geomspace(10, 0.1, 24)[:, None]
    cov = np.cov(x)
    ud, vd, _ = svd_matrix_data(w, cov, 4)
    u, v, _ = svd_matrix(w, 4)
    xc = x - x.mean(axis=1, keepdims=True)
    data_err = np.linalg.norm((w - ud @ vd) @ xc)
    assert data_err < 0.9 * np.linalg.norm((w - u @ v) @ xc)
    # The optimum: the tail of the singular values of W X (reduced-rank regression).
    s = np.linalg.svd(w @ xc, compute_uv=False)
    assert data_err == pytest.approx(np.sqrt(np.sum(s[4:] ** 2)), rel=1e-4)
    with pytest.raises(ValueError, match="covariance shape"):
        svd_matrix_data(w, np.eye(5), 4)


def test_tucker2_conv_data_is_exact_and_beats_weights_on_anisotropic_inputs() -> None:
    g = rng(13)
    core = g.standard_normal((4, 3, 3, 3))
    u_out = np.linalg.qr(g.standard_normal((16, 4)))[0]
    u_in = np.linalg.qr(g.standard_normal((8, 3)))[0]
    exact = np.einsum("pqij,op,cq->ocij", core, u_out, u_in)
    assert tucker2_conv_data(exact, np.eye(72), 4, 3).rel_error < 1e-6
    w = g.standard_normal((16, 8, 3, 3))
    x = g.standard_normal((72, 2000)) * np.geomspace(10, 0.1, 72)[:, None]
    x -= x.mean(axis=1, keepdims=True)
    mat = w.reshape(16, -1)

    def output_error(res: Any) -> float:
        residual = (mat - res.reconstruct().reshape(16, -1)) @ x
        return float(np.linalg.norm(residual) / np.linalg.norm(mat @ x))

    data = tucker2_conv_data(w, np.cov(x), 6, 4)
    assert output_error(data) < 0.8 * output_error(tucker2_conv(w, rank_out=6, rank_in=4))
    with pytest.raises(ValueError, match="does not give"):
        tucker2_conv_data(w, np.cov(x), 6, 4, basis=np.eye(16)[:, :3])
