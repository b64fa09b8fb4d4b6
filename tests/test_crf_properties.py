"""Invariants of the CRF core: projection, Prop. 2.1 rounding, energy descent, Potts vs min-cut,
and the array-module functions the core relies on (NumPy/CuPy portability)."""
import glob
import os
import re

import numpy as np
import pytest

from crfgrad_cupy.core import pgd, projection, rounding, spatial

CORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'crfgrad_cupy', 'core')


# ------------------------------------------------------------------------------------ projection
def bisection_projection(v, iters=200):
    """Euclidean projection onto the simplex along axis 0 by bisection on the KKT condition
    Σ_λ max(v_λ - τ, 0) = 1 (no sorting)."""
    lo = v.min(axis=0) - 1.0
    hi = v.max(axis=0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        s = np.maximum(v - mid, 0).sum(axis=0)
        lo = np.where(s > 1, mid, lo)
        hi = np.where(s > 1, hi, mid)
    return np.maximum(v - 0.5 * (lo + hi), 0)


@pytest.mark.parametrize('L', [2, 3, 7, 21])
def test_projection_alpha0_on_simplex_and_euclidean(L):
    rng = np.random.default_rng(L)
    v = rng.standard_normal((L, 500)) * rng.uniform(0.1, 3, 500)
    out, _ = projection.project_simplex(v, 0.0, axis=0)
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(out, bisection_projection(v), atol=1e-12)
    # idempotent on the simplex; the leaky version only changes the inactive entries
    again, _ = projection.project_simplex(out, 0.0, axis=0)
    np.testing.assert_allclose(again, out, atol=1e-12)
    leaky, info = projection.project_simplex(v, 0.5, axis=0)
    active = v > info.tau
    np.testing.assert_allclose(leaky[active], out[active], atol=1e-12)
    assert np.all(leaky[~active] <= 0)


# ------------------------------------------------------------------------------------ rounding
def _random_simplex(rng, shape):
    q = rng.gamma(0.5, size=shape)
    return q / q.sum(axis=1, keepdims=True)


def test_rounding_never_increases_energy_dense_1000_instances():
    """1,000 instances, each with its own non-symmetric dense K without self-interaction."""
    rng = np.random.default_rng(0)
    N, L, H, W = 1000, 3, 2, 3
    P = L * H * W
    K = rng.standard_normal((N, P, P))
    Kv = K.reshape(N, L, H * W, L, H * W)
    for i in range(H * W):
        Kv[:, :, i, :, i] = 0
    term = pgd.DensePairwise(K, (L, H, W))
    assert not term.has_self_interaction()
    q = _random_simplex(rng, (N, L, H, W))
    u = rng.standard_normal((N, L, H, W))
    r = rounding.round_solution(q, u, [term])
    assert r.guaranteed and r.num_steps == H * W
    assert np.all(r.energy_x <= r.energy_q + 1e-9 * (1 + np.abs(r.energy_q)))
    # the bound is not vacuous: rounding strictly lowers the energy of most random q
    assert np.mean(r.energy_x < r.energy_q - 1e-6) > 0.9


def test_rounding_never_increases_energy_spatial_1000_instances():
    rng = np.random.default_rng(1)
    N, L, H, W = 1000, 3, 6, 5
    for k in (3, 5):
        Ws = rng.standard_normal((L, L, k, k))
        Ws[:, :, k // 2, k // 2] = 0
        term = spatial.SpatialFilter(Ws, H, W)
        q = _random_simplex(rng, (N, L, H, W))
        u = rng.standard_normal((N, L, H, W))
        r = rounding.round_solution(q, u, [term])
        assert r.guaranteed and r.num_steps == (k // 2 + 1) ** 2
        assert np.all(r.energy_x <= r.energy_q + 1e-9 * (1 + np.abs(r.energy_q)))


def test_rounding_guarantee_fails_with_self_interaction():
    """With a positive self-interaction the energy is convex in each pixel and rounding can
    increase it: the flag is needed."""
    rng = np.random.default_rng(2)
    N, L, H, W = 200, 3, 2, 2
    P = L * H * W
    K = np.zeros((N, P, P))
    Kv = K.reshape(N, L, H * W, L, H * W)
    for i in range(H * W):
        Kv[:, :, i, :, i] = 10 * np.eye(L)
    term = pgd.DensePairwise(K, (L, H, W))
    q = _random_simplex(rng, (N, L, H, W))
    r = rounding.round_solution(q, rng.standard_normal((N, L, H, W)) * 0.1, [term])
    assert r.self_interaction and not r.guaranteed
    assert np.any(r.energy_x > r.energy_q + 1e-6)


# ------------------------------------------------------------------------------------ descent
def _symmetric_spatial(rng, L, k):
    W = rng.standard_normal((L, L, k, k))
    return 0.5 * (W + W.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def test_energy_never_increases_for_small_steps():
    """α = 0, symmetric K, γ < 1/‖K‖: projected gradient descent decreases eq. (6) monotonically."""
    rng = np.random.default_rng(3)
    N, L, H, W, k = 40, 3, 6, 7, 5
    P = L * H * W
    Ws = _symmetric_spatial(rng, L, k)
    Kd = rng.standard_normal((N, P, P)) * 0.05
    Kd = 0.5 * (Kd + Kd.transpose(0, 2, 1))
    terms = [spatial.SpatialFilter(Ws, H, W), pgd.DensePairwise(Kd, (L, H, W))]
    # the spatial operator is symmetric: check it, then bound ‖K‖
    eye = np.eye(P).reshape(P, L, H, W)
    Ks = terms[0].apply(eye).reshape(P, P).T
    np.testing.assert_allclose(Ks, Ks.T, atol=1e-12)
    # ‖K‖₂ <= ‖K_spatial‖₂ + max_n ‖K_dense,n‖_F  (one small SVD; Frobenius for the dense part)
    norm = np.linalg.norm(Ks, 2) + np.sqrt((Kd ** 2).sum(axis=(1, 2))).max()
    step = 0.95 / norm
    logits = rng.standard_normal((N, L, H, W))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)     # x_0 = p is feasible
    T = 25
    out, cache, e = pgd.pgd_forward(p, 1.0, terms, T, step, 0.0, 0.1, energy='eq6')
    final = pgd.energy_eq6(out, cache.u, terms)
    e = np.concatenate([e, final[:, None]], axis=1)                      # E(x_0) .. E(x_T)
    diffs = np.diff(e, axis=1)
    assert np.all(diffs <= 1e-10 * (1 + np.abs(e[:, :-1])))
    assert np.all(e[:, -1] < e[:, 0])
    assert rounding.is_feasible(out)
    # a far too large step breaks monotonicity on some instance (the condition matters)
    _, _, e_big = pgd.pgd_forward(p, 1.0, terms, T, 40 * step, 0.0, 0.1, energy='eq6')
    assert np.any(np.diff(e_big, axis=1) > 1e-6)


# ------------------------------------------------------------------------------------ Potts
def _potts(beta, H, W):
    Ws = np.zeros((2, 2, 3, 3))
    for a, b in ((0, 1), (1, 0)):
        for y, x in ((0, 1), (2, 1), (1, 0), (1, 2)):
            Ws[a, b, y, x] = beta
    return spatial.SpatialFilter(Ws, H, W)


@pytest.mark.parametrize('kind', ['noisy_disc', 'iid'])
def test_potts_pgd_rounding_close_to_min_cut(kind):
    """Binary Potts on a 4-connected 64×64 grid with random unaries: PGD (leak 0, 300 steps)
    + rounding is within 2 % of the exact min-cut energy.  Unaries: a noisy disc (σ 1.5, β 1)
    or iid N(0, 1) (β 0.3; with strong coupling on iid noise plain PGD stalls in a local minimum)."""
    maxflow = pytest.importorskip('maxflow')
    H = W = 64
    rng = np.random.default_rng(11)
    if kind == 'noisy_disc':
        yy, xx = np.mgrid[:H, :W]
        sig = 2.0 * (((yy - 30) ** 2 + (xx - 34) ** 2) < 18 ** 2) - 1
        noisy = sig + 1.5 * rng.standard_normal((H, W))
        psi, beta = np.stack([noisy, -noisy])[None], 1.0
    else:
        psi, beta = rng.standard_normal((1, 2, H, W)), 0.3
    term = _potts(beta, H, W)
    # x_0 = softmax(-ψ): u = ψ + a per-pixel constant, which does not change the minimiser
    e = np.exp(-(psi - psi.min(axis=1, keepdims=True)))
    p = e / e.sum(axis=1, keepdims=True)
    out, _, _ = pgd.pgd_forward(p, 1.0, [term], 300, 0.9 / (4 * beta), 0.0, 0.0)
    r = rounding.round_solution(out, psi, [term])
    assert r.guaranteed
    assert np.all(r.energy_x <= r.energy_q + 1e-9 * np.abs(r.energy_q))
    g = maxflow.Graph[float]()
    nodes = g.add_grid_nodes((H, W))
    g.add_grid_edges(nodes, beta)
    g.add_grid_tedges(nodes, psi[0, 1], psi[0, 0])        # sink side = label 1 pays psi[1]
    flow = g.maxflow()
    seg = g.get_grid_segments(nodes)
    x_opt = np.stack([~seg, seg]).astype(float)[None]
    e_opt = pgd.energy_eq6(x_opt, psi, [term])[0]
    assert abs(flow - e_opt) < 1e-6 * abs(e_opt)          # our energy of the cut == the max-flow value
    assert r.energy_x[0] >= e_opt - 1e-9 * abs(e_opt)                   # min-cut is optimal
    assert (r.energy_x[0] - e_opt) <= 0.02 * abs(e_opt)


# ------------------------------------------------------------------------------------ xp portability
# Functions of the array module the core may use; each is provided by NumPy and CuPy.
CUPY_SUPPORTED = {
    'abs', 'any', 'all', 'arange', 'argmax', 'argmin', 'argsort', 'asarray', 'ascontiguousarray', 'concatenate',
    'conj', 'cumsum', 'empty', 'empty_like', 'flip', 'float32', 'float64', 'full', 'int32', 'int64', 'log',
    'matmul', 'max', 'maximum', 'min', 'minimum', 'moveaxis', 'ones', 'ones_like', 'searchsorted', 'sort',
    'sqrt', 'stack', 'sum', 'swapaxes', 'take', 'take_along_axis', 'where', 'zeros', 'zeros_like',
    'fft.rfft2', 'fft.irfft2', 'bincount', 'unique', 'repeat', 'tile', 'exp', 'dot', 'einsum', 'reshape',
    'transpose', 'isfinite', 'floor', 'ceil', 'round', 'rint', 'clip', 'broadcast_to', 'cumprod', 'prod',
    'diff', 'nonzero', 'count_nonzero', 'full_like', 'logical_and', 'logical_or', 'logical_not', 'mean',
    'sign', 'square', 'expand_dims', 'squeeze', 'tensordot', 'eye', 'floor_divide', 'mod', 'lexsort',
    'newaxis', 'int8', 'int16', 'uint8', 'uint32', 'uint64', 'bool_', 'errstate', 'array', 'copy', 'pad',
    'trunc', 'dtype', 'add', 'multiply', 'subtract', 'divide', 'less', 'greater', 'equal', 'not_equal',
    'isnan', 'nan', 'inf', 'cos', 'sin', 'tanh', 'power', 'diag', 'linspace', 'meshgrid', 'indices',
    'ravel_multi_index', 'unravel_index', 'argwhere', 'flatnonzero', 'histogram', 'fft.fft2', 'fft.ifft2',
    'fft.rfft', 'fft.irfft', 'fft.fft', 'fft.ifft', 'outer', 'kron', 'cross', 'vstack', 'hstack', 'fft',
    'copysign',
}


def xp_names_used():
    """{name: [files]} for every ``xp.<name>`` (and ``xp.fft.<name>``, ``_fft(xp).<name>``) in
    crfgrad_cupy/core/*.py."""
    names = {}
    for fn in sorted(glob.glob(os.path.join(CORE, '*.py'))):
        src = open(fn).read()
        for m in re.finditer(r'\bxp\.((?:fft|linalg|random)\.)?([A-Za-z_]\w*)', src):
            name = (m.group(1) or '') + m.group(2)
            if name == '__name__':
                continue
            names.setdefault(name, []).append(os.path.basename(fn))
        for m in re.finditer(r'\b_fft\(xp\)\.([A-Za-z_]\w*)', src):        # spatial.py's FFT module
            names.setdefault('fft.' + m.group(1), []).append(os.path.basename(fn))
    return names


def _resolve(mod, dotted):
    obj = mod
    for part in dotted.split('.'):
        obj = getattr(obj, part)
    return obj


def test_core_array_functions_exist_in_numpy_and_cupy():
    names = xp_names_used()
    assert {'fft.rfft2', 'fft.irfft2', 'matmul', 'sort', 'cumsum', 'take_along_axis'} <= set(names)
    unknown = sorted(n for n in names if n not in CUPY_SUPPORTED)
    assert not unknown, 'core uses array functions not vetted for CuPy: %s' % (
        ['%s (%s)' % (n, ', '.join(sorted(set(names[n])))) for n in unknown])
    for n in names:
        _resolve(np, n)
    try:
        import cupy
    except Exception:
        return                                  # CuPy not installed here: the NumPy/allow-list part ran
    missing = []
    for n in names:
        try:
            _resolve(cupy, n)
        except AttributeError:
            missing.append(n)
    assert not missing, 'not in cupy: %s' % missing
