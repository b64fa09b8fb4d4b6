"""Numba kernels for the CPU (NumPy) path: permutohedral lattice, leaky simplex projection.

This module imports numba at its top, so it is imported lazily (see :mod:`.accel`) and only
when numba is installed and the environment variable ``CRFGRAD_NO_NUMBA`` is not set to a
true value.  Every kernel has a vectorised NumPy/CuPy counterpart in lattice.py and
projection.py (the reference and the fallback); tests/test_speed_equivalence.py compares them.

Layouts: lattice values are vertex-major (M, C); point values channel-first (C, n).  Lattice
construction: per-point simplex (parallel), a sequential open-addressing hash table of the
vertex keys (vertices numbered in order of first appearance, as Caffe), immediate neighbours
by hash look-ups (M+1, d+1).  The taps of Caffe's walk are kept per block of vertices and per
tap (``bptr``, ``row`` = v, ``col`` = nbr_f(v)), so the learned-tap blur is, per block and
tap, a gather of rows, one small BLAS product with W_f and an add into the block's rows.
Parallel loops run over fixed-size blocks, so results do not depend on the number of threads.
"""
import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, nogil=True)

# vertices (points) per parallel block: scratch arrays are allocated once per block
_BLOCK = 512
# vertices per partial sum of the taps gradient (float32 partial sums, added in float64)
_GRAD_CHUNK = 2048


# ---------------------------------------------------------------------------------------------
# lattice construction
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def lattice_points(feat, scale, jvals, down32, down_d, zero, rem0, rank, bary):
    """Per point (columns of feat (d, n)): Caffe's elevation, rounding, rank and barycentric
    weights, in the same arithmetic as lattice._elevate_and_simplex.  Writes rem0 (n, d+1)
    int64, rank (n, d+1) int64, bary (n, d+1) (feat's dtype)."""
    d, n = feat.shape
    dp1 = d + 1
    nblk = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nblk):
        el = np.empty(dp1, feat.dtype)
        fr = np.empty(dp1, feat.dtype)
        res = np.empty(dp1, np.float32)
        plus = np.empty(dp1 + 1, feat.dtype)
        minus = np.empty(dp1 + 1, feat.dtype)
        r0 = np.empty(dp1, np.int64)
        rk = np.empty(dp1, np.int64)
        for k in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            sm = zero
            for j in range(d, 0, -1):
                cf = feat[j - 1, k] * scale[j - 1]
                el[j] = sm - jvals[j] * cf
                sm = sm + cf
            el[0] = sm
            total = 0
            for i in range(dp1):
                e32 = np.float32(el[i])
                x = np.float64(down32 * e32)
                rd = np.int64(np.trunc(x + np.copysign(0.5, x)))
                r0[i] = rd * dp1
                total += rd
                res[i] = e32 - np.float32(r0[i])
                rk[i] = 0
            for i in range(d):
                for j in range(i + 1, dp1):
                    less = res[i] < res[j]
                    rk[i] += less
                    rk[j] += 1 - less
            for i in range(dp1):
                r = rk[i] + total
                if r < 0:
                    r += dp1
                    r0[i] += dp1
                elif r > d:
                    r -= dp1
                    r0[i] -= dp1
                rk[i] = r
                rem0[k, i] = r0[i]
                rank[k, i] = r
                fr[i] = r0[i]
            for j in range(dp1 + 1):
                plus[j] = zero
                minus[j] = zero
            for i in range(dp1):
                v = (el[i] - fr[i]) * down_d
                plus[d - rk[i]] = v
                minus[d - rk[i] + 1] = v
            for j in range(1, dp1):
                bary[k, j] = plus[j] - minus[j]
            last = plus[dp1] - minus[dp1]
            first = plus[0] - minus[0]
            bary[k, 0] = np.float64(first) + (1.0 + np.float64(last))


@njit(inline='always')
def _mix(h, x):
    return (h ^ x) * np.int64(0x100000001B3) + np.int64(0x9E3779B9)


@njit(inline='always')
def _slot(h, mask):
    h = h ^ (h >> np.int64(29))
    h = h * np.int64(0x5851F42D4C957F2D)
    h = h ^ (h >> np.int64(32))
    return h & mask


@njit(**_JIT)
def _key_hash(keys, v, d):
    h = np.int64(0)
    for i in range(d):
        h = _mix(h, keys[v, i])
    return h


@njit(**_JIT)
def _grow(keys, m, d, cap):
    """A table of ``cap`` slots holding the vertices 0..m-1."""
    table = np.full(cap, -1, np.int32)
    mask = cap - 1
    for v in range(m):
        slot = _slot(_key_hash(keys, v, d), mask)
        while table[slot] >= 0:
            slot = (slot + 1) & mask
        table[slot] = v
    return table


@njit(**_JIT)
def hash_vertices(rem0, rank, cap_bits):
    """Unique simplex vertices of all points, numbered in order of first appearance (point-major,
    vertex r = 0..d within a point, as Caffe's hash table).  Returns vertex (n, d+1) int32,
    keys (M, d) int64, the open-addressing table int32 (-1 = empty; it starts with 2^cap_bits
    slots and doubles whenever it is half full) and M."""
    n, dp1 = rem0.shape
    d = dp1 - 1
    cap = np.int64(1) << cap_bits
    mask = cap - 1
    table = np.full(cap, -1, np.int32)
    keys = np.empty((max(n * dp1, 1), max(d, 1)), np.int64)
    vertex = np.empty((n, dp1), np.int32)
    key = np.empty(max(d, 1), np.int64)
    m = 0
    for k in range(n):
        if k > 0:
            # neighbouring pixels often share their simplex: reuse the previous point's vertices
            same_simplex = True
            for i in range(dp1):
                if rem0[k, i] != rem0[k - 1, i] or rank[k, i] != rank[k - 1, i]:
                    same_simplex = False
                    break
            if same_simplex:
                for r in range(dp1):
                    vertex[k, r] = vertex[k - 1, r]
                continue
        for r in range(dp1):
            h = np.int64(0)
            for i in range(d):
                kv = rem0[k, i] + r
                if rank[k, i] > d - r:
                    kv -= dp1
                key[i] = kv
                h = _mix(h, kv)
            slot = _slot(h, mask)
            while True:
                idx = table[slot]
                if idx < 0:
                    table[slot] = m
                    for i in range(d):
                        keys[m, i] = key[i]
                    vertex[k, r] = m
                    m += 1
                    if 2 * m > cap:
                        cap *= 2
                        mask = cap - 1
                        table = _grow(keys, m, d, cap)
                    break
                same = True
                for i in range(d):
                    if keys[idx, i] != key[i]:
                        same = False
                        break
                if same:
                    vertex[k, r] = idx
                    break
                slot = (slot + 1) & mask
    return vertex, keys[:m].copy(), table, m


@njit(parallel=True, **_JIT)
def immediate_neighbours(keys, table, m):
    """imm (M+1, d+1) int32: imm[v, k] = the vertex v + v_k (v_k = (d+1)e_k - 1, coordinates
    0..d-1 stored), M where it does not exist; row M holds M (the missing vertex has none)."""
    d = keys.shape[1] if m > 0 else 0
    dp1 = d + 1
    mask = np.int64(table.shape[0] - 1)
    imm = np.empty((m + 1, dp1), np.int32)
    for k in range(dp1):
        imm[m, k] = m
    nblk = (m + _BLOCK - 1) // _BLOCK
    for b in prange(nblk):
        key = np.empty(max(d, 1), np.int64)
        for v in range(b * _BLOCK, min(m, (b + 1) * _BLOCK)):
            for k in range(dp1):
                h = np.int64(0)
                for i in range(d):
                    kv = keys[v, i] - 1
                    if i == k:
                        kv += dp1
                    key[i] = kv
                    h = _mix(h, kv)
                slot = _slot(h, mask)
                found = m
                while True:
                    idx = table[slot]
                    if idx < 0:
                        break
                    same = True
                    for i in range(d):
                        if keys[idx, i] != key[i]:
                            same = False
                            break
                    if same:
                        found = idx
                        break
                    slot = (slot + 1) & mask
                imm[v, k] = found
    return imm


@njit(**_JIT)
def _walk_block(imm, parent, direction, m, v0, nb, cnt, pos, nbr):
    """The taps of the nb vertices v0.. of a block that stay on the lattice: for tap f, cnt[f]
    pairs (pos[f, j] = i, nbr[f, j] = nbr_f(v0 + i)) with i increasing.  Tap f >= 1 is one step
    along direction[f] from the end of tap parent[f] < f, so only the vertices whose parent walk
    exists are stepped (the look-ups of one tap are independent: their latencies overlap)."""
    F = parent.shape[0]
    for i in range(nb):
        pos[0, i] = i
        nbr[0, i] = v0 + i
    cnt[0] = nb
    for f in range(1, F):
        pf = parent[f]
        k = direction[f]
        c = 0
        for j in range(cnt[pf]):
            u = imm[nbr[pf, j], k]
            if u < m:
                pos[f, c] = pos[pf, j]
                nbr[f, c] = u
                c += 1
        cnt[f] = c


@njit(parallel=True, **_JIT)
def tap_blocks(imm, parent, direction, m, block):
    """Caffe's tap walk from every vertex, as a tap-major CSR per block of ``block`` vertices.

    imm (M+1, d+1) int32 (row M = M).  Returns bptr (nblk·F + 1,) int64 (the entries of block b and
    tap f are bptr[b·F + f] .. bptr[b·F + f + 1] - 1), row (nnz,) = v (increasing within a block and
    tap) and col (nnz,) = nbr_f(v), both int32, for the taps whose walk stays on the lattice.  Two
    passes (count, fill)."""
    F = parent.shape[0]
    nblk = max(1, (m + block - 1) // block)
    bcnt = np.zeros((nblk, F), np.int64)
    for b in prange(nblk):
        v0 = b * block
        nb = max(0, min(m, v0 + block) - v0)
        cnt = np.empty(F, np.int64)
        pos = np.empty((F, block), np.int32)
        nbr = np.empty((F, block), np.int32)
        _walk_block(imm, parent, direction, m, v0, nb, cnt, pos, nbr)
        for f in range(F):
            bcnt[b, f] = cnt[f]
    bptr = np.empty(nblk * F + 1, np.int64)
    bptr[0] = 0
    flat = bcnt.ravel()
    for i in range(nblk * F):
        bptr[i + 1] = bptr[i] + flat[i]
    nnz = bptr[nblk * F]
    row = np.empty(nnz, np.int32)
    col = np.empty(nnz, np.int32)
    for b in prange(nblk):
        v0 = b * block
        nb = max(0, min(m, v0 + block) - v0)
        cnt = np.empty(F, np.int64)
        pos = np.empty((F, block), np.int32)
        nbr = np.empty((F, block), np.int32)
        _walk_block(imm, parent, direction, m, v0, nb, cnt, pos, nbr)
        for f in range(F):
            p = bptr[b * F + f]
            for j in range(cnt[f]):
                row[p + j] = v0 + pos[f, j]
                col[p + j] = nbr[f, j]
    return bptr, row, col


@njit(**_JIT)
def transpose_blocks(bptr, row, col, m, F, block):
    """The block-tap CSR of the inverse maps: entries (row = u, col = v) grouped by blocks of u
    and by tap, v increasing within a (block, tap) (a stable counting sort)."""
    nblk_in = (bptr.shape[0] - 1) // F
    nblk = max(1, (m + block - 1) // block)
    cnt = np.zeros(nblk * F + 1, np.int64)
    for bi in range(nblk_in):
        for f in range(F):
            for e in range(bptr[bi * F + f], bptr[bi * F + f + 1]):
                cnt[(col[e] // block) * F + f + 1] += 1
    for i in range(nblk * F):
        cnt[i + 1] += cnt[i]
    pos = cnt[:nblk * F].copy()
    nnz = cnt[nblk * F]
    irow = np.empty(nnz, np.int32)
    icol = np.empty(nnz, np.int32)
    # visit the forward entries in increasing v (blocks of v, then v within a block across taps
    # would need a merge; instead walk tap by tap: within one tap f the v are increasing over the
    # forward blocks, so every (u-block, f) bucket receives its v in increasing order)
    for f in range(F):
        for bi in range(nblk_in):
            for e in range(bptr[bi * F + f], bptr[bi * F + f + 1]):
                u = col[e]
                k = (u // block) * F + f
                p = pos[k]
                irow[p] = u
                icol[p] = row[e]
                pos[k] = p + 1
    return cnt, irow, icol


# ---------------------------------------------------------------------------------------------
# splat / slice / blur
# ---------------------------------------------------------------------------------------------
@njit(**_JIT)
def splat_cf(vertex, weight, x, scale, out):
    """out[v, c] = Σ_{points k of v, increasing k} w_k (x[c, k]·scale[k]): the splat of
    channel-first values x (C, n) scaled per point (scale (n,); an empty array: no scaling), as
    Caffe computes it: one pass over the points in order, adding into their d+1 vertices (reads of
    x stay sequential and the vertices of neighbouring points are close)."""
    m, C = out.shape
    n, dp1 = vertex.shape
    scaled = scale.shape[0] > 0
    out[:] = 0
    xs = np.empty(C, out.dtype)
    for k in range(n):
        if scaled:
            sk = scale[k]
            for c in range(C):
                xs[c] = x[c, k] * sk
        else:
            for c in range(C):
                xs[c] = x[c, k]
        for r in range(dp1):
            v = vertex[k, r]
            w = weight[k, r]
            for c in range(C):
                out[v, c] += w * xs[c]


@njit(parallel=True, **_JIT)
def slice_cf(vertex, weight, lat, scale, out):
    """out[c, k] = (Σ_r weight[k, r] lat[vertex[k, r], c])·scale[k], channel-first (C, n) (scale
    (n,); an empty array: no scaling)."""
    C, n = out.shape
    dp1 = vertex.shape[1]
    scaled = scale.shape[0] > 0
    nblk = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nblk):
        k0 = b * _BLOCK
        k1 = min(n, k0 + _BLOCK)
        acc = np.empty((k1 - k0, C), out.dtype)
        for k in range(k0, k1):
            for c in range(C):
                acc[k - k0, c] = 0
            for r in range(dp1):
                v = vertex[k, r]
                w = weight[k, r]
                for c in range(C):
                    acc[k - k0, c] += w * lat[v, c]
            if scaled:
                for c in range(C):
                    acc[k - k0, c] *= scale[k]
        for c in range(C):
            for k in range(k0, k1):
                out[c, k] = acc[k - k0, c]


@njit(parallel=True, **_JIT)
def walk_blur_scalar(imm, parent, direction, m, lat, g, out, block):
    """The Gaussian-type blur out[v, c] = Σ_f g[f] lat[nbr_f(v), c] straight from the walk (no tap
    structure kept): per block the taps of _walk_block, added in increasing f (the order of
    blur_scalar, so the results are identical)."""
    F = parent.shape[0]
    C = lat.shape[1]
    nblk = max(1, (m + block - 1) // block)
    for b in prange(nblk):
        v0 = b * block
        nb = max(0, min(m, v0 + block) - v0)
        cnt = np.empty(F, np.int64)
        pos = np.empty((F, block), np.int32)
        nbr = np.empty((F, block), np.int32)
        _walk_block(imm, parent, direction, m, v0, nb, cnt, pos, nbr)
        for i in range(nb):
            for c in range(C):
                out[v0 + i, c] = 0
        for f in range(F):
            gf = g[f]
            for j in range(cnt[f]):
                i = v0 + pos[f, j]
                u = nbr[f, j]
                for c in range(C):
                    out[i, c] += gf * lat[u, c]


@njit(parallel=True, **_JIT)
def slice_points(vertex, weight, lat, out):
    """out[k, c] = Σ_r weight[k, r] lat[vertex[k, r], c].  out (n, C)."""
    n, C = out.shape
    dp1 = vertex.shape[1]
    nblk = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nblk):
        for k in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            for c in range(C):
                out[k, c] = 0
            for r in range(dp1):
                v = vertex[k, r]
                w = weight[k, r]
                for c in range(C):
                    out[k, c] += w * lat[v, c]


@njit(parallel=True, **_JIT)
def blur(bptr, row, col, lat, w, out, block):
    """out[v, o] = Σ_{(f, u) of v} Σ_c lat[u, c] w[f, c, o] over a block-tap CSR (rows v):
    per block and tap the rows lat[u] are gathered and multiplied by w[f] with BLAS, and added
    into the block's rows.  lat (M, C), w (F, C, O), out (M, O)."""
    m, O = out.shape
    C = lat.shape[1]
    F = w.shape[0]
    nblk = (bptr.shape[0] - 1) // F
    for b in prange(nblk):
        v0 = b * block
        v1 = min(m, v0 + block)
        acc = np.zeros((max(v1 - v0, 0), O), out.dtype)
        kmax = 0
        for f in range(F):
            kmax = max(kmax, bptr[b * F + f + 1] - bptr[b * F + f])
        buf = np.empty((kmax, C), lat.dtype)
        for f in range(F):
            s0 = bptr[b * F + f]
            k = bptr[b * F + f + 1] - s0
            if k == 0:
                continue
            for i in range(k):
                u = col[s0 + i]
                for c in range(C):
                    buf[i, c] = lat[u, c]
            res = np.dot(buf[:k], w[f])
            for i in range(k):
                r = row[s0 + i] - v0
                for o in range(O):
                    acc[r, o] += res[i, o]
        for i in range(v1 - v0):
            for o in range(O):
                out[v0 + i, o] = acc[i, o]


@njit(parallel=True, **_JIT)
def blur_scalar(bptr, row, col, lat, g, out, block):
    """out[v, c] = Σ_{(f, u) of v} g[f] lat[u, c] (the same taps on every channel)."""
    m, C = out.shape
    F = g.shape[0]
    nblk = (bptr.shape[0] - 1) // F
    for b in prange(nblk):
        v0 = b * block
        v1 = min(m, v0 + block)
        for v in range(v0, v1):
            for c in range(C):
                out[v, c] = 0
        for f in range(F):
            gf = g[f]
            for e in range(bptr[b * F + f], bptr[b * F + f + 1]):
                v = row[e]
                u = col[e]
                for c in range(C):
                    out[v, c] += gf * lat[u, c]


@njit(parallel=True, **_JIT)
def taps_grad_partial(bptr, row, col, lat, grad, partial, block, per_chunk):
    """partial[chunk, f] = Σ over the blocks of the chunk of Σ_{(f, u) of v} lat[u]ᵀ grad[v]
    ((C, O) products by BLAS on gathered rows)."""
    m, O = grad.shape
    C = lat.shape[1]
    F = partial.shape[1]
    nblk = (bptr.shape[0] - 1) // F
    nchunk = partial.shape[0]
    for ch in prange(nchunk):
        P = partial[ch]
        P[:] = 0
        for b in range(ch * per_chunk, min(nblk, (ch + 1) * per_chunk)):
            kmax = 0
            for f in range(F):
                kmax = max(kmax, bptr[b * F + f + 1] - bptr[b * F + f])
            bl = np.empty((kmax, C), lat.dtype)
            bg = np.empty((kmax, O), grad.dtype)
            for f in range(F):
                s0 = bptr[b * F + f]
                k = bptr[b * F + f + 1] - s0
                if k == 0:
                    continue
                for i in range(k):
                    u = col[s0 + i]
                    v = row[s0 + i]
                    for c in range(C):
                        bl[i, c] = lat[u, c]
                    for o in range(O):
                        bg[i, o] = grad[v, o]
                P[f] += np.dot(bl[:k].T, bg[:k])


def taps_grad(bptr, row, col, lat, grad, F, block):
    """(F, C, O) = Σ_v Σ_{(f, u) of v} lat[u] ⊗ grad[v]: partial sums over chunks of blocks in
    the input dtype, added in float64 (the chunks do not depend on the number of threads)."""
    nblk = (bptr.shape[0] - 1) // F
    per_chunk = max(1, _GRAD_CHUNK // block)
    nchunk = max(1, (nblk + per_chunk - 1) // per_chunk)
    partial = np.empty((nchunk, F, lat.shape[1], grad.shape[1]), lat.dtype)
    taps_grad_partial(bptr, row, col, lat, grad, partial, block, per_chunk)
    return partial.sum(axis=0, dtype=np.float64).astype(lat.dtype)


# ---------------------------------------------------------------------------------------------
# leaky simplex projection (projection.py), arrays viewed as (A, L, B) with the class axis in the
# middle; every pixel (a, b) is independent.  (The threshold itself stays with NumPy, whose
# vectorised sort along the class axis is faster than a per-pixel loop here.)
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, **_JIT)
def simplex_leaky_apply(s, tau, leak, out):
    """out = z if z > 0 else leak·z with z = s - tau (tau per pixel).  s, out (A, L, B); tau (A, B)."""
    A, L, B = s.shape
    nblk = (B + _BLOCK - 1) // _BLOCK
    for job in prange(A * nblk):
        a = job // nblk
        b0 = (job % nblk) * _BLOCK
        b1 = min(B, b0 + _BLOCK)
        for i in range(L):
            for b in range(b0, b1):
                z = s[a, i, b] - tau[a, b]
                out[a, i, b] = z if z > 0 else z * leak


@njit(parallel=True, **_JIT)
def simplex_vjp(g, s, tau, rho, leak, rvals, out):
    """Jᵀg of the leaky projection per pixel (projection.project_simplex_vjp): a_c = 1 if s_c > t
    else leak; dt/ds_c = 1/rho if s_c > t else 0, or 1/L for all c when rho = L;
    out_c = a_c g_c - dt/ds_c · Σ_j a_j g_j.  g, s, out (A, L, B); tau (A, B); rho (A, B) int32;
    rvals (L,) = 1..L in s's dtype."""
    A, L, B = s.shape
    nblk = (B + _BLOCK - 1) // _BLOCK
    for job in prange(A * nblk):
        a = job // nblk
        b0 = (job % nblk) * _BLOCK
        b1 = min(B, b0 + _BLOCK)
        total = np.zeros(b1 - b0, out.dtype)
        coef = np.empty(b1 - b0, out.dtype)
        allact = np.empty(b1 - b0, np.bool_)
        for b in range(b0, b1):
            r = rho[a, b]
            coef[b - b0] = rvals[0] / rvals[r - 1]
            allact[b - b0] = r == L
        for i in range(L):
            for b in range(b0, b1):
                gv = g[a, i, b]
                ag = gv if s[a, i, b] > tau[a, b] else leak * gv
                out[a, i, b] = ag
                total[b - b0] += ag
        for i in range(L):
            for b in range(b0, b1):
                if allact[b - b0] or s[a, i, b] > tau[a, b]:
                    out[a, i, b] = out[a, i, b] - coef[b - b0] * total[b - b0]
