"""The CUDA kernels of the CuPy path (crfgrad_cupy/core/cuda_kernels.py), checked without a GPU.

Their source is valid C++ too: with CRFGRAD_EMULATE_RAWKERNEL=1 and NumPy arrays the lattice,
projection and spatial code take their CUDA branch with the kernels built by the host compiler.
Here that branch is compared with the array code (the reference) and run through the oracle
cases; nvcc, where installed, compiles the source for the GPU (syntax and types as NVRTC sees
them).  On a GPU machine tools/gpu_check.py compares the real kernels with the array code."""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import oracle_util as ou
from crfgrad_cupy.core import cuda_kernels as ck
from crfgrad_cupy.core import lattice as L
from crfgrad_cupy.core import projection as P
from crfgrad_cupy.core import spatial as S

needs_cxx = pytest.mark.skipif(ck.host_compiler() is None, reason='no C++ compiler for the emulated kernels')


@pytest.fixture
def emulate(monkeypatch):
    """Run the block with the emulated kernels; yields a dict counting the launches by kernel."""
    monkeypatch.setenv('CRFGRAD_EMULATE_RAWKERNEL', '1')
    calls = {}
    orig = ck.KernelSet.launch

    def counting(self, name, *args, **kw):
        calls[name] = calls.get(name, 0) + 1
        return orig(self, name, *args, **kw)
    monkeypatch.setattr(ck.KernelSet, 'launch', counting)
    yield calls


def _reference(monkeypatch, fn):
    """fn() with the array code (no emulated kernels, no numba)."""
    monkeypatch.delenv('CRFGRAD_EMULATE_RAWKERNEL', raising=False)
    monkeypatch.setenv('CRFGRAD_NO_NUMBA', '1')
    try:
        return fn()
    finally:
        monkeypatch.setenv('CRFGRAD_EMULATE_RAWKERNEL', '1')
        monkeypatch.delenv('CRFGRAD_NO_NUMBA')


def _features(rng, h, w, dtype, offset=0.0):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((3, h, w))
    img[:, : h // 2] = rng.uniform(-1, 1, (3, 1, 1)) * 40
    img[:, :, w // 3:] += rng.uniform(-1, 1, (3, 1, 1)) * 30
    img += rng.normal(0, 4, img.shape)
    f = np.concatenate([np.stack([xx, yy]) / 3.0 + offset, img / 9.0]).reshape(5, -1)
    return f.astype(dtype)


def _close(a, b, dtype):
    tol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))))


# ------------------------------------------------------------------------------------ nvcc
@pytest.mark.skipif(shutil.which('nvcc') is None, reason='nvcc not installed')
@pytest.mark.parametrize('real', ['float', 'double'])
def test_source_compiles_for_the_gpu(tmp_path, real):
    src = tmp_path / 'k.cu'
    src.write_text(ck.SOURCE)
    for defines in (['-DOB=21', '-DCIN=21', '-DLMAX=21'], ['-DOB=1', '-DCIN=64', '-DLMAX=256'],
                    ['-DDMAX=5', '--fmad=false']):
        proc = subprocess.run(['nvcc', '-ptx', '-DREAL=' + real] + defines + ['-o', str(tmp_path / 'k.ptx'),
                                                                              str(src)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        ptx = (tmp_path / 'k.ptx').read_text()
        entries = set(re.findall(r'\.entry\s+(\w+)\s*\(', ptx))
        assert set(ck._SIGNATURES) <= entries, set(ck._SIGNATURES) - entries


def test_signatures_match_the_source():
    for name, sig in ck._SIGNATURES.items():
        m = re.search(r'__global__ void %s\((.*?)\)\s*\{' % name, ck.SOURCE, re.S)
        assert m, name
        params = [p.strip() for p in m.group(1).split(',')]
        kinds = ''.join('p' if '*' in p else ('r' if p.startswith('REAL') else 'i') for p in params)
        assert kinds == sig, (name, kinds, sig)


def test_selection_by_environment(monkeypatch):
    monkeypatch.delenv('CRFGRAD_EMULATE_RAWKERNEL', raising=False)
    assert ck.kernels(np) is None                     # NumPy: the array code unless asked
    monkeypatch.setenv('CRFGRAD_EMULATE_RAWKERNEL', '1')
    ks = ck.kernels(np)
    assert ks is not None and ks.emulated
    monkeypatch.setenv('CRFGRAD_NO_RAWKERNEL', '1')               # the switch back to the array code
    assert ck.kernels(np) is None
    monkeypatch.delenv('CRFGRAD_NO_RAWKERNEL')
    monkeypatch.setenv('CRFGRAD_EMULATE_RAWKERNEL', '0')
    assert ck.kernels(np) is None


@needs_cxx
def test_launch_checks_its_arguments(emulate):
    ks = ck.kernels(np)
    a = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match='C-contiguous'):
        ks.launch('lattice_invert_taps', 12, (np.zeros((3, 4), np.int32).T, a.astype(np.int32), 4, 3), np.float32)
    with pytest.raises(TypeError, match='arguments'):
        ks.launch('lattice_invert_taps', 12, (a,), np.float32)
    with pytest.raises(TypeError, match='float32 or float64'):
        ks.launch('lattice_invert_taps', 12, (a.astype(np.int32), a.astype(np.int32), 4, 3), np.int32)


# ------------------------------------------------------------------------------------ lattice
@needs_cxx
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('same', [True, False])
def test_lattice_kernels_equal_the_array_code(emulate, monkeypatch, dtype, same):
    rng = np.random.default_rng(3)
    fin = _features(rng, 13, 17, dtype)
    fout = None if same else _features(rng, 9, 11, dtype, offset=0.7)
    C, O = 4, 40                                        # O > 32: two output blocks per vertex, padded
    F = L.num_taps(5, 1)
    n_out = fin.shape[1] if same else fout.shape[1]
    x = rng.normal(size=(C, fin.shape[1])).astype(dtype)
    g = rng.normal(size=(O, n_out)).astype(dtype)
    taps = rng.normal(size=(O, C, F)).astype(dtype)

    def run():
        lat = L.build_lattice(fin, fout)
        z = lat.splat(x)
        y = lat.blur(z, taps)
        res = {'z': z, 'y': y, 'out': lat.slice(y), 'adj_blur': lat.blur_adjoint(y, taps),
               'taps_grad': lat.blur_taps_grad(z, y), 'splat_adj': lat.splat_adjoint(z),
               'slice_adj': lat.slice_adjoint(g), 'nbr': lat.nbr, 'inv': lat.inv_nbr,
               'taps_v': lat.taps_v[1:], 'taps_u': lat.taps_u[1:]}
        for norm in ('symmetric', 'after', 'none'):
            bf = L.BilateralFilter(lat, norm)
            res[norm] = (bf.apply(x, taps), bf.adjoint(g, taps), bf.taps_grad(x, g), bf.gaussian(x))
        return res
    ours = run()
    assert {'lattice_tap_table', 'lattice_blur', 'lattice_splat', 'lattice_slice', 'lattice_invert_taps',
            'lattice_blur_scalar', 'lattice_taps_grad', 'lattice_tap_masks'} <= set(emulate)
    ref = _reference(monkeypatch, run)
    # the construction is shared up to the immediate neighbours, so the vertex numbering is the same
    np.testing.assert_array_equal(ours['nbr'], ref['nbr'])
    np.testing.assert_array_equal(ours['inv'], ref['inv'])
    for a, b in zip(ours['taps_v'] + ours['taps_u'], ref['taps_v'] + ref['taps_u']):
        np.testing.assert_array_equal(a, b)
    for key in ('z', 'y', 'out', 'adj_blur', 'taps_grad', 'splat_adj', 'slice_adj'):
        assert ours[key].shape == ref[key].shape and ours[key].dtype == ref[key].dtype, key
        _close(ours[key], ref[key], dtype)
    for norm in ('symmetric', 'after', 'none'):
        for a, b in zip(ours[norm], ref[norm]):
            _close(a, b, dtype)


@needs_cxx
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('d', [1, 2, 5, 8])
def test_lattice_points_kernel_is_bit_exact(emulate, monkeypatch, dtype, d):
    """Elevation, rounding, ranks and barycentric weights: the same bits as the array code, also on
    features at rounding ties (integers and halves)."""
    rng = np.random.default_rng(10 + d)
    f = np.concatenate([rng.normal(0, 3, (d, 300)), np.round(rng.normal(0, 3, (d, 200)) * 2) / 2], axis=1)
    f = f.astype(dtype)

    def run():
        lat = L.build_lattice(f)
        return lat.vertex_in, lat.weight_in, lat.immediate
    ours = run()
    assert 'lattice_points' in emulate
    ref = _reference(monkeypatch, run)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@needs_cxx
def test_lattice_kernels_with_groups_and_mixed_dtypes(emulate, monkeypatch):
    rng = np.random.default_rng(4)
    fin = _features(rng, 10, 12, np.float32)
    F = L.num_taps(5, 1)
    x = rng.normal(size=(6, fin.shape[1]))                # float64 values on a float32 lattice
    taps = rng.normal(size=(9, 2, F))                     # group 3: 6 channels -> 9 outputs

    def run():
        bf = L.BilateralFilter(L.build_lattice(fin))
        y = bf.apply(x, taps, group=3)
        return y, bf.adjoint(y, taps, group=3), bf.taps_grad(x, y, group=3)
    ours = run()
    ref = _reference(monkeypatch, run)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == np.float64
        _close(a, b, np.float32)


@needs_cxx
def test_blur_order_groups_vertices_by_their_taps(emulate):
    rng = np.random.default_rng(9)
    lat = L.build_lattice(_features(rng, 16, 16, np.float32))
    M = lat.num_vertices
    order = lat._gpu_order(lat.nbr)
    assert order.dtype == np.int32
    np.testing.assert_array_equal(np.sort(order), np.arange(M))          # a permutation
    exists = lat.nbr[:, 1:] < M
    masks = (exists.astype(np.uint64) << np.arange(exists.shape[1], dtype=np.uint64)).sum(axis=1)
    assert np.all(np.diff(masks[order].astype(np.float64)) >= 0)          # sorted by tap set
    assert lat._gpu_order(lat.nbr) is order                               # kept
    inv_order = lat._gpu_order(lat.inv_nbr)
    assert inv_order is not order
    # warps of 32 consecutive vertices in this order skip the taps that none of them has
    m = (M // 32) * 32
    union = exists[order[:m]].reshape(-1, 32, exists.shape[1]).any(axis=1).mean()
    union_plain = exists[:m].reshape(-1, 32, exists.shape[1]).any(axis=1).mean()
    assert union < 0.8 * union_plain


@needs_cxx
def test_lattice_taps_grad_in_chunks(emulate, monkeypatch):
    """The tap gradient over many vertex chunks equals the one-chunk result."""
    rng = np.random.default_rng(5)
    lat = L.build_lattice(_features(rng, 12, 12, np.float64))
    z = rng.normal(size=(3, lat.num_vertices))
    y = rng.normal(size=(2, lat.num_vertices))
    monkeypatch.setattr(L, '_TAPS_GRAD_MAX_CHUNKS', 1)
    whole = lat.blur_taps_grad(z, y)
    monkeypatch.setattr(L, '_TAPS_GRAD_MIN_CHUNK', 7)                   # many chunks of 7 vertices
    monkeypatch.setattr(L, '_TAPS_GRAD_MAX_CHUNKS', 10 ** 6)
    np.testing.assert_allclose(lat.blur_taps_grad(z, y), whole, rtol=1e-12, atol=1e-12)
    # and it is the gradient: <y, blur(z, taps)> is linear in the taps
    taps = rng.normal(size=(2, 3, lat.num_taps))
    np.testing.assert_allclose(np.sum(y * lat.blur(z, taps)), np.sum(whole * taps), rtol=1e-10)


# ------------------------------------------------------------------------------------ projection
@needs_cxx
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('leak', [0.0, 0.3])
def test_projection_kernels_equal_the_array_code(emulate, monkeypatch, dtype, leak):
    rng = np.random.default_rng(6)
    s = rng.normal(size=(2, 7, 5, 6)).astype(dtype)
    s[0, :, 0, 0] = 0.25                                   # ties everywhere
    s[1, :3, 1, 1] = 2.0
    s[1, :, 2, 2] = np.linspace(-3, 3, 7)                  # a pixel that stops late
    g = rng.normal(size=s.shape).astype(dtype)

    def run():
        out = {}
        for axis in (1, 0, 3):
            y, info = P.project_simplex(s, leak, axis=axis)
            out[axis] = (y, info.tau, info.rho, P.project_simplex_vjp(g, s, info, leak, axis=axis))
        return out
    ours = run()
    assert emulate.get('simplex_project') == 3 and emulate.get('simplex_vjp') == 3
    ref = _reference(monkeypatch, run)
    for axis in ours:
        (y, tau, rho, vjp), (ry, rtau, rrho, rvjp) = ours[axis], ref[axis]
        np.testing.assert_array_equal(rho, rrho)
        assert tau.shape == rtau.shape and y.dtype == ry.dtype
        _close(tau, rtau, dtype)
        _close(y, ry, dtype)
        _close(vjp, rvjp, dtype)
    if leak == 0:                                          # on the simplex
        y = ours[1][0]
        assert np.all(y >= 0)
        np.testing.assert_allclose(y.sum(axis=1), 1, rtol=1e-5)


@needs_cxx
def test_projection_single_label(emulate):
    s = np.array([[[0.3]], [[-2.0]]], np.float32)          # (2, 1, 1), L = 1
    y, info = P.project_simplex(s, 0.5, axis=1)
    np.testing.assert_allclose(y, 1.0)
    assert np.all(info.rho == 1)


# ------------------------------------------------------------------------------------ spatial
@needs_cxx
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_spatial_kernels_equal_the_direct_path(emulate, monkeypatch, dtype):
    rng = np.random.default_rng(7)
    monkeypatch.setattr(S, '_MAX_PERIOD', 24)              # several tiles along both axes
    n, c, o, h, w, k = 2, 3, 5, 37, 50, 7
    q = rng.normal(size=(n, c, h, w)).astype(dtype)
    g = rng.normal(size=(n, o, h, w)).astype(dtype)
    wts = rng.normal(size=(o, c, k, k)).astype(dtype)
    filt = S.SpatialFilter(wts, h, w, method='fft')
    assert filt.tiling.ny > 1 and filt.tiling.nx > 1
    dq, tok = filt.backward_deferred(q, g)
    ours = (filt.apply(q), filt.adjoint(g), filt.weight_grad(q, g), dq, filt.param_grad_deferred([tok]))
    assert {'tile_windows', 'tile_cores', 'tile_assemble', 'freq_mix'} <= set(emulate)
    ref = _reference(monkeypatch, lambda: (S.direct_apply(q, wts), S.direct_adjoint(g, wts),
                                           S.direct_weight_grad(q, g, k)))
    for a, b in zip(ours, ref + ref[1:]):
        assert a.shape == b.shape and a.dtype == b.dtype
        tol = 2e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.max(np.abs(b))))


@needs_cxx
def test_spatial_mix_falls_back_for_many_channels(emulate, monkeypatch):
    monkeypatch.setattr(ck, 'MAX_MIX_CHANNELS', 2)
    rng = np.random.default_rng(8)
    q = rng.normal(size=(1, 3, 20, 21))
    wts = rng.normal(size=(2, 3, 5, 5))
    out = S.SpatialFilter(wts, 20, 21, method='fft').apply(q)
    assert 'freq_mix' not in emulate and 'tile_windows' in emulate
    np.testing.assert_allclose(out, S.direct_apply(q, wts), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ oracle
CRF_CASES = [c['name'] for c in (ou.cases() if os.path.isdir(ou.ORACLE) else [])
             if 'npz' in c['files'] and c['name'].startswith(('crfgrad', 'perm_', 'whole_net'))]


@needs_cxx
@pytest.mark.parametrize('name', CRF_CASES)
def test_oracle_through_the_kernels(name, shared_dir, emulate):
    """The CrfGrad/Permutohedral oracle cases with every lattice and projection operation in the
    CUDA kernels (emulated)."""
    assert ou.check_case(name, quirks=True)
    assert emulate.get('lattice_blur', 0) + emulate.get('lattice_slice', 0) > 0


def test_oracle_crf_cases_found(shared_dir):
    assert len(CRF_CASES) >= 14
