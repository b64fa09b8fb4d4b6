"""The fast paths agree with straightforward reference versions kept here.

* lattice: the compiled (numba) construction and operators against the vectorised NumPy path
  (CRFGRAD_NO_NUMBA=1) and against a per-tap reference blur over the (M, F) neighbour table;
* spatial: the tiled overlap-save FFT (forced to several tiles) against a brute-force
  correlation, a whole-image numpy.fft reference, and its filter gradient summed over several
  calls (backward_deferred) against per-call brute-force gradients; the kernel transform made by
  partial DFTs against numpy.fft.rfft2 of the placed bank;
* projection: the compiled leaky apply and VJP against the NumPy code (bit for bit / 1 ulp);
* PGD: the deferred parameter gradient against the per-step sum;
* the CrfGrad layer: compiled vs NumPy path, forward and backward;
* numba is never imported by ``import crfgrad_cupy`` and CRFGRAD_NO_NUMBA switches it off.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from crfgrad_cupy.blob import Blob
from crfgrad_cupy.core import accel, cuda_kernels, pgd, projection, spatial
from crfgrad_cupy.core import lattice as L
from crfgrad_cupy.layers.base import create_layer
from crfgrad_cupy.proto import caffe_pb2
from reference_ops import brute_conv, brute_weight_grad

HAVE_NUMBA = accel.available()
needs_numba = pytest.mark.skipif(accel.kernels(np) is None or cuda_kernels.kernels(np) is not None,
                                 reason='numba is not installed, CRFGRAD_NO_NUMBA is set, or the emulated '
                                        'CUDA kernels (CRFGRAD_EMULATE_RAWKERNEL) replace it')


@pytest.fixture
def numpy_path(monkeypatch):
    """A context switch: ``with numpy_path():`` runs the vectorised NumPy code."""
    class _Switch:
        def __enter__(self):
            monkeypatch.setenv('CRFGRAD_NO_NUMBA', '1')

        def __exit__(self, *exc):
            monkeypatch.delenv('CRFGRAD_NO_NUMBA')
    return _Switch


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def ref_blur(lat, z, w):
    """Per-tap blur over the (M, F) table: Y = Σ_f W_f Z[:, nbr_f] (missing -> 0).  z (C, M)."""
    zp = np.concatenate([z, np.zeros((z.shape[0], 1), z.dtype)], axis=1)
    return sum(w[:, :, f] @ zp[:, lat.nbr[:, f]] for f in range(lat.num_taps))


def ref_taps_grad(lat, z, g):
    zp = np.concatenate([z, np.zeros((z.shape[0], 1), z.dtype)], axis=1)
    return np.stack([g @ zp[:, lat.nbr[:, f]].T for f in range(lat.num_taps)], axis=-1)


def numpy_fft_conv(q, W):
    """The whole-image circular FFT formulation with numpy.fft (the previous implementation)."""
    n, c, h, w = q.shape
    o, _, k, _ = W.shape
    p = k // 2
    ph, pw = h + p, w + p
    kern = np.zeros((o, c, ph, pw))
    for ky in range(k):
        for kx in range(k):
            kern[:, :, (p - ky) % ph, (p - kx) % pw] = W[:, :, ky, kx]
    kh = np.fft.rfft2(kern)
    qh = np.fft.rfft2(q, s=(ph, pw))
    yh = np.einsum('ocyx,ncyx->noyx', kh, qh)
    return np.fft.irfft2(yh, s=(ph, pw))[:, :, :h, :w]


def _photo_features(h, w, seed, dtype=np.float32):
    """(5, h·w) POSITION_AND_RGB-like features of a noisy piecewise-constant image."""
    rng = np.random.default_rng(seed)
    img = np.zeros((3, h, w))
    img[:] = rng.uniform(0, 255, (3, 1, 1))
    img[:, h // 3:, w // 2:] = rng.uniform(0, 255, (3, 1, 1))
    img += rng.normal(0, 8, img.shape)
    yy, xx = np.mgrid[0:h, 0:w]
    f = np.concatenate([yy[None] * 0.3, xx[None] * 0.3, img * 0.05]).reshape(5, -1)
    return f.astype(dtype)


# ------------------------------------------------------------------------------------------------
# lattice
# ------------------------------------------------------------------------------------------------
def _vertex_map(a, b):
    """Map of a's vertex numbers to b's (both lattices of the same points)."""
    m = np.full(a.num_vertices, -1)
    m[a.vertex_in.ravel()] = b.vertex_in.ravel()
    assert np.all(m >= 0) and len(np.unique(m)) == a.num_vertices
    return m


@needs_numba
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('s', [1, 2])
def test_compiled_construction_equals_numpy(dtype, s, numpy_path):
    f = _photo_features(9, 11, 1, dtype)
    fast = L.build_lattice(f, neighborhood_size=s)
    with numpy_path():
        ref = L.build_lattice(f, neighborhood_size=s)
    assert fast._kern is not None and ref._kern is None
    assert fast.num_vertices == ref.num_vertices
    np.testing.assert_array_equal(fast.weight_in, ref.weight_in)       # the same arithmetic
    m = _vertex_map(fast, ref)
    np.testing.assert_array_equal(m[fast.vertex_in], ref.vertex_in)
    mp = np.append(m, ref.num_vertices)                                  # missing -> missing
    # immediate and tap tables, rows put in the reference numbering
    inv = np.argsort(m)                                                  # ref vertex -> fast vertex
    np.testing.assert_array_equal(mp[np.asarray(fast.immediate)[:, inv]], np.asarray(ref.immediate))
    np.testing.assert_array_equal(mp[fast.nbr[inv]], ref.nbr)
    np.testing.assert_array_equal(mp[fast.inv_nbr[inv]], ref.inv_nbr)


@needs_numba
@pytest.mark.parametrize('dtype,rtol', [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize('n_out', [None, 37])
@pytest.mark.parametrize('norm', ['symmetric', 'after', 'none'])
def test_compiled_filtering_equals_numpy_and_reference(dtype, rtol, n_out, norm, numpy_path):
    rng = np.random.default_rng(7)
    fin = _photo_features(8, 10, 2, dtype)
    fout = None if n_out is None else (rng.random((5, n_out)) * np.ptp(fin, axis=1)[:, None] +
                                       fin.min(axis=1)[:, None]).astype(dtype)
    fast = L.BilateralFilter(L.build_lattice(fin, fout), norm)
    with numpy_path():
        ref = L.BilateralFilter(L.build_lattice(fin, fout), norm)
    lat = fast.lattice
    n, no = lat.n_in, lat.n_out
    x = rng.standard_normal((6, n)).astype(dtype)
    gr = rng.standard_normal((4, no)).astype(dtype)
    for group in (1, 2):
        w = rng.standard_normal((4, 6 // group, lat.num_taps)).astype(dtype)
        y = fast.apply(x, w, group)
        assert y.dtype == dtype
        np.testing.assert_allclose(y, ref.apply(x, w, group), rtol=rtol, atol=rtol * np.abs(y).max())
        a = fast.adjoint(gr, w, group)
        np.testing.assert_allclose(a, ref.adjoint(gr, w, group), rtol=rtol, atol=rtol * np.abs(a).max())
        t = fast.taps_grad(x, gr, group)
        np.testing.assert_allclose(t, ref.taps_grad(x, gr, group), rtol=rtol, atol=rtol * np.abs(t).max())
        a2, t2 = fast.backward(x, gr, w, group)
        np.testing.assert_allclose(a2, a, rtol=1e-6)
        np.testing.assert_allclose(t2, t, rtol=1e-6)
    gx = fast.gaussian(x)
    np.testing.assert_allclose(gx, ref.gaussian(x), rtol=rtol, atol=rtol * np.abs(gx).max())
    for a, b in ((fast.norm_there, ref.norm_there), (fast.norm_back, ref.norm_back)):
        if a is None:
            assert b is None
        else:
            np.testing.assert_allclose(a, b, rtol=rtol)


@needs_numba
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_compiled_lattice_operators_equal_per_tap_reference(dtype):
    rng = np.random.default_rng(3)
    lat = L.build_lattice(_photo_features(10, 9, 3, dtype))
    assert lat._kern is not None
    M, F = lat.num_vertices, lat.num_taps
    z = rng.standard_normal((5, M)).astype(dtype)
    g = rng.standard_normal((3, M)).astype(dtype)
    w = rng.standard_normal((3, 5, F)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    y = lat.blur(z, w)
    np.testing.assert_allclose(y, ref_blur(lat, z, w), rtol=tol, atol=tol * np.abs(y).max())
    # adjoint by the identity <g, blur(z)> = <blur_adjoint(g), z>
    lhs, rhs = np.sum(g * y, dtype=np.float64), np.sum(lat.blur_adjoint(g, w) * z, dtype=np.float64)
    assert abs(lhs - rhs) <= tol * 10 * (np.abs(g).sum() * np.abs(y).max())
    tg = lat.blur_taps_grad(z, g)
    np.testing.assert_allclose(tg, ref_taps_grad(lat, z, g), rtol=tol, atol=tol * np.abs(tg).max())
    gz = lat._blur_scalarT(np.ascontiguousarray(z.T), L.gaussian_taps(5, 1, dtype=dtype)).T
    gw = np.eye(5, dtype=dtype)[:, :, None] * L.gaussian_taps(5, 1, dtype=dtype)
    np.testing.assert_allclose(gz, ref_blur(lat, z, gw), rtol=tol, atol=tol * np.abs(gz).max())
    # splat / slice against their definitions
    x = rng.standard_normal((2, lat.n_in)).astype(dtype)
    sp = np.zeros((2, M))
    for r in range(lat.d + 1):
        np.add.at(sp.T, lat.vertex_in[:, r], (lat.weight_in[:, r] * x).T)
    np.testing.assert_allclose(lat.splat(x), sp, rtol=tol, atol=tol)
    sl = sum(lat.weight_out[:, r] * z[:2, lat.vertex_out[:, r]] for r in range(lat.d + 1))
    np.testing.assert_allclose(lat.slice(z[:2]), sl, rtol=tol, atol=tol)


def test_no_numba_switch(monkeypatch):
    monkeypatch.setenv('CRFGRAD_NO_NUMBA', '1')
    assert accel.kernels(np) is None
    lat = L.build_lattice(_photo_features(4, 5, 0))
    assert lat._kern is None
    monkeypatch.setenv('CRFGRAD_NO_NUMBA', '0')
    assert (accel.kernels(np) is not None) == HAVE_NUMBA


def test_numba_not_imported_with_the_package():
    code = ('import sys, crfgrad_cupy, crfgrad_cupy.layers, crfgrad_cupy.core.lattice, '
            'crfgrad_cupy.core.spatial, crfgrad_cupy.core.pgd, crfgrad_cupy.net\n'
            'assert "numba" not in sys.modules, "numba imported at package import"')
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
                                        env.get('PYTHONPATH', '').split(os.pathsep))
    subprocess.run([sys.executable, '-c', code], check=True, env=env)


# ------------------------------------------------------------------------------------------------
# spatial
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('max_period', [16, 24, 128])
@pytest.mark.parametrize('shape', [(2, 3, 4, 23, 30, 5), (1, 4, 4, 17, 12, 9), (1, 2, 3, 40, 9, 3)])
def test_tiled_fft_equals_brute_force(shape, max_period, monkeypatch):
    monkeypatch.setattr(spatial, '_MAX_PERIOD', max_period)
    n, c, o, h, w, k = shape
    rng = np.random.default_rng(sum(shape))
    q = rng.standard_normal((n, c, h, w))
    W = rng.standard_normal((o, c, k, k))
    g = rng.standard_normal((n, o, h, w))
    f = spatial.SpatialFilter(W, h, w, 'fft')
    if max_period < 128:
        assert f.tiling.ny * f.tiling.nx > 1                              # several tiles
    ref = brute_conv(q, W)
    np.testing.assert_allclose(f.apply(q), ref, atol=1e-11 * np.abs(ref).max())
    np.testing.assert_allclose(numpy_fft_conv(q, W), ref, atol=1e-11 * np.abs(ref).max())
    np.testing.assert_allclose(f.adjoint(g), spatial.direct_adjoint(g, W), atol=1e-11 * k * k * o)
    np.testing.assert_allclose(f.weight_grad(q, g), brute_weight_grad(q, g, k), atol=1e-10)
    np.testing.assert_allclose(spatial.spatial_filter_weight_grad(q, g, k, 'fft'), brute_weight_grad(q, g, k),
                               atol=1e-10)
    # deferred: gradients of three calls summed in one pass
    pairs = [(rng.standard_normal(q.shape), rng.standard_normal(g.shape)) for _ in range(3)]
    toks = []
    for qq, gg in pairs:
        dq, tok = f.backward_deferred(qq, gg)
        np.testing.assert_allclose(dq, spatial.direct_adjoint(gg, W), atol=1e-11 * k * k * o)
        toks.append(tok)
    np.testing.assert_allclose(f.param_grad_deferred(toks), sum(brute_weight_grad(a, b, k) for a, b in pairs),
                               atol=1e-10)


def test_tiled_fft_float32_close_to_direct():
    rng = np.random.default_rng(5)
    q = rng.random((1, 21, 70, 150)).astype(np.float32)
    g = rng.standard_normal((1, 21, 70, 150)).astype(np.float32)
    W = (rng.standard_normal((21, 21, 9, 9)) * 0.1).astype(np.float32)
    f = spatial.SpatialFilter(W, 70, 150, 'fft')
    assert f.tiling.nx > 1
    for a, b in ((f.apply(q), spatial.direct_apply(q, W)), (f.adjoint(g), spatial.direct_adjoint(g, W)),
                 (f.weight_grad(q, g), spatial.direct_weight_grad(q, g, 9))):
        assert a.dtype == np.float32
        assert np.abs(a - b).max() <= 2e-5 * np.abs(b).max()


def test_shared_workspaces_keep_results_apart(monkeypatch):
    """Filters of one tiling share their scratch arrays: results must not alias them, and other
    channel counts or batch sizes on the same tiling must still be right."""
    monkeypatch.setattr(spatial, '_MAX_PERIOD', 16)
    spatial.clear_workspaces()
    rng = np.random.default_rng(8)
    W1, W2 = rng.standard_normal((3, 2, 5, 5)), rng.standard_normal((2, 4, 5, 5))
    f1, f2 = spatial.SpatialFilter(W1, 20, 23, 'fft'), spatial.SpatialFilter(W2, 20, 23, 'fft')
    q1, q2 = rng.standard_normal((1, 2, 20, 23)), rng.standard_normal((3, 4, 20, 23))
    y1 = f1.apply(q1)
    keep = y1.copy()
    y2 = f2.apply(q2)
    y1b = f1.apply(rng.standard_normal((1, 2, 20, 23)))
    np.testing.assert_array_equal(y1, keep)
    assert not np.shares_memory(y1, y1b)
    np.testing.assert_allclose(y2, brute_conv(q2, W2), atol=1e-11 * np.abs(y2).max())
    np.testing.assert_allclose(f1.apply(q1), keep, atol=1e-12)
    g = rng.standard_normal((1, 3, 20, 23))
    np.testing.assert_allclose(f1.weight_grad(q1, g), brute_weight_grad(q1, g, 5), atol=1e-10)
    spatial.clear_workspaces()


@pytest.mark.parametrize('h,w,k', [(9, 12, 9), (40, 33, 5), (7, 3, 3)])
def test_kernel_transform_equals_numpy_fft(h, w, k):
    rng = np.random.default_rng(h)
    W = rng.standard_normal((3, 2, k, k))
    ph, pw = spatial._fft_grid(h, w, k)
    p = k // 2
    kern = np.zeros((ph, pw, 3, 2))
    for ky in range(k):
        for kx in range(k):
            kern[(p - ky) % ph, (p - kx) % pw] = W[:, :, ky, kx]
    np.testing.assert_allclose(spatial.kernel_transform(W, h, w), np.fft.rfft2(kern, axes=(0, 1)), atol=1e-12)


def test_tile_plan():
    for size, k in [(375, 9), (500, 9), (12, 9), (1, 3), (300, 1), (129, 5)]:
        tile, period, count = spatial._tile_axis(size, k)
        assert tile * count >= size and period >= tile + 2 * (k // 2)
        assert period <= max(spatial._MAX_PERIOD, spatial._good_size(size + 2 * (k // 2)))
        assert spatial._good_size(period) == period


# ------------------------------------------------------------------------------------------------
# projection
# ------------------------------------------------------------------------------------------------
@needs_numba
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('shape,axis', [((2, 5, 7, 3), 1), ((4, 6), 0), ((3, 1, 4), 1), ((2, 3, 21), 2)])
def test_compiled_projection_equals_numpy(dtype, shape, axis, numpy_path):
    rng = np.random.default_rng(len(shape))
    s = (rng.standard_normal(shape) * 1.5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    out, info = projection.project_simplex(s, 0.3, axis)
    vjp = projection.project_simplex_vjp(g, s, info, 0.3, axis)
    lk = projection.leaky_apply(s, info.tau, 0.7)
    with numpy_path():
        out2, info2 = projection.project_simplex(s, 0.3, axis)
        vjp2 = projection.project_simplex_vjp(g, s, info2, 0.3, axis)
        lk2 = projection.leaky_apply(s, info2.tau, 0.7)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lk, lk2)
    np.testing.assert_array_equal(info.tau, info2.tau)
    np.testing.assert_array_equal(info.rho, info2.rho)
    np.testing.assert_allclose(vjp, vjp2, rtol=0, atol=4 * np.finfo(dtype).eps * np.abs(vjp2).max())
    assert vjp.dtype == dtype and out.dtype == dtype


# ------------------------------------------------------------------------------------------------
# PGD and the layer
# ------------------------------------------------------------------------------------------------
class _PerStep(pgd.PairwiseOperator):
    """A spatial term without the deferred gradient: one full gradient per step (reference)."""
    interaction_radius = None

    def __init__(self, f):
        self.f = f

    def apply(self, q):
        return self.f.apply(q)

    def adjoint(self, g):
        return self.f.adjoint(g)

    def param_grad(self, q, g):
        return brute_weight_grad(q, g, self.f.k)


def test_deferred_spatial_gradient_equals_per_step_sum():
    rng = np.random.default_rng(11)
    N, Lc, H, W, T = 2, 3, 8, 9, 4
    p = rng.dirichlet(np.ones(Lc), size=(N, H, W)).transpose(0, 3, 1, 2)
    Ws = rng.standard_normal((Lc, Lc, 5, 5)) * 0.1
    top = rng.standard_normal(p.shape)
    res = []
    for per_step in (False, True):
        term = spatial.SpatialFilter(Ws, H, W, 'fft')
        if per_step:
            term = _PerStep(term)
        assert hasattr(term, 'backward_deferred') != per_step
        x, cache, _ = pgd.pgd_forward(p, 0.7, [term], T, 0.1, 0.5, 1e-3)
        res.append(pgd.pgd_backward(cache, top))
    np.testing.assert_allclose(res[0]['terms'][0], res[1]['terms'][0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res[0]['p'], res[1]['p'], rtol=1e-12)


def _crf_layer(L_, k, T, feat, p, rng):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge('name: "crf" type: "CrfGrad" bottom: "p" bottom: "f" top: "q" crfgrad_param { '
                      'num_classes: %d kernel_size: %d num_iterations: %d }' % (L_, k, T), lp)
    layer = create_layer(lp, caffe_pb2.TRAIN)
    pb, fb, top = Blob(p.shape), Blob(feat.shape), Blob(())
    pb.data, fb.data = p, feat
    layer.setup([pb, fb], [top])
    layer.blobs[1].data = (rng.standard_normal(layer.blobs[1].shape) * 0.05).astype(np.float32)
    layer.blobs[2].data = layer.blobs[2].data + (rng.standard_normal(layer.blobs[2].shape) * 0.05).astype(np.float32)
    return layer, [pb, fb], [top]


@needs_numba
def test_crfgrad_layer_compiled_equals_numpy(numpy_path):
    H, W, L_ = 14, 17, 4
    feat = _photo_features(H, W, 9).reshape(1, 5, H, W)
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(L_), size=(1, H, W)).transpose(0, 3, 1, 2).astype(np.float32)
    top_diff = rng.standard_normal(p.shape).astype(np.float32)
    outs = []
    for use_numpy in (False, True):
        r = np.random.default_rng(0)
        if use_numpy:
            sw = numpy_path()
            sw.__enter__()
        layer, bottoms, tops = _crf_layer(L_, 5, 3, feat, p, r)
        layer.forward(bottoms, tops)
        tops[0].diff[...] = top_diff
        layer.backward(tops, [True, False], bottoms)
        if use_numpy:
            sw.__exit__()
        outs.append([tops[0].data.copy(), bottoms[0].diff.copy()] + [b.diff.copy() for b in layer.blobs])
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(b).max()))
