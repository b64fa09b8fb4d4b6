"""Unit tests of crfgrad_cupy.core.{spatial, projection, unary, pgd, rounding}."""
import numpy as np
import pytest

from crfgrad_cupy.core import pgd, projection, rounding, spatial, unary
from reference_ops import brute_conv, brute_weight_grad


# ------------------------------------------------------------------------------------ spatial
SHAPES = [(2, 3, 3, 7, 9, 3), (1, 2, 4, 5, 6, 5), (2, 3, 3, 3, 4, 9), (1, 1, 1, 1, 1, 3), (1, 2, 2, 6, 5, 1)]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('method', ['direct', 'fft'])
def test_spatial_matches_brute_force(shape, method):
    n, c, o, h, w, k = shape
    rng = np.random.default_rng(sum(shape))
    q = rng.standard_normal((n, c, h, w))
    W = rng.standard_normal((o, c, k, k))
    g = rng.standard_normal((n, o, h, w))
    f = spatial.SpatialFilter(W, h, w, method)
    ref = brute_conv(q, W)
    np.testing.assert_allclose(f.apply(q), ref, atol=1e-12 * k * k * c)
    # adjoint identity <g, S q> = <S^T g, q>
    assert abs(np.sum(f.adjoint(g) * q) - np.sum(g * ref)) < 1e-10 * (1 + np.abs(ref).sum())
    np.testing.assert_allclose(f.weight_grad(q, g), brute_weight_grad(q, g, k), atol=1e-11)
    dq, dw = f.backward(q, g)
    np.testing.assert_allclose(dq, f.adjoint(g), atol=1e-12)
    np.testing.assert_allclose(dw, f.weight_grad(q, g), atol=1e-12)
    # functional forms
    np.testing.assert_allclose(spatial.spatial_filter_weight_grad(q, g, k, method), brute_weight_grad(q, g, k),
                               atol=1e-11)


def test_spatial_adjoint_is_transpose_matrix():
    """Sᵀ from the matrix of S built column by column."""
    rng = np.random.default_rng(3)
    c, o, h, w, k = 2, 3, 3, 4, 3
    W = rng.standard_normal((o, c, k, k))
    for method in ('direct', 'fft'):
        f = spatial.SpatialFilter(W, h, w, method)
        eye = np.eye(c * h * w).reshape(-1, c, h, w)
        M = f.apply(eye).reshape(c * h * w, -1).T                  # (O·HW, C·HW)
        eye_o = np.eye(o * h * w).reshape(-1, o, h, w)
        Mt = f.adjoint(eye_o).reshape(o * h * w, -1).T
        np.testing.assert_allclose(Mt, M.T, atol=1e-12)


def test_spatial_float32_paths_agree():
    rng = np.random.default_rng(4)
    q = rng.random((2, 5, 20, 17)).astype(np.float32)
    W = rng.standard_normal((5, 5, 9, 9)).astype(np.float32)
    g = rng.standard_normal((2, 5, 20, 17)).astype(np.float32)
    a = spatial.SpatialFilter(W, 20, 17, 'direct')
    b = spatial.SpatialFilter(W, 20, 17, 'fft')
    for fa, fb in ((a.apply(q), b.apply(q)), (a.adjoint(g), b.adjoint(g)), (a.weight_grad(q, g), b.weight_grad(q, g))):
        assert fa.dtype == np.float32 and fb.dtype == np.float32
        assert np.abs(fa - fb).max() <= 1e-5 * np.abs(fa).max()


def test_spatial_auto_choice_and_errors():
    assert spatial.choose_method(21, 21, 9, 250, 250) == 'fft'
    assert spatial.choose_method(2, 2, 3, 64, 64) == 'direct'
    assert spatial.choose_method(21, 21, 1, 64, 64) == 'direct'
    W = np.zeros((21, 21, 9, 9), np.float32)
    assert spatial.SpatialFilter(W, 100, 100).method == 'fft'
    with pytest.raises(ValueError):
        spatial.SpatialFilter(np.zeros((2, 2, 4, 4)), 5, 5)
    with pytest.raises(ValueError):
        spatial.SpatialFilter(np.zeros((2, 2, 3, 3)), 5, 5, method='winograd')
    f = spatial.SpatialFilter(np.zeros((2, 2, 3, 3)), 5, 5)
    with pytest.raises(ValueError):
        f.apply(np.zeros((1, 2, 5, 6)))


def test_spatial_self_interaction_flag():
    W = np.zeros((2, 2, 3, 3))
    W[0, 1, 0, 1] = 1
    f = spatial.SpatialFilter(W, 4, 4)
    assert not f.has_self_interaction() and f.interaction_radius == 1
    W[0, 1, 1, 1] = 1
    W[1, 0, 1, 1] = -1                                    # antisymmetric centre: no energy contribution
    assert not spatial.SpatialFilter(W, 4, 4).has_self_interaction()
    W[1, 1, 1, 1] = 0.5
    assert spatial.SpatialFilter(W, 4, 4).has_self_interaction()


# ------------------------------------------------------------------------------------ projection
def caffe_projection(v, leak):
    """Literal per-pixel transcription of the fork's projection (reference, small inputs)."""
    L = v.shape[0]
    x = np.sort(v)
    tmpsum = v.dtype.type(0)
    stopped = False
    for ii in range(1, L):
        tmpsum = v.dtype.type(tmpsum + x[L - ii])
        tmax = v.dtype.type((tmpsum - v.dtype.type(1)) / v.dtype.type(ii))
        if tmax >= x[L - ii - 1]:
            stopped = True
            break
    if not stopped:
        tmax = v.dtype.type((tmpsum + x[0] - v.dtype.type(1)) / v.dtype.type(L))
    z = v - tmax
    return np.where(z > 0, z, v.dtype.type(leak) * z), tmax


def caffe_projection_vjp(v, g, leak):
    """Literal transcription of the fork's double loop (reference)."""
    L = v.shape[0]
    x = np.sort(v)
    tmpsum = 0.0
    stopped = False
    for ii in range(1, L):
        tmpsum += x[L - ii]
        tmax = (tmpsum - 1) / ii
        if tmax >= x[L - ii - 1]:
            stopped = True
            break
    if not stopped:
        tmax = (tmpsum + x[0] - 1) / L
        dt = np.full(L, 1.0 / L)
    else:
        dt = np.where(v > tmax, 1.0 / ii, 0.0)
    out = np.zeros(L)
    for k1 in range(L):
        for k2 in range(L):
            a = 1.0 if v[k2] > tmax else leak
            if k1 == k2:
                out[k1] += a * (g[k1] - dt[k1] * g[k2])
            else:
                out[k1] -= a * dt[k1] * g[k2]
    return out


@pytest.mark.parametrize('L', [1, 2, 3, 5, 21])
@pytest.mark.parametrize('leak', [0.0, 0.5])
def test_projection_matches_caffe_loop(L, leak):
    rng = np.random.default_rng(L)
    s = (rng.standard_normal((L, 40)) * 0.7 + 0.3).astype(np.float32)
    s[:, 0] = 1.0 / L                                      # already on the simplex
    s[:, 1] = 0.25                                         # ties
    out, info = projection.project_simplex(s, leak, axis=0)
    assert out.dtype == np.float32 and info.tau.shape == (1, 40) and info.rho.shape == (1, 40)
    for j in range(s.shape[1]):
        ref, tref = caffe_projection(s[:, j], leak)
        np.testing.assert_array_equal(out[:, j], ref)
        assert info.tau[0, j] == tref
    g = rng.standard_normal((L, 40))
    s64 = s.astype(np.float64)
    _, info64 = projection.project_simplex(s64, leak, axis=0)
    vjp = projection.project_simplex_vjp(g, s64, info64, leak, axis=0)
    for j in range(s.shape[1]):
        np.testing.assert_allclose(vjp[:, j], caffe_projection_vjp(s64[:, j], g[:, j], leak), atol=1e-12)


def test_projection_axis_and_vjp_finite_differences():
    rng = np.random.default_rng(7)
    s = rng.standard_normal((2, 3, 4, 5)) * 0.8
    out0, info0 = projection.project_simplex(s, 0.3, axis=1)
    out1, _ = projection.project_simplex(np.moveaxis(s, 1, -1), 0.3, axis=-1)
    np.testing.assert_array_equal(out0, np.moveaxis(out1, -1, 1))
    g = rng.standard_normal(s.shape)
    vjp = projection.project_simplex_vjp(g, s, info0, 0.3, axis=1)
    eps = 1e-7
    num = np.zeros_like(s)
    for idx in np.ndindex(s.shape):
        sp, sm = s.copy(), s.copy()
        sp[idx] += eps
        sm[idx] -= eps
        num[idx] = (np.sum(g * projection.project_simplex(sp, 0.3, axis=1)[0])
                    - np.sum(g * projection.project_simplex(sm, 0.3, axis=1)[0])) / (2 * eps)
    np.testing.assert_allclose(vjp, num, atol=1e-6)


# ------------------------------------------------------------------------------------ unary
def test_unary_and_derivatives():
    rng = np.random.default_rng(1)
    z = rng.uniform(0.01, 1, (2, 3, 4, 5))
    g = rng.standard_normal(z.shape)
    w, eps = 0.7, 0.1
    np.testing.assert_allclose(unary.unary(z, w, eps), -w * np.log(z + eps))
    h = 1e-7
    num_z = (np.sum(g * unary.unary(z + h, w, eps)) - np.sum(g * unary.unary(z - h, w, eps))) / (2 * h)
    assert abs(np.sum(unary.unary_grad_z(g, z, w, eps)) - np.sum(g * -w / (z + eps))) < 1e-9
    # directional derivative along all-ones equals Σ of the elementwise gradient
    assert abs(num_z - np.sum(unary.unary_grad_z(g, z, w, eps))) < 1e-5
    num_w = (np.sum(g * unary.unary(z, w + h, eps)) - np.sum(g * unary.unary(z, w - h, eps))) / (2 * h)
    assert abs(num_w - float(unary.unary_grad_w(g, z, eps))) < 1e-6
    assert unary.unary(z.astype(np.float32), np.float32(w), eps).dtype == np.float32


# ------------------------------------------------------------------------------------ pgd
def _problem(seed=0, N=2, L=3, H=4, W=5, k=3):
    rng = np.random.default_rng(seed)
    P = L * H * W
    return dict(
        rng=rng, p=rng.uniform(0.05, 1, (N, L, H, W)), Ws=rng.standard_normal((L, L, k, k)) * 0.5,
        K=rng.standard_normal((N, P, P)) * 0.1, R=rng.standard_normal((N, L, H, W)), shape=(N, L, H, W))


def _loss(pr, p, w, Ws, K, T=3, step=0.3, leak=0.4, eps=0.1, quirks=False):
    N, L, H, W = pr['shape']
    terms = [spatial.SpatialFilter(Ws, H, W), pgd.DensePairwise(K, (L, H, W))]
    out, cache, _ = pgd.pgd_forward(p, w, terms, T, step, leak, eps)
    return float(np.sum(out * pr['R'])), cache


def _fd_check(f, arr, grad, n=12, seed=0, eps=1e-6, tol=1e-6):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        idx = tuple(int(rng.integers(0, s)) for s in arr.shape)
        a = arr.copy()
        a[idx] += eps
        lp = f(a)
        a[idx] -= 2 * eps
        lm = f(a)
        num = (lp - lm) / (2 * eps)
        assert abs(num - grad[idx]) <= tol * max(1.0, abs(num)), (idx, num, grad[idx])


def test_pgd_backward_finite_differences():
    pr = _problem()
    p, Ws, K, w = pr['p'], pr['Ws'], pr['K'], 0.7
    _, cache = _loss(pr, p, w, Ws, K)
    g = pgd.pgd_backward(cache, pr['R'])
    _fd_check(lambda a: _loss(pr, a, w, Ws, K)[0], p, g['p'])
    _fd_check(lambda a: _loss(pr, p, w, a, K)[0], Ws, g['terms'][0])
    _fd_check(lambda a: _loss(pr, p, w, Ws, a)[0], K, g['terms'][1])
    num_w = (_loss(pr, p, w + 1e-6, Ws, K)[0] - _loss(pr, p, w - 1e-6, Ws, K)[0]) / 2e-6
    assert abs(num_w - float(g['unary_weight'])) < 1e-6 * max(1, abs(num_w))


class _Stale(pgd.DensePairwise):
    caffe_stale_param_grad = True


def test_pgd_caffe_quirk_uses_last_input():
    pr = _problem(1)
    N, L, H, W = pr['shape']
    terms = [spatial.SpatialFilter(pr['Ws'], H, W), _Stale(pr['K'], (L, H, W))]
    T = 3
    out, cache, _ = pgd.pgd_forward(pr['p'], 0.5, terms, T, 0.2, 0.5, 0.1)
    true = pgd.pgd_backward(cache, pr['R'])
    quirk = pgd.pgd_backward(cache, pr['R'], reproduce_caffe_quirks=True)
    # data gradients and the non-stale term agree; the stale term differs
    np.testing.assert_allclose(quirk['p'], true['p'], atol=1e-12)
    np.testing.assert_allclose(quirk['terms'][0], true['terms'][0], atol=1e-12)
    assert np.abs(quirk['terms'][1] - true['terms'][1]).max() > 1e-3
    # ... and equals -step Σ_t param_grad(x_{T-1}, γ_t): recompute the γ_t by hand
    delta, gams = pr['R'], []
    for t in range(T - 1, -1, -1):
        gam = projection.project_simplex_vjp(delta, cache.pre[t], cache.info[t], 0.5, axis=1)
        gams.append(gam)
        delta = gam - 0.2 * (terms[0].adjoint(gam) + terms[1].adjoint(gam))
    x_last = pgd.state(cache, T - 1)
    expect = sum(-0.2 * terms[1].param_grad(x_last, gm) for gm in gams)
    np.testing.assert_allclose(quirk['terms'][1], expect, atol=1e-12)
    # T = 1: no difference
    _, c1, _ = pgd.pgd_forward(pr['p'], 0.5, terms, 1, 0.2, 0.5, 0.1)
    np.testing.assert_allclose(pgd.pgd_backward(c1, pr['R'], True)['terms'][1],
                               pgd.pgd_backward(c1, pr['R'])['terms'][1], atol=1e-14)


def test_pgd_forward_matches_explicit_recursion_and_energies():
    pr = _problem(2)
    N, L, H, W = pr['shape']
    P = L * H * W
    terms = [spatial.SpatialFilter(pr['Ws'], H, W), pgd.DensePairwise(pr['K'], (L, H, W))]
    # the full K matrix per image, from the spatial filter's columns plus the dense part
    eye = np.eye(P).reshape(P, L, H, W)
    Ks = terms[0].apply(eye).reshape(P, P).T
    Kfull = Ks[None] + pr['K']
    w, eps, step, leak, T = 0.6, 0.1, 0.25, 0.0, 4
    out, cache, e6 = pgd.pgd_forward(pr['p'], w, terms, T, step, leak, eps, energy='eq6')
    _, _, ec = pgd.pgd_forward(pr['p'], w, terms, T, step, leak, eps, energy='caffe')
    u = (-w * np.log(pr['p'] + eps)).reshape(N, P)
    x = pr['p'].reshape(N, P)
    for t in range(T):
        e_ref = np.einsum('np,np->n', u, x) + 0.5 * np.einsum('np,npq,nq->n', x, Kfull, x)
        np.testing.assert_allclose(e6[:, t], e_ref, rtol=1e-12)
        caffe_ref = np.sum(u * x) + np.einsum('np,npq,nq->', x, Kfull, x)
        np.testing.assert_allclose(ec[t], caffe_ref, rtol=1e-12)
        s = x - step * (np.einsum('npq,nq->np', Kfull, x) + u)
        x = np.stack([projection.project_simplex(si.reshape(L, H * W), leak, axis=0)[0].ravel() for si in s])
    np.testing.assert_allclose(out.reshape(N, P), x, atol=1e-12)
    assert e6.shape == (N, T) and ec.shape == (T,)
    with pytest.raises(ValueError):
        pgd.pgd_forward(pr['p'], w, terms, 1, step, leak, eps, energy='half')


def test_pgd_zero_iterations_and_dtype():
    pr = _problem(3)
    N, L, H, W = pr['shape']
    p32 = pr['p'].astype(np.float32)
    terms = [spatial.SpatialFilter(pr['Ws'].astype(np.float32), H, W)]
    out, cache, en = pgd.pgd_forward(p32, np.float32(0.3), terms, 0, 0.1, 0.5, 0.1, energy='eq6')
    np.testing.assert_array_equal(out, p32)
    assert en.shape == (N, 0)
    g = pgd.pgd_backward(cache, np.ones_like(p32))
    np.testing.assert_array_equal(g['p'], np.ones_like(p32))
    out, cache, _ = pgd.pgd_forward(p32, np.float32(0.3), terms, 2, 0.1, 0.5, 0.1)
    assert out.dtype == np.float32
    g = pgd.pgd_backward(cache, np.ones_like(p32))
    assert g['p'].dtype == np.float32 and g['terms'][0].dtype == np.float32


def test_bilateral_term_gradients_with_lattice():
    """BilateralTerm over the real permutohedral lattice: taps and data gradients by FD (float64)."""
    rng = np.random.default_rng(5)
    N, L, H, W = 2, 2, 3, 4
    feats = rng.standard_normal((N, 5, H, W)) * 2
    taps = rng.standard_normal((L, L, 63)) * 0.3
    p = rng.uniform(0.05, 1, (N, L, H, W))
    R = rng.standard_normal((N, L, H, W))

    def run(p_, taps_):
        term = pgd.BilateralTerm.from_features(feats, taps_)
        out, cache, _ = pgd.pgd_forward(p_, 0.5, [term], 2, 0.3, 0.5, 0.1)
        return float(np.sum(out * R)), cache

    _, cache = run(p, taps)
    g = pgd.pgd_backward(cache, R)
    _fd_check(lambda a: run(p, a)[0], taps, g['terms'][0], n=10)
    _fd_check(lambda a: run(a, taps)[0], p, g['p'], n=10)
    assert cache.terms[0].has_self_interaction()
    assert not pgd.BilateralTerm(cache.terms[0].filters, np.zeros_like(taps)).has_self_interaction()


def test_dense_pairwise_checks():
    with pytest.raises(ValueError):
        pgd.DensePairwise(np.zeros((5, 5)), (1, 2, 2))
    K = np.zeros((8, 8))
    d = pgd.DensePairwise(K, (2, 2, 2))
    assert not d.has_self_interaction()
    K[1, 5] = 1.0                                          # pixel 1, label 0 -> pixel 1, label 1
    assert d.has_self_interaction()


# ------------------------------------------------------------------------------------ rounding
def test_rounding_small_cases_and_flags():
    rng = np.random.default_rng(9)
    N, L, H, W = 3, 3, 5, 4
    Ws = rng.standard_normal((L, L, 3, 3))
    Ws[:, :, 1, 1] = 0
    q = rng.random((N, L, H, W))
    q /= q.sum(1, keepdims=True)
    u = rng.standard_normal((N, L, H, W))
    term = spatial.SpatialFilter(Ws, H, W)
    r = rounding.round_solution(q, u, [term])
    assert r.guaranteed and not r.self_interaction and r.feasible and r.num_steps == 4
    assert np.all(r.energy_x <= r.energy_q + 1e-10)
    assert set(np.unique(r.x)) <= {0.0, 1.0} and np.all(r.x.sum(1) == 1)
    np.testing.assert_array_equal(np.argmax(r.x, 1), r.labels)
    # a one-hot q is its own rounding when it is a coordinate-wise minimum; energies reported correctly
    np.testing.assert_allclose(r.energy_x, pgd.energy_eq6(r.x, u, [term]))
    # self-interaction and infeasibility are reported
    Ws[0, 0, 1, 1] = 1.0
    r2 = rounding.round_solution(q, u, [spatial.SpatialFilter(Ws, H, W)])
    assert r2.self_interaction and not r2.guaranteed
    r3 = rounding.round_solution(q * 1.5, u, [term])
    assert not r3.feasible and not r3.guaranteed


def test_colour_schedule_is_a_partition_without_interactions():
    for radius in (0, 1, 2, 4, None):
        sched = rounding.colour_schedule(7, 6, radius)
        seen = np.zeros((7, 6), int)
        for ys, xs in sched:
            seen[ys, xs] += 1
            if radius is not None:
                dy = np.abs(ys[:, None] - ys[None, :])
                dx = np.abs(xs[:, None] - xs[None, :])
                close = (np.maximum(dy, dx) <= radius) & ~np.eye(len(ys), dtype=bool)
                assert not close.any()
            else:
                assert len(ys) == 1
        assert np.all(seen == 1)


def test_rounding_schedules():
    rng = np.random.default_rng(10)
    N, L, H, W = 2, 3, 4, 5
    P = L * H * W
    q = rng.random((N, L, H, W))
    q /= q.sum(1, keepdims=True)
    u = rng.standard_normal((N, L, H, W))
    K = rng.standard_normal((N, P, P))
    Kv = K.reshape(N, L, H * W, L, H * W)
    for i in range(H * W):
        Kv[:, :, i, :, i] = 0
    dense = pgd.DensePairwise(K, (L, H, W))
    r = rounding.round_solution(q, u, [dense])                        # auto: the proof's schedule
    assert r.schedule == 'sequential' and r.num_steps == H * W and r.guaranteed
    r = rounding.round_solution(q, u, [dense], schedule='colour')     # parallel: no guarantee
    assert r.schedule == 'colour' and r.num_steps == 4 and not r.guaranteed
    # spatial + bilateral (self-interaction, unbounded): auto colours by the spatial radius
    Ws = rng.standard_normal((L, L, 5, 5))
    Ws[:, :, 2, 2] = 0
    bil = pgd.BilateralTerm.from_features(rng.standard_normal((N, 5, H, W)), rng.standard_normal((L, L, 63)) * 0.1)
    terms = [spatial.SpatialFilter(Ws, H, W), bil]
    r = rounding.round_solution(q, u, terms)
    assert r.schedule == 'colour' and r.num_steps == 9 and r.self_interaction and not r.guaranteed
    np.testing.assert_allclose(r.energy_x, pgd.energy_eq6(r.x, u, terms))
    r = rounding.round_solution(q, u, terms, schedule='sequential')
    assert r.num_steps == H * W and not r.guaranteed
    with pytest.raises(ValueError):
        rounding.round_solution(q, u, terms, schedule='random')
