"""Permutohedral lattice filtering with learnable taps (bilateralNN / caffe-crfgd semantics).

Pure functions and classes over an array module (NumPy or CuPy, taken from the
inputs); nothing here knows about Caffe blobs or layers.

Points are columns: features ``(d, n)``, values ``(C, n)`` (point index = y·W + x
for an image).  One :class:`Lattice` is built per image from its input points
(splatted) and output points (sliced); both live in one lattice.

Construction (Adams et al. 2010, as Caffe computes it, float32 where Caffe uses float):

* elevation ``e = E p`` into d+1 coordinates with the per-feature scale
  ``σ_i = sqrt(2/3)(d+1) / sqrt((i+1)(i+2))``;
* the nearest remainder-0 point (rounding half away from zero), the rank of each
  residual coordinate, the enclosing simplex, and barycentric weights ``b_r``;
* the d+1 simplex vertices of every point; vertices are deduplicated with one
  sort of linear integer codes of their keys (no loop over points);
* the immediate neighbours ``v + v_k`` (``v_k = (d+1)e_k - 1``) of every vertex
  and, from them, the tap table ``nbr[v, f]`` of Caffe's approximate walk:
  tap ``f = (i_0 … i_d)`` is reached by i_0 steps along direction 0, then i_1
  along direction 1, …, through EXISTING vertices only; a walk that leaves the
  lattice gives the missing vertex (index M, which holds 0).

Vertex keys are exact integers (Caffe stores them as int16 and would wrap for
lattice coordinates beyond ±32767, i.e. features of several thousand units).

Operators (Z, Y: lattice values, one row per channel)::

    splat   Z[c, v] = Σ_{k: v ∈ simplex(k)} b_{k,v} x[c, k]          (input points)
    blur    Y[o, v] = Σ_{c, f} W[o, c, f] Z[c, nbr[v, f]]             (missing -> 0)
    slice   y[o, k] = Σ_r b_{k,r} Y[o, vertex(k, r)]                  (output points)

Internally lattice values are stored vertex-major (M, C); the public methods take
and return channel-first arrays (transposed views where possible).  Splat/slice
are sparse matrices (scipy.sparse / cupyx.scipy.sparse) built once.  For every tap
f the lattice keeps the pairs (v, u = nbr_f(v)) whose walk stays on the lattice
(about a fifth of the M·F table for natural images, d = 5); the blur is the tap-0
product plus, per tap, a gather of the u rows, one small matrix product and an add
into the v rows.  Every tap map v -> nbr_f(v) is injective (it adds a fixed
offset), so the adjoint is the same loop with u and v swapped, and the tap
gradient is one product per tap.  The Gaussian-tap blur is also available as one
sparse (M, M) matrix (:meth:`Lattice.gaussian_blur_matrix`).

On the CPU with numba installed (and CRFGRAD_NO_NUMBA unset) the same operators run as compiled
kernels (:mod:`._cpu_kernels`, chosen by :mod:`.accel`): a hash table instead of the sort, the
taps kept per block of vertices and per tap (one BLAS product per block and tap), a point-order
splat and a parallel slice; the vertex numbering then differs (order of first appearance), the
results do not (up to float rounding in the sums).

On CuPy (unless CRFGRAD_NO_RAWKERNEL is set) the construction is the vectorised one up to the
immediate neighbours; then the tap table ``nbr`` (M, F) is made by one kernel walking every
vertex, and splat, blur (and its adjoint, through the inverse table), slice and the Gaussian blur
are CUDA kernels (:mod:`.cuda_kernels`), one thread per output value or per vertex; the tap
gradient is summed by a kernel per chunk of vertices (the chunks are added up in a fixed order).
"""
import functools
import itertools

import numpy as np

from .. import backend
from . import accel, cuda_kernels

__all__ = ['num_taps', 'tap_steps', 'gaussian_taps', 'Lattice', 'build_lattice', 'BilateralFilter']


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------

def _sparse(xp):
    """scipy.sparse for NumPy arrays, cupyx.scipy.sparse for CuPy arrays."""
    if xp is np:
        import scipy.sparse as sp
    else:  # pragma: no cover - needs a GPU
        import cupyx.scipy.sparse as sp
    return sp


# vertex codes up to this many bits are exact mixed-radix numbers, larger ones hashed
_MAX_EXACT_BITS = 62

# vertices per block of the compiled path's tap structure (per block and tap one BLAS product)
_VERTEX_BLOCK = 512

# the CUDA tap gradient sums chunks of at least this many vertices, at most this many chunks
_TAPS_GRAD_MIN_CHUNK = 256
_TAPS_GRAD_MAX_CHUNKS = 256


def _is_numpy(xp):
    return xp is np


def num_taps(d, neighborhood_size):
    """F = (s+1)^(d+1) - s^(d+1): number of filter taps (d=5, s=1 -> 63)."""
    d, s = int(d), int(neighborhood_size)
    return (s + 1) ** (d + 1) - s ** (d + 1)


@functools.lru_cache(maxsize=None)
def _tap_steps_cached(d, s):
    steps = [t for t in itertools.product(range(s + 1), repeat=d + 1) if min(t) == 0]
    out = np.array(steps, dtype=np.int64).reshape(-1, d + 1)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def _tap_parents(d, s):
    """(parent, direction), both (F,) int64: the walk of tap f >= 1 is the walk of tap parent[f]
    (< f) followed by one step along lattice direction direction[f] (its last direction with a
    step); tap 0 (no step) has parent 0."""
    steps = _tap_steps_cached(d, s)
    index = {tuple(r): i for i, r in enumerate(steps.tolist())}
    parent = np.zeros(steps.shape[0], dtype=np.int64)
    direction = np.zeros(steps.shape[0], dtype=np.int64)
    for f in range(1, steps.shape[0]):
        st = steps[f].copy()
        k = int(np.nonzero(st)[0][-1])
        st[k] -= 1
        parent[f] = index[tuple(st.tolist())]
        direction[f] = k
    parent.setflags(write=False)
    direction.setflags(write=False)
    return parent, direction


def tap_steps(d, neighborhood_size):
    """(F, d+1) int array: tap f walks ``steps[f, k]`` times along lattice direction k.

    Caffe's order: lexicographic with direction 0 most significant, tuples with at
    least one 0 only (for s = 1 tap f is the binary number i_0 … i_d)."""
    return _tap_steps_cached(int(d), int(neighborhood_size))


@functools.lru_cache(maxsize=None)
def _gaussian_taps_np(d, s, dtype_name):
    dtype = np.dtype(dtype_name).type
    steps = tap_steps(d, s)
    F = steps.shape[0]
    # exact (d+1)-coordinate keys of the tap offsets Σ_k i_k v_k, v_k = (d+1) e_k - 1
    keys = (d + 1) * steps - steps.sum(axis=1, keepdims=True)
    index = {tuple(k): i for i, k in enumerate(keys.tolist())}
    lattice = np.zeros(F + 1, dtype=dtype)        # slot F = outside the support (0)
    lattice[0] = 1                                # unit impulse at the centre (tap 0)
    half = dtype(0.5)
    for k in range(d + 1):
        step = -np.ones(d + 1, dtype=np.int64)
        step[k] += d + 1
        up = np.array([index.get(tuple(r), F) for r in (keys + step).tolist()])
        down = np.array([index.get(tuple(r), F) for r in (keys - step).tolist()])
        new = np.empty_like(lattice)
        new[:F] = lattice[:F] * dtype(1) + (lattice[up] + lattice[down]) * half
        new[F] = 0
        lattice = new
    out = (lattice[:F] / lattice[0]).astype(dtype)
    out.setflags(write=False)
    return out


def gaussian_taps(d, neighborhood_size, xp=np, dtype=np.float32):
    """(F,) Caffe's Gaussian filter on the size-s neighbourhood, normalised so that tap 0 is 1.

    A unit impulse on the (exact) neighbourhood lattice is blurred with [0.5, 1, 0.5]
    along each lattice direction 0..d in turn (points outside the neighbourhood are
    0), then divided by the centre value.  s=1, d=5: by number m of unit steps
    1, 17/33, 10/33, 8/33, 10/33, 17/33."""
    g = _gaussian_taps_np(int(d), int(neighborhood_size), np.dtype(dtype).name)
    return xp.asarray(g.copy())


def _round_half_away(xp, x):
    """Round half away from zero (C's round) of a float32 array, as int64."""
    x = x.astype(np.float64)
    return xp.trunc(x + xp.copysign(0.5, x)).astype(np.int64)


# --------------------------------------------------------------------------------------
# lattice construction
# --------------------------------------------------------------------------------------

def _feature_scales(d, dtype):
    """(d,) Caffe's per-feature elevation scales σ_i = sqrt(2/3)(d+1) / sqrt((i+1)(i+2)), rounded
    through float32 as Caffe computes them, in ``dtype``."""
    f32 = np.float32
    inv_std_dev = f32(np.sqrt(2.0 / 3.0) * (d + 1))
    return np.array([dtype(f32(1.0 / np.sqrt((i + 2) * (i + 1)) * np.float64(inv_std_dev))) for i in range(d)],
                    dtype=dtype)


def _elevate_and_simplex(features, xp):
    """Caffe's elevation, rounding, ranking and barycentric weights.

    features (d, n) float32/float64.  Returns rem0 (d+1, n) int64, rank (d+1, n) int64
    and bary (d+1, n) in the features' dtype (b_r for the r-th simplex vertex)."""
    d, n = features.shape
    dtype = features.dtype.type
    f32 = np.float32
    scale = [dtype(x) for x in _feature_scales(d, dtype)]

    # elevated[j] = sm - j * cf (j = d..1), sm accumulates cf; elevated[0] = sm
    elevated = xp.empty((d + 1, n), dtype=dtype)
    sm = xp.zeros(n, dtype=dtype)
    for j in range(d, 0, -1):
        cf = features[j - 1] * scale[j - 1]
        elevated[j] = sm - dtype(j) * cf
        sm = sm + cf
    elevated[0] = sm

    down_factor = f32(1.0) / f32(d + 1)
    elev32 = elevated.astype(f32, copy=False)
    rd = _round_half_away(xp, down_factor * elev32)           # (d+1, n)
    rem0 = rd * (d + 1)
    total = rd.sum(axis=0)

    # rank: pairwise comparison of the residuals in float32 (ties -> higher index ranks higher)
    resid = elev32 - rem0.astype(f32)
    rank = xp.zeros((d + 1, n), dtype=np.int64)
    for i in range(d):
        for j in range(i + 1, d + 1):
            less = resid[i] < resid[j]
            rank[i] += less
            rank[j] += ~less
    rank += total[None, :]
    low = rank < 0
    high = rank > d
    rank += (d + 1) * low.astype(np.int64) - (d + 1) * high.astype(np.int64)
    rem0 += (d + 1) * low.astype(np.int64) - (d + 1) * high.astype(np.int64)

    # barycentric weights; rank is a permutation of 0..d per point, so every slot
    # receives exactly one +v and one -v (order-independent in floating point)
    v = (elevated - rem0.astype(dtype)) * dtype(down_factor)  # (d+1, n)
    plus = xp.zeros((d + 2) * n, dtype=dtype)
    minus = xp.zeros((d + 2) * n, dtype=dtype)
    cols = xp.arange(n, dtype=np.int64)[None, :]
    plus[((d - rank) * n + cols).ravel()] = v.ravel()
    minus[((d - rank + 1) * n + cols).ravel()] = v.ravel()
    bary = (plus - minus).reshape(d + 2, n)
    b0 = bary[0].astype(np.float64) + (1.0 + bary[d + 1].astype(np.float64))
    bary = bary[:d + 1]
    bary[0] = b0.astype(dtype)
    return rem0, rank, bary


def _vertex_codes(rem0, rank, d, xp):
    """Integer codes of the d+1 simplex vertices of every point.

    Vertex r of a point has key_i = rem0_i + r - (d+1)[rank_i > d - r] (i < d).
    The code is linear in the key, ``Σ_i a_i (key_i - base_i)``: exact mixed radix
    when the key box (widened for neighbour steps) fits in _MAX_EXACT_BITS bits, else
    a wrapping 64-bit hash with fixed random odd multipliers (the caller verifies it
    against the full keys).  Returns codes (d+1, n) int64, the multipliers a (d,)
    int64, the number of code bits (None for the hash) and a function computing the
    full keys (d+1, d, n)."""
    n = rem0.shape[1]
    lo = xp.min(rem0[:d], axis=1) if n else xp.zeros(d, np.int64)
    hi = xp.max(rem0[:d], axis=1) if n else xp.zeros(d, np.int64)
    lo = [int(x) for x in backend.to_numpy(lo)]
    hi = [int(x) for x in backend.to_numpy(hi)]
    # keys lie in [rem0 - d, rem0 + d]; neighbour steps add at most d or subtract 1
    base = [l - 2 * d - 2 for l in lo]
    width = [h - l + 4 * d + 5 for h, l in zip(hi, lo)]
    total_bits = sum(int(w).bit_length() for w in width)
    exact = total_bits <= _MAX_EXACT_BITS
    if exact:
        mult, acc = [], 1
        for w in width:
            mult.append(acc)
            acc *= w
    else:
        g = np.random.default_rng(0x5EED + d)
        mult = [int(m) | 1 for m in g.integers(1, 2 ** 62, size=d)]
    a = np.array(mult, dtype=np.int64)
    sum_a = int(np.sum(a, dtype=np.int64)) if d else 0

    with np.errstate(over='ignore'):
        c0 = xp.zeros(n, dtype=np.int64)
        for i in range(d):
            c0 += (rem0[i] - base[i]) * np.int64(a[i])
        # stride of the coordinate that has rank q (coordinate d has none)
        by_rank = xp.zeros((d + 1) * n, dtype=np.int64)
        cols = xp.arange(n, dtype=np.int64)
        for i in range(d):
            by_rank[rank[i] * n + cols] = np.int64(a[i])
        by_rank = by_rank.reshape(d + 1, n)
        codes = xp.empty((d + 1, n), dtype=np.int64)
        codes[0] = c0
        for r in range(1, d + 1):
            # key_r = key_{r-1} + 1 on all coordinates, - (d+1) on the one with rank d-r+1
            codes[r] = codes[r - 1] + np.int64(sum_a) - np.int64(d + 1) * by_rank[d - r + 1]

    def keys():
        kk = xp.empty((d + 1, d, n), dtype=np.int64)
        for r in range(d + 1):
            kk[r] = rem0[:d] + r - (d + 1) * (rank[:d] > d - r)
        return kk
    return codes, a, (total_bits if exact else None), keys


def _unique_inverse(xp, codes, code_bits=None):
    """Sorted unique codes and, for every input code, its index in them.

    With non-negative codes of at most ``code_bits`` bits the positions are packed
    into the low bits, so one plain sort replaces the (slower) argsort."""
    n = int(codes.shape[0])
    pos_bits = max(1, (n - 1).bit_length())
    if code_bits is not None and code_bits + pos_bits <= 62:
        packed = xp.sort((codes << np.int64(pos_bits)) | xp.arange(n, dtype=np.int64))
        order = packed & np.int64((1 << pos_bits) - 1)
        sc = packed >> np.int64(pos_bits)
    else:
        order = xp.argsort(codes)
        sc = codes[order]
    if sc.size == 0:
        return sc, xp.zeros(0, dtype=np.int64), order, sc
    new = xp.empty(sc.shape, dtype=bool)
    new[0] = True
    xp.not_equal(sc[1:], sc[:-1], out=new[1:])
    gid = xp.cumsum(new) - 1
    inverse = xp.empty_like(gid)
    inverse[order] = gid
    return sc[new], inverse, order, new


class Lattice:
    """Permutohedral lattice of the points ``in_features`` (d, n_in) and ``out_features``
    (d, n_out); built once, reused for every filtering, normalisation and backward.

    Attributes: d, n_in, n_out, num_vertices (M), neighborhood_size, num_taps (F),
    dtype, xp, same_points (True when input and output points are the same).
    Internals: ``vertex_in`` (n_in, d+1) vertex indices and ``weight_in`` (n_in, d+1)
    barycentric weights (likewise ``*_out``); ``taps_v[f]``, ``taps_u[f]`` (f >= 1): the
    vertices v whose tap f exists and the vertex u = nbr_f(v) it reads (both increasing);
    ``immediate`` (d+1, M) one-step neighbours v + v_k (M = missing); ``nbr`` / ``inv_nbr``
    (M, F) tap tables made on demand; sparse splat/slice matrices."""

    def __init__(self, in_features, out_features=None, neighborhood_size=1, visualize=False):
        xp = backend.get_array_module(in_features)
        if in_features.ndim != 2:
            raise ValueError('in_features must be (d, n_in), got shape %s' % (in_features.shape,))
        if in_features.dtype not in (np.float32, np.float64):
            in_features = in_features.astype(np.float32)
        same = out_features is None or out_features is in_features
        if not same:
            if out_features.ndim != 2 or out_features.shape[0] != in_features.shape[0]:
                raise ValueError('out_features must be (d, n_out) with d = %d, got shape %s'
                                 % (in_features.shape[0], out_features.shape))
            out_features = out_features.astype(in_features.dtype, copy=False)
        s = int(neighborhood_size)
        if s < 0:
            raise ValueError('neighborhood_size must be >= 0, got %d' % s)
        d, n_in = in_features.shape
        if d < 1:
            raise ValueError('the features need at least one channel (d >= 1)')
        if not bool(xp.all(xp.isfinite(in_features))) or \
                (not same and not bool(xp.all(xp.isfinite(out_features)))):
            raise ValueError('the features contain NaN or infinite values')
        n_out = n_in if same else out_features.shape[1]
        self.xp = xp
        self.d = int(d)
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        self.neighborhood_size = s
        self.num_taps = num_taps(d, s)
        self.dtype = in_features.dtype.type
        self.same_points = same

        feats = in_features if same else xp.concatenate([in_features, out_features], axis=1)
        feats = xp.ascontiguousarray(feats)
        self._nbr = None
        self._inv = None
        self._gauss_blur = None
        self._taps_v = self._taps_u = None
        self._sp = _sparse(xp)
        self._gpu = cuda_kernels.kernels(xp)
        self._kern = accel.kernels(xp) if self._gpu is None else None
        self._splat_csr = {}
        if self._kern is not None:
            self._build_compiled(feats, visualize)
        else:
            self._build_vectorised(feats, visualize)

    def _build_vectorised(self, feats, visualize):
        """Construction with sorts and gathers over all points (NumPy or CuPy)."""
        xp, d, s, n_in, same = self.xp, self.d, self.neighborhood_size, self.n_in, self.same_points
        n = feats.shape[1]
        if self._gpu is not None:
            rem0, rank, bary = self._gpu_points(feats)
        else:
            rem0, rank, bary = _elevate_and_simplex(feats, xp)
        if visualize:
            bary = xp.ones_like(bary)

        codes, mult, code_bits, keys_fn = _vertex_codes(rem0, rank, d, xp)
        exact = code_bits is not None
        # point-major order (point k, vertex r) like Caffe's offset_ array
        codes_pm = codes.T.ravel()
        uniq, inverse, order, new = _unique_inverse(xp, codes_pm, code_bits)
        M = int(uniq.shape[0])
        if not exact:
            keys_pm = keys_fn().transpose(2, 0, 1).reshape(n * (d + 1), d)
            first = order[new]
            ukeys = keys_pm[first]
            if not bool(xp.all(keys_pm == ukeys[inverse])):
                raise RuntimeError('permutohedral lattice: hash collision of vertex keys '
                                   '(features too large or too many dimensions)')
        else:
            ukeys = None
        self.num_vertices = M
        vertex = inverse.reshape(n, d + 1).astype(np.int32)
        weight = xp.ascontiguousarray(bary.T)
        self.vertex_in = vertex[:n_in]
        self.weight_in = weight[:n_in]
        if same:
            self.vertex_out, self.weight_out = self.vertex_in, self.weight_in
        else:
            self.vertex_out = vertex[n_in:]
            self.weight_out = weight[n_in:]

        # immediate neighbours v + v_k (k = 0..d), -1 -> M (missing)
        sum_a = np.int64(np.sum(mult, dtype=np.int64))
        imm = xp.empty((d + 1, M + 1), dtype=np.int64)
        with np.errstate(over='ignore'):
            for k in range(d + 1):
                delta = -sum_a + (np.int64(d + 1) * mult[k] if k < d else np.int64(0))
                q = uniq + delta
                idx = xp.searchsorted(uniq, q)
                idx_c = xp.minimum(idx, max(M - 1, 0))
                found = (idx < M) & (uniq[idx_c] == q) if M else idx < 0
                if found.size and ukeys is not None:
                    step = -np.ones(d, dtype=np.int64)
                    if k < d:
                        step[k] += d + 1
                    found &= xp.all(ukeys[idx_c] == ukeys + xp.asarray(step)[None, :], axis=1)
                imm[k, :M] = xp.where(found, idx_c, M)
                imm[k, M] = M
        self.immediate = imm[:, :M]

        if self._gpu is not None:
            self._nbr = self._gpu_tap_table(imm)
        else:
            self._walk_taps(imm)

        self._P_in = self._point_matrix(self.vertex_in, self.weight_in)
        self._S_in = self._transpose(self._P_in)
        if same:
            self._P_out, self._S_out = self._P_in, self._S_in
        else:
            self._P_out = self._point_matrix(self.vertex_out, self.weight_out)
            self._S_out = self._transpose(self._P_out)

    def _walk_taps(self, imm):
        """taps_v / taps_u of the array code from the immediate neighbours imm (d+1, M+1)."""
        xp, d, s, M = self.xp, self.d, self.neighborhood_size, self.num_vertices
        # taps by Caffe's walk (depth first, direction 0 outermost).  For every tap
        # f >= 1 keep the pairs (v, u = nbr_f(v)) whose walk stays on the lattice; a
        # walk that leaves it never comes back, so the pairs are compacted as we go.
        index_type = np.intp if _is_numpy(xp) else np.int32
        imm_t = imm.astype(index_type, copy=False)
        taps_v, taps_u = [], []

        def walk(k, start_idx, cur, has_zero):
            if k > d:
                taps_v.append(start_idx)
                taps_u.append(cur)
                return
            end = s + 1 if (k < d or has_zero) else 1
            for i in range(end):
                walk(k + 1, start_idx, cur, has_zero or i == 0)
                if i + 1 < end:
                    nxt = imm_t[k][cur]
                    keep = xp.nonzero(nxt < M)[0]
                    start_idx = start_idx[keep]
                    cur = nxt[keep]

        ident = xp.arange(M, dtype=index_type)
        walk(0, ident, ident, False)
        assert len(taps_v) == self.num_taps
        taps_v[0] = taps_u[0] = None         # tap 0 is the vertex itself
        self._taps_v = taps_v
        self._taps_u = taps_u

    def _gpu_points(self, feats):
        """CUDA path of :func:`_elevate_and_simplex`: one thread per point, the same arithmetic."""
        xp, d = self.xp, self.d
        n = feats.shape[1]
        dtype = feats.dtype.type
        scale = _feature_scales(d, dtype)
        rem0 = xp.empty((d + 1, n), dtype=np.int64)
        rank = xp.empty((d + 1, n), dtype=np.int64)
        bary = xp.empty((d + 1, n), dtype=dtype)
        self._gpu.launch('lattice_points', n, (xp.ascontiguousarray(feats), xp.asarray(scale), rem0, rank, bary,
                                               d, n), dtype, DMAX=d, FMAD=0)
        return rem0, rank, bary

    def _gpu_tap_table(self, imm):
        """The tap table nbr (M, F) int32 by one kernel walking every vertex (CUDA path)."""
        xp, M, F = self.xp, self.num_vertices, self.num_taps
        parent, direction = _tap_parents(self.d, self.neighborhood_size)
        nbr = xp.empty((M, F), dtype=np.int32)
        self._gpu.launch('lattice_tap_table', M,
                         (xp.ascontiguousarray(imm.astype(np.int32)), xp.asarray(parent.astype(np.int32)),
                          xp.asarray(direction.astype(np.int32)), nbr, M, F), self.dtype)
        return nbr

    def _build_compiled(self, feats, visualize):
        """Construction with the compiled kernels (CPU): per-point simplex, a hash table of the
        vertex keys (vertices numbered in order of first appearance, as Caffe), the immediate
        neighbours by hash look-ups and the tap walk of every vertex as a CSR."""
        K = self._kern
        d, s, n_in = self.d, self.neighborhood_size, self.n_in
        n = feats.shape[1]
        dtype = feats.dtype.type
        f32 = np.float32
        scale = _feature_scales(d, dtype)
        jvals = np.arange(d + 1).astype(dtype)
        down32 = f32(1.0) / f32(d + 1)
        rem0 = np.empty((n, d + 1), np.int64)
        rank = np.empty((n, d + 1), np.int64)
        weight = np.empty((n, d + 1), dtype)
        K.lattice_points(feats, scale, jvals, down32, dtype(down32), dtype(0), rem0, rank, weight)
        if visualize:
            weight[...] = 1
        cap_bits = max(4, int(4 * max(n, 1) - 1).bit_length())            # grows when half full
        vertex, keys, table, M = K.hash_vertices(rem0, rank, cap_bits)
        del rem0, rank
        M = int(M)
        self.num_vertices = M
        self.vertex_in = vertex[:n_in]
        self.weight_in = weight[:n_in]
        if self.same_points:
            self.vertex_out, self.weight_out = self.vertex_in, self.weight_in
        else:
            self.vertex_out = vertex[n_in:]
            self.weight_out = weight[n_in:]
        self._imm = K.immediate_neighbours(keys, table, M)        # (M+1, d+1), row M = M
        del table, keys
        self.immediate = self._imm[:M].T
        self._bt = self._bt_inv = None

    @property
    def taps_v(self):
        """[None] + for every tap f >= 1 the vertices v whose tap f exists (increasing)."""
        if self._taps_v is None:
            self._taps_from_table() if self._gpu is not None else self._taps_from_csr()
        return self._taps_v

    @property
    def taps_u(self):
        """[None] + for every tap f >= 1 the vertices nbr_f(v) read by them."""
        if self._taps_u is None:
            self._taps_from_table() if self._gpu is not None else self._taps_from_csr()
        return self._taps_u

    def _blocks(self):
        """Tap structure of the compiled path (built on first use): per block of _VERTEX_BLOCK
        vertices v and per tap f the pairs (v, nbr_f(v)) whose walk stays on the lattice, as
        (bptr (nblk·F + 1,), row (nnz,) = v, col (nnz,) = nbr_f(v))."""
        if self._bt is None:
            parent, direction = _tap_parents(self.d, self.neighborhood_size)
            self._bt = self._kern.tap_blocks(self._imm, parent, direction, self.num_vertices, _VERTEX_BLOCK)
        return self._bt

    def _blocks_inv(self):
        """The same for the inverse maps: per block of vertices u and tap f the pairs (u, v) with
        nbr_f(v) = u (for the adjoint of the blur)."""
        if self._bt_inv is None:
            self._bt_inv = self._kern.transpose_blocks(*self._blocks(), self.num_vertices, self.num_taps,
                                                       _VERTEX_BLOCK)
        return self._bt_inv

    def _taps_from_table(self):
        xp, M, nbr = self.xp, self.num_vertices, self.nbr
        v = [xp.nonzero(nbr[:, f] < M)[0] for f in range(1, self.num_taps)]
        self._taps_v = [None] + v
        self._taps_u = [None] + [nbr[vf, f + 1] for f, vf in enumerate(v)]

    def _taps_from_csr(self):
        bptr, row, col = self._blocks()
        F = self.num_taps
        tap_of_range = np.tile(np.arange(F), (bptr.shape[0] - 1) // F)
        tap = np.repeat(tap_of_range, np.diff(bptr))
        order = np.argsort(tap, kind='stable')               # blocks, then v, stay increasing
        bounds = np.concatenate([[0], np.cumsum(np.bincount(tap, minlength=F))])
        v = row[order].astype(np.intp)
        u = col[order].astype(np.intp)
        self._taps_v = [None] + [v[bounds[f]:bounds[f + 1]] for f in range(1, F)]
        self._taps_u = [None] + [u[bounds[f]:bounds[f + 1]] for f in range(1, F)]

    # ---------------------------------------------------------------- internals
    def _point_matrix(self, vertex, weight):
        """CSR (n_points, M): row k holds the d+1 barycentric weights of point k."""
        xp = self.xp
        n, dp1 = vertex.shape
        indptr = xp.arange(0, n * dp1 + 1, dp1, dtype=np.int32)
        return self._sp.csr_matrix((xp.ascontiguousarray(weight).ravel(),
                                    xp.ascontiguousarray(vertex).ravel(), indptr),
                                   shape=(n, self.num_vertices))

    def _transpose(self, P):
        # scipy multiplies a CSC view directly; on the GPU convert to CSR once
        return P.T if _is_numpy(self.xp) else P.T.tocsr()

    @property
    def nbr(self):
        """(M, F) int32 tap table: nbr[v, f] = vertex read by tap f at v (M = missing)."""
        if self._nbr is None:
            xp = self.xp
            M, F = self.num_vertices, self.num_taps
            nbr = xp.full((M, F), M, dtype=np.int32)
            nbr[:, 0] = xp.arange(M, dtype=np.int32)
            for f in range(1, F):
                nbr[self.taps_v[f], f] = self.taps_u[f].astype(np.int32)
            self._nbr = nbr
        return self._nbr

    @property
    def inv_nbr(self):
        """(M, F) int32 inverse tap table: inv[u, f] = v with nbr[v, f] = u (M = none)."""
        if self._inv is None and self._gpu is not None:
            M, F = self.num_vertices, self.num_taps
            inv = self.xp.full((M, F), M, dtype=np.int32)
            self._gpu.launch('lattice_invert_taps', M * F, (self.nbr, inv, M, F), self.dtype)
            self._inv = inv
        if self._inv is None:
            xp = self.xp
            M, F = self.num_vertices, self.num_taps
            inv = xp.full((M, F), M, dtype=np.int32)
            inv[:, 0] = xp.arange(M, dtype=np.int32)
            for f in range(1, F):
                inv[self.taps_u[f], f] = self.taps_v[f].astype(np.int32)
            self._inv = inv
        return self._inv

    def _vm(self, a, rows):
        """Channel-first (C, rows) -> vertex/point-major contiguous (rows, C)."""
        if a.ndim != 2 or a.shape[1] != rows:
            raise ValueError('expected an array of shape (C, %d), got %s' % (rows, a.shape))
        return self.xp.ascontiguousarray(a.T)

    def _full_weights(self, taps, group, channels):
        """taps (O, C/group, F) -> (F, C, O) per-tap matrices (zero outside the groups)."""
        xp = self.xp
        O, Cg, F = taps.shape
        if F != self.num_taps:
            raise ValueError('taps have %d taps, the lattice needs %d' % (F, self.num_taps))
        if Cg * group != channels:
            raise ValueError('taps (%d input channels x %d groups) do not match %d channels'
                             % (Cg, group, channels))
        if group == 1:
            return xp.ascontiguousarray(taps.transpose(2, 1, 0))
        Og = O // group
        out = xp.zeros((F, channels, O), dtype=taps.dtype)
        for g in range(group):
            out[:, g * Cg:(g + 1) * Cg, g * Og:(g + 1) * Og] = \
                taps[g * Og:(g + 1) * Og].transpose(2, 1, 0)
        return out

    def _blurT(self, latT, taps, group=1):
        """(M, C) -> (M, O): Y[v] = Σ_f Z[nbr_f(v)] @ W_f with W_f = taps[:, :, f]^T."""
        w = self._full_weights(taps, group, latT.shape[1])
        dtype = np.result_type(latT.dtype, w.dtype)
        latT = latT.astype(dtype, copy=False)
        w = w.astype(dtype, copy=False)
        if self._gpu is not None:
            return self._gpu_blur(latT, w, self.nbr)
        if self._kern is not None:
            out = np.empty((self.num_vertices, w.shape[2]), dtype)
            self._kern.blur(*self._blocks(), np.ascontiguousarray(latT), np.ascontiguousarray(w), out,
                            _VERTEX_BLOCK)
            return out
        out = latT @ w[0]
        for f in range(1, self.num_taps):
            v = self.taps_v[f]
            if v.shape[0]:
                out[v] += self.xp.take(latT, self.taps_u[f], axis=0) @ w[f]
        return out

    def _blur_adjointT(self, gradT, taps, group=1):
        """(M, O) -> (M, C): transpose of :meth:`_blurT` (each tap map is injective)."""
        w = self._full_weights(taps, group, taps.shape[1] * group)
        dtype = np.result_type(gradT.dtype, w.dtype)
        gradT = gradT.astype(dtype, copy=False)
        wt = self.xp.ascontiguousarray(w.astype(dtype, copy=False).transpose(0, 2, 1))
        if self._gpu is not None:
            return self._gpu_blur(gradT, wt, self.inv_nbr)
        if self._kern is not None:
            out = np.empty((self.num_vertices, wt.shape[2]), dtype)
            self._kern.blur(*self._blocks_inv(), np.ascontiguousarray(gradT), wt, out, _VERTEX_BLOCK)
            return out
        out = gradT @ wt[0]
        for f in range(1, self.num_taps):
            u = self.taps_u[f]
            if u.shape[0]:
                out[u] += self.xp.take(gradT, self.taps_v[f], axis=0) @ wt[f]
        return out

    def _taps_gradT(self, latT, gradT, group=1):
        """dW[o, c, f] = Σ_v gradT[v, o] latT[nbr_f(v), c]; returns (O, C/group, F)."""
        xp = self.xp
        C, O, F = latT.shape[1], gradT.shape[1], self.num_taps
        dtype = np.result_type(latT.dtype, gradT.dtype)
        latT = latT.astype(dtype, copy=False)
        gradT = gradT.astype(dtype, copy=False)
        if self._gpu is not None:
            full = self._gpu_taps_grad(latT, gradT)
        elif self._kern is not None:
            full = self._kern.taps_grad(*self._blocks(), np.ascontiguousarray(latT),
                                        np.ascontiguousarray(gradT), F, _VERTEX_BLOCK)
        else:
            full = xp.zeros((F, C, O), dtype=dtype)
            full[0] = latT.T @ gradT
            for f in range(1, F):
                v = self.taps_v[f]
                if v.shape[0]:
                    xp.matmul(xp.take(latT, self.taps_u[f], axis=0).T, xp.take(gradT, v, axis=0),
                              out=full[f])
        if group == 1:
            return xp.ascontiguousarray(full.transpose(2, 1, 0))
        Cg, Og = C // group, O // group
        out = xp.zeros((O, Cg, F), dtype=dtype)
        for g in range(group):
            out[g * Og:(g + 1) * Og] = full[:, g * Cg:(g + 1) * Cg, g * Og:(g + 1) * Og].transpose(2, 1, 0)
        return out

    def _gpu_blur(self, latT, w, table):
        """CUDA path: latT (M, C), w (F, C, O) -> (M, O) through ``table`` (nbr or inv_nbr)."""
        xp, M = self.xp, self.num_vertices
        F, C, O = w.shape
        dtype = w.dtype
        ob, nob = cuda_kernels.blur_block(O)
        if ob * nob != O:
            wp = xp.zeros((F, C, ob * nob), dtype=dtype)
            wp[:, :, :O] = w
        else:
            wp = xp.ascontiguousarray(w)
        out = xp.empty((M, O), dtype=dtype)
        self._gpu.launch('lattice_blur', M * nob, (xp.ascontiguousarray(latT, dtype=dtype), table, wp, out,
                                                   self._gpu_order(table), M, C, O, F, nob), dtype, OB=ob)
        return out

    def _gpu_order(self, table):
        """The vertices sorted by the set of taps they have in ``table`` (kept per table)."""
        cache = self.__dict__.setdefault('_orders', {})
        key = id(table)
        if key not in cache:
            xp, M = self.xp, self.num_vertices
            mask = xp.empty(M, dtype=np.uint64)
            self._gpu.launch('lattice_tap_masks', M, (table, mask, M, self.num_taps), self.dtype)
            cache[key] = (table, xp.argsort(mask).astype(np.int32))
        return cache[key][1]

    def _gpu_taps_grad(self, latT, gradT):
        """CUDA path of the tap gradient: (F, C, O), per-chunk sums by the kernel, added up here."""
        xp, M, F = self.xp, self.num_vertices, self.num_taps
        C, O = latT.shape[1], gradT.shape[1]
        dtype = latT.dtype
        ob, nob = cuda_kernels.blur_block(O)
        chunk = max(_TAPS_GRAD_MIN_CHUNK, -(-M // _TAPS_GRAD_MAX_CHUNKS))
        nchunks = max(1, -(-M // chunk))
        partial = xp.empty((nchunks, F, C, O), dtype=dtype)
        self._gpu.launch('lattice_taps_grad', nchunks * F * C * nob,
                         (xp.ascontiguousarray(latT), xp.ascontiguousarray(gradT, dtype=dtype), self.nbr, partial,
                          M, C, O, F, nob, chunk), dtype, OB=ob)
        return partial.sum(axis=0)

    def _gpu_splat_matrix(self, points, dtype):
        """(indptr, point, weight) of the CSR splat matrix (M, n_points), weight in ``dtype``."""
        key = (points, np.dtype(dtype).name)
        if key not in self._splat_csr:
            S = self._S_in if points == 'in' else self._S_out
            S = S.tocsr()
            S.sort_indices()
            xp = self.xp
            self._splat_csr[key] = (xp.ascontiguousarray(S.indptr, dtype=np.int32),
                                    xp.ascontiguousarray(S.indices, dtype=np.int32),
                                    xp.ascontiguousarray(S.data, dtype=dtype))
        return self._splat_csr[key]

    def _gpu_splat(self, xT, scale, points):
        """CUDA path: point-major xT (n_points, C), times ``scale`` per point -> (M, C)."""
        xp, M = self.xp, self.num_vertices
        n = self.n_in if points == 'in' else self.n_out
        if xT.ndim != 2 or xT.shape[0] != n:
            raise ValueError('expected an array of shape (C, %d), got %s' % (n, xT.T.shape))
        dtype = np.result_type(xT.dtype, self.dtype)
        C = xT.shape[1]
        indptr, point, weight = self._gpu_splat_matrix(points, dtype)
        sc = xp.zeros(1, dtype) if scale is None else xp.ascontiguousarray(scale, dtype=dtype)
        out = xp.empty((M, C), dtype=dtype)
        self._gpu.launch('lattice_splat', M * C, (xp.ascontiguousarray(xT, dtype=dtype), sc, indptr, point,
                                                  weight, out, M, C, int(scale is not None)), dtype)
        return out

    def _gpu_slice(self, latT, scale, points):
        """CUDA path: (M, C) -> point-major (n_points, C), times ``scale`` per point."""
        xp = self.xp
        dtype = np.result_type(latT.dtype, self.dtype)
        vertex, weight = (self.vertex_out, self.weight_out) if points == 'out' else \
            (self.vertex_in, self.weight_in)
        n, D1 = vertex.shape
        C = latT.shape[1]
        sc = xp.zeros(1, dtype) if scale is None else xp.ascontiguousarray(scale, dtype=dtype)
        out = xp.empty((n, C), dtype=dtype)
        self._gpu.launch('lattice_slice', n * C, (xp.ascontiguousarray(latT, dtype=dtype),
                                                  xp.ascontiguousarray(vertex, dtype=np.int32),
                                                  xp.ascontiguousarray(weight, dtype=dtype), sc, out,
                                                  n, C, D1, int(scale is not None)), dtype)
        return out

    @staticmethod
    def _spmm(A, x):
        """Sparse @ dense in the wider of the two dtypes (cupyx needs equal dtypes)."""
        if x.dtype != A.dtype:
            dt = np.result_type(x.dtype, A.dtype)
            A = A if A.dtype == dt else A.astype(dt)
            x = x.astype(dt, copy=False)
        return A @ x

    def _splatT(self, xT, points='in'):
        """(n_points, C) -> (M, C): barycentric splat of the input ('in') or output ('out') points."""
        if self._gpu is not None:
            return self._gpu_splat(xT, None, points)
        if self._kern is not None:
            return self._splat_cf(xT.T, None, points)
        return self._spmm(self._S_in if points == 'in' else self._S_out, xT)

    def _splat_cf(self, values, scale=None, points='in'):
        """values (C, n_points) channel-first, times ``scale`` (n_points,) per point when given,
        splatted: (M, C)."""
        if self._gpu is not None:
            if values.ndim != 2:
                raise ValueError('expected an array of shape (C, n), got %s' % (values.shape,))
            return self._gpu_splat(self.xp.ascontiguousarray(values.T), scale, points)
        if self._kern is not None:
            n = self.n_in if points == 'in' else self.n_out
            if values.ndim != 2 or values.shape[1] != n:
                raise ValueError('expected an array of shape (C, %d), got %s' % (n, values.shape))
            dtype = np.result_type(values.dtype, self.dtype)
            vertex, weight = (self.vertex_in, self.weight_in) if points == 'in' else \
                (self.vertex_out, self.weight_out)
            out = np.empty((self.num_vertices, values.shape[0]), dtype)
            sc = np.zeros(0, dtype) if scale is None else np.ascontiguousarray(scale, dtype=dtype)
            self._kern.splat_cf(vertex, weight.astype(dtype, copy=False), np.ascontiguousarray(values, dtype=dtype),
                                sc, out)
            return out
        xT = self._vm(values, self.n_in if points == 'in' else self.n_out)
        if scale is not None:
            xT = xT * scale[:, None]
        return self._splatT(xT, points)

    def _slice_cf(self, latT, scale=None, points='out'):
        """(M, C) -> channel-first (C, n_points), times ``scale`` (n_points,) per point when given."""
        if self._gpu is not None:
            return self._gpu_slice(latT, scale, points).T
        if self._kern is not None:
            dtype = np.result_type(latT.dtype, self.dtype)
            vertex, weight = (self.vertex_out, self.weight_out) if points == 'out' else \
                (self.vertex_in, self.weight_in)
            out = np.empty((latT.shape[1], vertex.shape[0]), dtype)
            sc = np.zeros(0, dtype) if scale is None else np.ascontiguousarray(scale, dtype=dtype)
            self._kern.slice_cf(vertex, weight.astype(dtype, copy=False), np.ascontiguousarray(latT, dtype=dtype),
                                sc, out)
            return out
        yT = self._sliceT(latT, points)
        if scale is not None:
            yT *= scale[:, None]
        return yT.T

    def _sliceT(self, latT, points='out'):
        """(M, C) -> (n_points, C): barycentric interpolation at the output ('out') or input points."""
        if self._gpu is not None:
            return self._gpu_slice(latT, None, points)
        if self._kern is not None:
            dtype = np.result_type(latT.dtype, self.dtype)
            vertex, weight = (self.vertex_out, self.weight_out) if points == 'out' else \
                (self.vertex_in, self.weight_in)
            out = np.empty((vertex.shape[0], latT.shape[1]), dtype)
            self._kern.slice_points(vertex, weight.astype(dtype, copy=False),
                                    np.ascontiguousarray(latT, dtype=dtype), out)
            return out
        return self._spmm(self._P_out if points == 'out' else self._P_in, latT)

    def gaussian_blur_matrix(self):
        """Sparse CSR (M, M) of the blur with the Gaussian taps (built once, on first use)."""
        if self._gauss_blur is None:
            xp = self.xp
            M, F = self.num_vertices, self.num_taps
            g = gaussian_taps(self.d, self.neighborhood_size, xp, self.dtype)
            # (v, f, u) triples in tap order, sorted by row v (stable: taps stay in order
            # within a row) with one sort of (v, position) packed into int64
            counts = [M] + [int(self.taps_v[f].shape[0]) for f in range(1, F)]
            rows = xp.concatenate([xp.arange(M, dtype=np.int64)] +
                                  [self.taps_v[f].astype(np.int64) for f in range(1, F)])
            cols = xp.concatenate([xp.arange(M, dtype=np.int32)] +
                                  [self.taps_u[f].astype(np.int32) for f in range(1, F)])
            vals = xp.repeat(g, counts)
            nnz = int(rows.shape[0])
            pos_bits = max(1, (nnz - 1).bit_length())
            if pos_bits + max(1, M.bit_length()) <= 62:
                packed = xp.sort((rows << np.int64(pos_bits)) | xp.arange(nnz, dtype=np.int64))
                order = packed & np.int64((1 << pos_bits) - 1)
            else:
                order = xp.argsort(rows, kind='stable')
            indices = cols[order]
            data = vals[order]
            indptr = xp.zeros(M + 1, dtype=np.int64)
            xp.cumsum(xp.bincount(rows, minlength=M), out=indptr[1:])
            self._gauss_blur = self._sp.csr_matrix((data, indices, indptr.astype(np.int32)), shape=(M, M))
        return self._gauss_blur

    def _blur_scalarT(self, latT, g):
        """Blur every channel with the same taps g (F,): (M, C) -> (M, C)."""
        if self._gpu is not None:
            xp = self.xp
            dtype = np.result_type(latT.dtype, g.dtype)
            M, C = latT.shape
            out = xp.empty((M, C), dtype=dtype)
            self._gpu.launch('lattice_blur_scalar', M * C, (xp.ascontiguousarray(latT, dtype=dtype), self.nbr,
                                                            xp.ascontiguousarray(xp.asarray(g), dtype=dtype),
                                                            out, M, C, self.num_taps), dtype)
            return out
        if self._kern is not None:
            dtype = np.result_type(latT.dtype, g.dtype)
            out = np.empty(latT.shape, dtype)
            latT = np.ascontiguousarray(latT, dtype=dtype)
            g = np.ascontiguousarray(g, dtype=dtype)
            if self._bt is None:          # no tap structure needed yet (Gaussian filtering only)
                parent, direction = _tap_parents(self.d, self.neighborhood_size)
                self._kern.walk_blur_scalar(self._imm, parent, direction, self.num_vertices, latT, g, out,
                                            _VERTEX_BLOCK)
            else:
                self._kern.blur_scalar(*self._blocks(), latT, g, out, _VERTEX_BLOCK)
            return out
        out = latT * g[0]
        for f in range(1, self.num_taps):
            v = self.taps_v[f]
            if v.shape[0]:
                out[v] += self.xp.take(latT, self.taps_u[f], axis=0) * g[f]
        return out

    # ---------------------------------------------------------------- public API
    def splat(self, values):
        """(C, n_in) -> (C, M): barycentric splat of the input points."""
        return self._splatT(self._vm(values, self.n_in)).T

    def splat_adjoint(self, lat):
        """(C, M) -> (C, n_in): barycentric interpolation at the input points."""
        return self._sliceT(self._vm(lat, self.num_vertices), 'in').T

    def blur(self, lat, taps, group=1):
        """lat (C, M), taps (O, C/group, F) -> (O, M) with Caffe's neighbour walk
        (missing neighbours contribute 0).  group > 1: output block g of O/group rows
        reads input channels [g·C/group, (g+1)·C/group); rows past group·(O/group) are 0."""
        return self._blurT(self._vm(lat, self.num_vertices), taps, group).T

    def blur_adjoint(self, grad, taps, group=1):
        """(O, M) -> (C, M): transpose of :meth:`blur` for fixed taps."""
        return self._blur_adjointT(self._vm(grad, self.num_vertices), taps, group).T

    def blur_taps_grad(self, lat, grad, group=1):
        """lat (C, M), grad (O, M) -> (O, C/group, F) = d<grad, blur(lat, taps)>/d taps."""
        return self._taps_gradT(self._vm(lat, self.num_vertices), self._vm(grad, self.num_vertices),
                                group)

    def slice(self, lat):
        """(O, M) -> (O, n_out): barycentric interpolation at the output points."""
        return self._sliceT(self._vm(lat, self.num_vertices), 'out').T

    def slice_adjoint(self, grad):
        """(O, n_out) -> (O, M): transpose of :meth:`slice`."""
        return self._splatT(self._vm(grad, self.n_out), 'out').T


def build_lattice(in_features, out_features=None, neighborhood_size=1, visualize=False):
    """Lattice of ``in_features`` (d, n_in) and ``out_features`` (d, n_out) (None: the same
    points, one lattice for both).  ``visualize``: all barycentric weights 1 (Caffe's
    visualize_lattice)."""
    return Lattice(in_features, out_features, neighborhood_size, visualize)


# --------------------------------------------------------------------------------------
# normalised filtering
# --------------------------------------------------------------------------------------

_NORM_TYPES = ('symmetric', 'after', 'none')


class BilateralFilter:
    """Permutohedral filtering with learnable taps and Caffe's normalisation.

    norm_type 'symmetric' (default): ``out = nb ⊙ Slice(Blur_W(Splat(nt ⊙ x)))`` with
    ``nt = 1/sqrt(Ŝ_in→in(1) + 1e-20)``, ``nb = 1/sqrt(Ŝ_out→out(1) + 1e-20)``;
    'after': ``nt = 1``, ``nb = 1/(Ŝ_in→out(1) + 1e-20)``; 'none': no normalisation.
    Ŝ uses the Gaussian taps of the lattice's (d, s).  Normalisers are (n_in,) / (n_out,)
    arrays ``norm_there`` / ``norm_back`` (None when 1)."""

    def __init__(self, lattice, norm_type='symmetric'):
        norm_type = str(norm_type).lower()
        if norm_type not in _NORM_TYPES:
            raise ValueError('norm_type must be one of %s, got %r' % (_NORM_TYPES, norm_type))
        self.lattice = lattice
        self.norm_type = norm_type
        self.norm_there = None
        self.norm_back = None
        xp = lattice.xp
        lat = lattice
        if norm_type == 'none':
            return
        dtype = lat.dtype
        gauss = gaussian_taps(lat.d, lat.neighborhood_size, np, dtype)

        def s_hat(src, dst):
            n_src = lat.n_in if src == 'in' else lat.n_out
            ones = xp.ones((1, n_src), dtype=dtype)
            z = lat._splat_cf(ones, None, src)
            y = lat._blur_scalarT(z, gauss)
            return lat._slice_cf(y, None, dst)[0].astype(np.float64)

        if norm_type == 'symmetric':
            self.norm_there = (1.0 / xp.sqrt(s_hat('in', 'in') + 1e-20)).astype(dtype)
            if lat.same_points:
                self.norm_back = self.norm_there
            else:
                self.norm_back = (1.0 / xp.sqrt(s_hat('out', 'out') + 1e-20)).astype(dtype)
        else:
            self.norm_back = (1.0 / (s_hat('in', 'out') + 1e-20)).astype(dtype)

    # internal, vertex-major ------------------------------------------------------
    def splat_input(self, values):
        """(C, n_in) -> (M, C): the splat of the normalised input (vertex-major)."""
        return self.lattice._splat_cf(values, self.norm_there, 'in')

    def apply(self, values, taps, group=1):
        """values (C, n_in), taps (O, C/group, F) -> (O, n_out)."""
        lat = self.lattice
        return lat._slice_cf(lat._blurT(self.splat_input(values), taps, group), self.norm_back, 'out')

    def _grad_lattice(self, grad):
        return self.lattice._splat_cf(grad, self.norm_back, 'out')

    def adjoint(self, grad, taps, group=1):
        """grad (O, n_out) -> (C, n_in) = (d apply / d values)^T grad."""
        lat = self.lattice
        return lat._slice_cf(lat._blur_adjointT(self._grad_lattice(grad), taps, group), self.norm_there, 'in')

    def backward(self, values, grad, taps, group=1, splatted=None):
        """(:meth:`adjoint` (grad), :meth:`taps_grad` (values, grad)) sharing the splat of grad."""
        lat = self.lattice
        gl = self._grad_lattice(grad)
        x = lat._slice_cf(lat._blur_adjointT(gl, taps, group), self.norm_there, 'in')
        latT = self.splat_input(values) if splatted is None else splatted
        return x, lat._taps_gradT(latT, gl, group)

    def taps_grad(self, values, grad, group=1, splatted=None):
        """Gradient of <grad, apply(values, taps)> w.r.t. taps: (O, C/group, F).
        ``splatted`` may pass :meth:`splat_input` (values) computed earlier."""
        latT = self.splat_input(values) if splatted is None else splatted
        return self.lattice._taps_gradT(latT, self._grad_lattice(grad), group)

    def gaussian(self, values):
        """values (C, n_in) -> (C, n_out): the normalised filter with the Gaussian taps on
        every channel separately (= apply with taps g·I; NumPy/CuPy: one sparse matrix product,
        compiled path: a walk-and-blur kernel with the same taps)."""
        lat = self.lattice
        zT = self.splat_input(values)
        if lat._kern is not None or lat._gpu is not None:
            yT = lat._blur_scalarT(zT, gaussian_taps(lat.d, lat.neighborhood_size, np, zT.dtype))
        else:
            yT = lat._spmm(lat.gaussian_blur_matrix(), zT)
        return lat._slice_cf(yT, self.norm_back, 'out')
