"""core.lattice: a per-point reference of Caffe's lattice construction (plain Python loops,
written from permutohedral.md), tap order and Gaussian taps, adjoint identities, float64
finite differences, the learned-tap path vs the Gaussian path, and a brute-force dense
Gaussian comparison."""
import itertools
import math

import numpy as np
import pytest

import oracle_util
from crfgrad_cupy import backend
from crfgrad_cupy.core import lattice as L


# ---------------------------------------------------------------------------------------------
# reference: Caffe's Permutohedral::init, one point at a time, in float32 scalars
# ---------------------------------------------------------------------------------------------

def reference_lattice(feat, s):
    """Returns (vertex (n, d+1) int, bary (n, d+1) float32, nbr (M, F) int with -1 = missing)."""
    f32 = np.float32
    d, n = feat.shape
    inv_std_dev = f32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std_dev)) for i in range(d)]
    down = f32(1.0) / f32(d + 1)
    keys = {}
    vertex = np.zeros((n, d + 1), dtype=np.int64)
    bary_out = np.zeros((n, d + 1), dtype=np.float32)
    for k in range(n):
        elev = [f32(0)] * (d + 1)
        sm = f32(0)
        for j in range(d, 0, -1):
            cf = f32(f32(feat[j - 1, k]) * scale[j - 1])
            elev[j] = f32(sm - f32(j) * cf)
            sm = f32(sm + cf)
        elev[0] = sm
        rem0, total = [], 0
        for i in range(d + 1):
            x = float(f32(down * elev[i]))
            rd = int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)
            rem0.append(rd * (d + 1))
            total += rd
        rank = [0] * (d + 1)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if f32(elev[i] - f32(rem0[i])) < f32(elev[j] - f32(rem0[j])):
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += d + 1
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] -= d + 1
        b = [f32(0)] * (d + 2)
        for i in range(d + 1):
            v = f32(f32(elev[i] - f32(rem0[i])) * down)
            b[d - rank[i]] = f32(b[d - rank[i]] + v)
            b[d - rank[i] + 1] = f32(b[d - rank[i] + 1] - v)
        b[0] = f32(float(b[0]) + (1.0 + float(b[d + 1])))
        for r in range(d + 1):
            key = tuple(rem0[i] + (r if rank[i] <= d - r else r - (d + 1)) for i in range(d))
            vertex[k, r] = keys.setdefault(key, len(keys))
            bary_out[k, r] = b[r]
    key_list = list(keys)
    M = len(key_list)

    def step(key, k):
        return tuple(c + (d if i == k else -1) for i, c in enumerate(key)) if k < d else \
            tuple(c - 1 for c in key)
    imm = [[keys.get(step(key, k), -1) for k in range(d + 1)] for key in key_list]
    table = []
    for v in range(M):
        row = []

        def walk(dim, cur, has_zero):
            if dim > d:
                row.append(cur)
                return
            end = s + 1 if (dim < d or has_zero) else 1
            for i in range(end):
                walk(dim + 1, cur, has_zero or i == 0)
                if cur >= 0:
                    cur = imm[cur][dim]
        walk(0, v, False)
        table.append(row)
    return vertex, bary_out, np.array(table, dtype=np.int64).reshape(M, -1)


def _point_sets():
    rng = np.random.default_rng(3)
    out = []
    for d, n, spread in [(1, 30, 6.0), (2, 60, 4.0), (3, 80, 3.0), (5, 90, 2.5)]:
        f = rng.random((d, n)) * spread - spread / 3
        f[:, :3] = 0                       # residual ties
        f[:, 5] = f[:, 6]                  # repeated point
        f[:, 7] = np.round(f[:, 7])        # integer features
        out.append(f.astype(np.float32))
    return out


@pytest.mark.parametrize('exact', [True, False])
@pytest.mark.parametrize('s', [1, 2])
@pytest.mark.parametrize('case', range(4))
def test_construction_matches_reference(case, s, exact, monkeypatch):
    feat = _point_sets()[case]
    if not exact:                       # force the hashed vertex codes
        monkeypatch.setattr(L, '_MAX_EXACT_BITS', 0)
    lat = L.build_lattice(feat, neighborhood_size=s)
    vertex, bary, table = reference_lattice(feat, s)
    M = table.shape[0]
    assert lat.num_vertices == M
    assert lat.num_taps == table.shape[1] == L.num_taps(feat.shape[0], s)
    np.testing.assert_array_equal(lat.weight_in, bary)          # float32-identical weights
    # our numbering differs (sorted codes): build the map reference -> ours
    mapping = np.full(M, -1)
    mapping[vertex.ravel()] = lat.vertex_in.ravel()
    assert np.all(mapping >= 0) and len(np.unique(mapping)) == M
    np.testing.assert_array_equal(mapping[vertex], lat.vertex_in)
    ours = lat.nbr
    expect = np.where(table >= 0, mapping[np.maximum(table, 0)], M)
    np.testing.assert_array_equal(ours[mapping], expect)
    # the inverse table undoes the forward one
    inv = lat.inv_nbr
    for f in range(lat.num_taps):
        ok = ours[:, f] < M
        np.testing.assert_array_equal(inv[ours[ok, f], f], np.arange(M)[ok])


def test_barycentric_weights_and_lattice_directions():
    rng = np.random.default_rng(0)
    feat = (rng.standard_normal((5, 600)) * 1.2).astype(np.float32)
    lat = L.build_lattice(feat)
    w = lat.weight_in
    assert np.all(w >= -1e-6)
    np.testing.assert_allclose(w.sum(axis=1), 1, atol=1e-6)
    assert np.all(np.sort(lat.vertex_in, axis=1)[:, 1:] != np.sort(lat.vertex_in, axis=1)[:, :-1])
    # Σ_k v_k = 0: tap 62 = (1,1,1,1,1,0) walks to v - v_5, so one more step along
    # direction 5 from there must return to v; likewise tap 32 is the neighbour +v_0
    M = lat.num_vertices
    nbr, imm = lat.nbr, lat.immediate
    ok = nbr[:, 62] < M
    assert ok.sum() > 50
    np.testing.assert_array_equal(imm[5][nbr[ok, 62]], np.arange(M)[ok])
    np.testing.assert_array_equal(nbr[:, 32], imm[0])


def test_tap_order():
    st = L.tap_steps(5, 1)
    assert st.shape == (63, 6)
    for f in range(63):
        assert int(''.join(map(str, st[f])), 2) == f
    assert tuple(st[1]) == (0, 0, 0, 0, 0, 1)
    assert tuple(st[32]) == (1, 0, 0, 0, 0, 0)
    assert tuple(st[62]) == (1, 1, 1, 1, 1, 0)
    st2 = L.tap_steps(5, 2)
    assert st2.shape == (665, 6) and L.num_taps(5, 2) == 665
    expect = [t for t in itertools.product(range(3), repeat=6) if 0 in t]
    assert [tuple(r) for r in st2] == expect
    assert L.num_taps(2, 2) == 19 and L.num_taps(3, 1) == 15 and L.num_taps(4, 0) == 1


def _closed_form_gauss(d, s):
    """g(tap) = Σ_{a ∈ {-1,0,1}^(d+1), a ≡ tap mod constants} 2^-#nonzero(a) / (1 + 2^-d)."""
    out = []
    for t in L.tap_steps(d, s):
        total = 0.0
        for c in range(-s - 1, 2):
            a = np.asarray(t) + c
            if np.all(np.abs(a) <= 1):
                total += 2.0 ** -np.count_nonzero(a)
        out.append(total / (1 + 2.0 ** -d))
    return np.array(out)


@pytest.mark.parametrize('d,s', [(2, 1), (3, 1), (5, 1), (5, 2), (2, 2), (1, 1)])
def test_gaussian_taps_closed_form(d, s):
    g = L.gaussian_taps(d, s)
    assert g.dtype == np.float32 and g[0] == 1
    np.testing.assert_allclose(g, _closed_form_gauss(d, s), rtol=1e-6)
    np.testing.assert_allclose(L.gaussian_taps(d, s, dtype=np.float64), _closed_form_gauss(d, s), rtol=1e-14)


def test_gaussian_taps_values():
    g = L.gaussian_taps(5, 1)
    m = L.tap_steps(5, 1).sum(axis=1)
    expect = {0: 1, 1: 17 / 33, 2: 10 / 33, 3: 8 / 33, 4: 10 / 33, 5: 17 / 33}
    np.testing.assert_allclose(g, [expect[k] for k in m], rtol=1e-6)
    np.testing.assert_allclose(L.gaussian_taps(2, 1)[1:], 0.6, rtol=1e-6)
    vals, counts = np.unique(np.round(L.gaussian_taps(5, 2), 6), return_counts=True)
    assert list(counts[::-1]) == [1, 12, 30, 50, 120, 210, 180, 62]
    assert L.gaussian_taps(3, 0).tolist() == [1.0]


def test_gaussian_taps_match_caffe_default_init(shared_dir):
    name = 'crfgrad_L3_N1_9x12_it5_k9_default_init'
    if name not in oracle_util.case_names():
        pytest.skip('case not present')
    w = oracle_util.split_keys(oracle_util.load_npz(name))['param']['crf'][2]
    g = L.gaussian_taps(5, 1)
    for c in range(w.shape[0]):
        np.testing.assert_allclose(w[c, c, 0] / np.float32(-0.1), g, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------------------------

def _lattice(d=3, n=70, n_out=None, s=1, seed=0, dtype=np.float64, spread=2.5):
    rng = np.random.default_rng(seed)
    fin = (rng.random((d, n)) * spread).astype(dtype)
    fout = None if n_out is None else (rng.random((d, n_out)) * spread).astype(dtype)
    return L.build_lattice(fin, fout, neighborhood_size=s), rng


@pytest.mark.parametrize('n_out', [None, 40])
def test_adjoint_identities(n_out):
    lat, rng = _lattice(n_out=n_out)
    M, F = lat.num_vertices, lat.num_taps
    x = rng.standard_normal((3, lat.n_in))
    z = rng.standard_normal((3, M))
    y = rng.standard_normal((4, M))
    o = rng.standard_normal((4, lat.n_out))
    w = rng.standard_normal((4, 3, F))
    np.testing.assert_allclose(np.sum(lat.splat(x) * z), np.sum(x * lat.splat_adjoint(z)), rtol=1e-12)
    np.testing.assert_allclose(np.sum(lat.blur(z, w) * y), np.sum(z * lat.blur_adjoint(y, w)), rtol=1e-12)
    np.testing.assert_allclose(np.sum(lat.slice(y) * o), np.sum(y * lat.slice_adjoint(o)), rtol=1e-12)
    for norm in ('symmetric', 'after', 'none'):
        bf = L.BilateralFilter(lat, norm)
        np.testing.assert_allclose(np.sum(bf.apply(x, w) * o), np.sum(x * bf.adjoint(o, w)), rtol=1e-12)


def test_blur_equals_table_reference():
    lat, rng = _lattice(d=5, n=120, s=1)
    M, F = lat.num_vertices, lat.num_taps
    z = rng.standard_normal((3, M))
    w = rng.standard_normal((2, 3, F))
    zp = np.concatenate([z, np.zeros((3, 1))], axis=1)
    ref = sum(w[:, :, f] @ zp[:, lat.nbr[:, f]] for f in range(F))
    np.testing.assert_allclose(lat.blur(z, w), ref, rtol=1e-12, atol=1e-12)
    # the gradient w.r.t. taps is <grad, Z[:, nbr]> per tap
    g = rng.standard_normal((2, M))
    tg = lat.blur_taps_grad(z, g)
    ref_tg = np.stack([g @ zp[:, lat.nbr[:, f]].T for f in range(F)], axis=-1)
    np.testing.assert_allclose(tg, ref_tg, rtol=1e-12, atol=1e-12)


def test_groups_equal_separate_blurs():
    lat, rng = _lattice(d=2, n=50)
    M, F = lat.num_vertices, lat.num_taps
    z = rng.standard_normal((6, M))
    w = rng.standard_normal((4, 3, F))
    out = lat.blur(z, w, group=2)
    np.testing.assert_allclose(out[:2], lat.blur(z[:3], w[:2]), rtol=1e-12)
    np.testing.assert_allclose(out[2:], lat.blur(z[3:], w[2:]), rtol=1e-12)
    g = rng.standard_normal((4, M))
    tg = lat.blur_taps_grad(z, g, group=2)
    np.testing.assert_allclose(tg[:2], lat.blur_taps_grad(z[:3], g[:2]), rtol=1e-12)
    np.testing.assert_allclose(tg[2:], lat.blur_taps_grad(z[3:], g[2:]), rtol=1e-12)
    adj = lat.blur_adjoint(g, w, group=2)
    np.testing.assert_allclose(adj[:3], lat.blur_adjoint(g[:2], w[:2]), rtol=1e-12)
    # O not a multiple of the group: the extra output rows are zero
    out3 = lat.blur(z, rng.standard_normal((3, 3, F)), group=2)
    assert np.all(out3[2] == 0)


def test_finite_differences_values_and_taps():
    lat, rng = _lattice(d=3, n=40, n_out=25)
    F = lat.num_taps
    bf = L.BilateralFilter(lat, 'symmetric')
    x = rng.standard_normal((2, lat.n_in))
    w = rng.standard_normal((3, 2, F))
    r = rng.standard_normal((3, lat.n_out))

    def loss(x_, w_):
        return float(np.sum(bf.apply(x_, w_) * r))
    gx = bf.adjoint(r, w)
    gw = bf.taps_grad(x, r)
    eps = 1e-6
    for idx in [(0, 0), (1, 7), (0, 39), (1, 20)]:
        xp_, xm = x.copy(), x.copy()
        xp_[idx] += eps
        xm[idx] -= eps
        np.testing.assert_allclose((loss(xp_, w) - loss(xm, w)) / (2 * eps), gx[idx], rtol=1e-6, atol=1e-9)
    for idx in [(0, 0, 0), (2, 1, F - 1), (1, 0, 5), (2, 0, 3)]:
        wp, wm = w.copy(), w.copy()
        wp[idx] += eps
        wm[idx] -= eps
        np.testing.assert_allclose((loss(x, wp) - loss(x, wm)) / (2 * eps), gw[idx], rtol=1e-6, atol=1e-9)


def test_learned_path_equals_gaussian_path():
    lat, rng = _lattice(d=5, n=150, n_out=60, dtype=np.float32, spread=3.0)
    g = L.gaussian_taps(5, 1)
    x = rng.standard_normal((4, lat.n_in)).astype(np.float32)
    for norm in ('symmetric', 'after', 'none'):
        bf = L.BilateralFilter(lat, norm)
        taps = np.eye(4, dtype=np.float32)[:, :, None] * g
        np.testing.assert_allclose(bf.apply(x, taps), bf.gaussian(x), rtol=2e-5, atol=2e-6)
    # AFTER normalisation makes the Gaussian filter of ones exactly one at every output point
    bf = L.BilateralFilter(lat, 'after')
    np.testing.assert_allclose(bf.apply(np.ones((1, lat.n_in), np.float32), g[None, None]), 1, rtol=2e-6)
    assert bf.norm_there is None and bf.norm_back.shape == (lat.n_out,)


def test_same_points_twice_equals_one_lattice():
    rng = np.random.default_rng(5)
    f = (rng.random((5, 90)) * 3).astype(np.float32)
    a = L.build_lattice(f)
    b = L.build_lattice(f, f.copy())
    assert a.num_vertices == b.num_vertices and b.n_out == 90
    x = rng.standard_normal((3, 90)).astype(np.float32)
    w = rng.standard_normal((2, 3, 63)).astype(np.float32)
    for norm in ('symmetric', 'after'):
        np.testing.assert_allclose(L.BilateralFilter(a, norm).apply(x, w), L.BilateralFilter(b, norm).apply(x, w),
                                   rtol=1e-5, atol=1e-6)


def test_missing_neighbours_read_zero():
    # two far-apart clusters: taps never reach the other cluster, so filtering one
    # cluster's values gives exactly zero at the other
    rng = np.random.default_rng(2)
    f = np.concatenate([rng.random((2, 20)), rng.random((2, 20)) + 50], axis=1)
    lat = L.build_lattice(f)
    x = np.concatenate([rng.standard_normal((1, 20)), np.zeros((1, 20))], axis=1)
    w = rng.standard_normal((1, 1, lat.num_taps))
    y = L.BilateralFilter(lat, 'none').apply(x, w)
    assert np.all(y[:, 20:] == 0) and np.any(y[:, :20] != 0)


def test_zero_neighbourhood_is_splat_slice():
    lat, rng = _lattice(d=2, n=30, s=0)
    assert lat.num_taps == 1
    x = rng.standard_normal((2, 30))
    np.testing.assert_allclose(lat.slice(lat.blur(lat.splat(x), np.eye(2)[:, :, None])),
                               lat.slice(lat.splat(x)), rtol=1e-12)


@pytest.mark.parametrize('d,spread,max_err', [(2, 6.0, 0.15), (3, 6.0, 0.22), (5, 4.0, 0.45)])
def test_dense_gaussian_brute_force(d, spread, max_err):
    """The lattice filter approximates the kernel exp(-|f_i - f_j|^2 / 2) (unit std in the
    feature units, Adams et al.'s scaling): fitting a Gaussian kernel's width to the lattice
    output over a grid of σ must give σ ≈ 1, with the (known, d-dependent) approximation
    error of the one-ring blur on white noise (~10% for d=2, ~35% for d=5)."""
    rng = np.random.default_rng(d)
    n = 300
    f = rng.random((d, n)) * spread
    v = rng.standard_normal((2, n))
    lat = L.build_lattice(f)
    out = L.BilateralFilter(lat, 'none').gaussian(v)
    d2 = ((f[:, :, None] - f[:, None, :]) ** 2).sum(axis=0)
    best = None
    for sigma in np.arange(0.5, 2.01, 0.05):
        ref = v @ np.exp(-d2 / (2 * sigma ** 2)).T
        scale = np.sum(out * ref) / np.sum(ref * ref)
        err = np.linalg.norm(out / scale - ref) / np.linalg.norm(ref)
        if best is None or err < best[0]:
            best = (err, sigma)
    assert 0.8 <= best[1] <= 1.1, best
    assert best[0] < max_err, best
    # normalised filtering (AFTER) against the normalised dense filter with σ = 1
    k = np.exp(-d2 / 2)
    ref = (v @ k.T) / k.sum(axis=1)
    out_n = L.BilateralFilter(lat, 'after').gaussian(v)
    assert np.corrcoef(out_n.ravel(), ref.ravel())[0, 1] > 0.85


def test_float32_default_and_shapes():
    lat, rng = _lattice(dtype=np.float32, n=50, n_out=20)
    assert lat.dtype == np.float32 and lat.weight_in.dtype == np.float32
    x = rng.standard_normal((3, 50)).astype(np.float32)
    w = rng.standard_normal((5, 3, lat.num_taps)).astype(np.float32)
    bf = L.BilateralFilter(lat)
    y = bf.apply(x, w)
    assert y.shape == (5, 20) and y.dtype == np.float32
    assert bf.adjoint(y, w).shape == (3, 50)
    assert bf.taps_grad(x, y).shape == (5, 3, lat.num_taps)
    assert lat.splat(x).shape == (3, lat.num_vertices)
    with pytest.raises(ValueError):
        lat.splat(x[:, :10])
    with pytest.raises(ValueError):
        bf.apply(x, w[:, :, :3])
    with pytest.raises(ValueError):
        L.BilateralFilter(lat, 'bogus')


@pytest.mark.skipif(not backend.cupy_available(), reason='needs CuPy and a GPU')
def test_cupy_matches_numpy():
    import cupy as cp
    lat, rng = _lattice(d=5, n=300, n_out=120, dtype=np.float32, spread=3.0)
    f_in = (rng.random((5, 300)) * 3).astype(np.float32)
    f_out = (rng.random((5, 120)) * 3).astype(np.float32)
    x = rng.standard_normal((4, 300)).astype(np.float32)
    w = rng.standard_normal((3, 4, 63)).astype(np.float32)
    g = rng.standard_normal((3, 120)).astype(np.float32)
    cpu = L.BilateralFilter(L.build_lattice(f_in, f_out))
    gpu = L.BilateralFilter(L.build_lattice(cp.asarray(f_in), cp.asarray(f_out)))
    assert cpu.lattice.num_vertices == gpu.lattice.num_vertices
    np.testing.assert_array_equal(cpu.lattice.weight_in, gpu.lattice.weight_in.get())
    np.testing.assert_allclose(gpu.apply(cp.asarray(x), cp.asarray(w)).get(), cpu.apply(x, w), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gpu.adjoint(cp.asarray(g), cp.asarray(w)).get(), cpu.adjoint(g, w),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gpu.taps_grad(cp.asarray(x), cp.asarray(g)).get(), cpu.taps_grad(x, g),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gpu.gaussian(cp.asarray(x)).get(), cpu.gaussian(x), rtol=1e-4, atol=1e-5)
