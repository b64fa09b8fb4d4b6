"""Spatial pairwise filtering of CRF-Grad (paper eq. 8): an L×L bank of k×k filters.

Layout: states ``q`` (N, C, H, W); filters ``W`` (O, C, k, k) with k odd.  The
operation is Caffe's convolution (cross-correlation), stride 1, zero padding
p = (k-1)/2, so the output has the input's size:

    S(q)[n, o, y, x] = Σ_{c, ky, kx} W[o, c, ky, kx] · q[n, c, y + ky - p, x + kx - p]

Three maps are provided: ``apply`` (S), ``adjoint`` (Sᵀ, the gradient w.r.t. q)
and ``weight_grad`` (d<g, S(q)>/dW).  Two equivalent paths compute them:

* direct: a sum over the k taps of one row (ky) of batched matrix products on
  shifted views of the zero-padded input (k matmuls with inner size C·k);
  cost ~ 2·k²·C·O·H·W flops;
* FFT (overlap-save): the image is cut into tiles of th×tw output pixels; the
  window of (th + 2p)×(tw + 2p) input pixels of a tile, zero-padded to a 2/3/5/7-smooth
  period Ph×Pw, gives the tile's output exactly as a circular correlation, so
  ``S(q) = assemble(irfft2(K̂ · rfft2(windows(q))))`` with one complex (O×C)·(C×tiles)
  product per frequency.  The tiles (periods at most _MAX_PERIOD) keep the kernel
  transform K̂ small (it stays in cache and is reused by every tile) and make the
  per-frequency products matrix products over the tiles.  K̂ (and the one of the flipped
  bank for Sᵀ) is computed once per :class:`SpatialFilter` and reused by every
  apply/adjoint of all T steps and the backward pass; the filter gradient sums the
  per-frequency products of all calls and inverts them once at the k×k lags.

``method='auto'`` picks the cheaper one from a flop estimate (FFT for large k·C).
Everything runs on NumPy or CuPy (``xp.fft``); the dtype of the inputs is kept
(float32 → complex64 transforms, float64 → complex128).  On CuPy the tile windows, the tile
cores, the assembly and the per-frequency mixing are CUDA kernels (:mod:`.cuda_kernels`; one
launch each instead of one copy per tile), unless CRFGRAD_NO_RAWKERNEL is set.
"""
import collections
import math
import os
import threading

import numpy as np

from .. import backend
from . import accel, cuda_kernels

# Flop model for method='auto': a real 2-D FFT costs ~_FFT_COST·P·log2(P); the direct path's
# matmuls run ~4x faster per flop than the FFT path (measured with NumPy/OpenBLAS), hence the weight.
_FFT_COST = 6.0
_DIRECT_FLOP_WEIGHT = 0.25


def _good_size(n):
    """Smallest m >= n whose prime factors are 2, 3, 5, 7 (fast FFT length)."""
    m = max(int(n), 1)
    while True:
        r = m
        for f in (2, 3, 5, 7):
            while r % f == 0:
                r //= f
        if r == 1:
            return m
        m += 1


def _check_weights(weights):
    if weights.ndim != 4 or weights.shape[2] != weights.shape[3]:
        raise ValueError('spatial filters must be (O, C, k, k), got %s' % (weights.shape,))
    k = int(weights.shape[2])
    if k % 2 != 1:
        raise ValueError('spatial filter size must be odd, got %d' % k)
    return k


def choose_method(num_in, num_out, k, height, width, batch=1):
    """'fft' or 'direct', whichever the flop model says is cheaper for one apply."""
    if k == 1:
        return 'direct'
    hw = height * width
    direct = 2.0 * k * k * num_in * num_out * hw * batch * _DIRECT_FLOP_WEIGHT
    tiling = _Tiling(height, width, k)
    pts = tiling.ph * tiling.pw
    tiles = tiling.ny * tiling.nx * batch
    ffts = (num_in + num_out) * tiles * _FFT_COST * pts * math.log2(max(pts, 2))
    products = 8.0 * num_in * num_out * tiles * tiling.ph * (tiling.pw // 2 + 1)
    return 'fft' if ffts + products < direct else 'direct'


# ---------------------------------------------------------------------------------------------
# direct path
# ---------------------------------------------------------------------------------------------
def _pad(xp, q, p):
    n, c, h, w = q.shape
    out = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=q.dtype)
    out[:, :, p:p + h, p:p + w] = q
    return out


def _row_windows(xp, qpad, ky, k, h, w):
    """(N, C·k, H·W): for tap row ky, the k horizontally shifted windows stacked channel-major."""
    n, c = qpad.shape[:2]
    rows = qpad[:, :, ky:ky + h, :]                                   # (N, C, H, W+2p)
    win = xp.stack([rows[:, :, :, kx:kx + w] for kx in range(k)], axis=2)  # (N, C, k, H, W)
    return win.reshape(n, c * k, h * w)


def direct_apply(q, weights):
    """S(q) by k tap-row matmuls. q (N, C, H, W), weights (O, C, k, k) -> (N, O, H, W)."""
    xp = backend.get_array_module(q, weights)
    k = _check_weights(weights)
    p = k // 2
    n, c, h, w = q.shape
    o = weights.shape[0]
    qpad = _pad(xp, q, p)
    out = xp.zeros((n, o, h * w), dtype=q.dtype)
    for ky in range(k):
        wrow = weights[:, :, ky, :].reshape(o, c * k)                  # (O, C·k), matches (C, k) order
        out += xp.matmul(wrow, _row_windows(xp, qpad, ky, k, h, w))
    return out.reshape(n, o, h, w)


def direct_adjoint(g, weights):
    """Sᵀ(g): g (N, O, H, W) -> (N, C, H, W); the correlation with the flipped, transposed bank."""
    k = _check_weights(weights)
    flipped = weights[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    xp = backend.get_array_module(g, weights)
    return direct_apply(g, xp.ascontiguousarray(flipped))


def direct_weight_grad(q, g, k):
    """dW[o, c, ky, kx] = Σ_{n,y,x} g[n, o, y, x] · q[n, c, y+ky-p, x+kx-p]  -> (O, C, k, k)."""
    xp = backend.get_array_module(q, g)
    p = k // 2
    n, c, h, w = q.shape
    o = g.shape[1]
    qpad = _pad(xp, q, p)
    gm = g.reshape(n, o, h * w)
    out = xp.empty((o, c, k, k), dtype=q.dtype)
    for ky in range(k):
        win = _row_windows(xp, qpad, ky, k, h, w)                      # (N, C·k, HW)
        prod = xp.tensordot(gm, win, axes=([0, 2], [0, 2]))            # (O, C·k), one GEMM
        out[:, :, ky, :] = prod.reshape(o, c, k)
    return out


# ---------------------------------------------------------------------------------------------
# FFT path
# ---------------------------------------------------------------------------------------------
# largest FFT period of a tile along one axis (larger images are cut into several tiles)
_MAX_PERIOD = 128


def _fft_grid(h, w, k):
    """One period covering a whole image: at least size + p keeps the wrap-around in the zero
    padding, at least k keeps the k taps on distinct grid points (see :func:`kernel_transform`)."""
    p = k // 2
    return _good_size(max(h + p, k)), _good_size(max(w + p, k))


def _tile_axis(size, k):
    """(tile, period, count) along one axis: ``count`` tiles of ``tile`` output pixels whose windows
    of tile + 2p pixels fit the smooth ``period``; the least padded work count·period among the
    periods up to _MAX_PERIOD (ties: the smaller period), or one tile when that is smaller."""
    p = k // 2
    single = _good_size(size + 2 * p)
    best = (single, single, size, 1) if single <= _MAX_PERIOD else None
    period = _good_size(2 * p + 1)
    while period <= min(_MAX_PERIOD, single):
        tile = period - 2 * p
        count = -(-size // tile)
        tile = -(-size // count)                       # the same count with balanced tiles
        cand = (count * period, period, tile, count)
        if best is None or cand[:2] < best[:2]:
            best = cand
        period = _good_size(period + 1)
    _, period, tile, count = best
    return tile, period, count


class _Workspace:
    """Intermediate arrays kept between the calls of one filter (fresh arrays of tens of MB per call
    cost as much in page faults as the arithmetic on them).  ``get`` returns the array named
    ``name`` (allocated on first use; with ``zero`` zero-filled then, and the caller only ever
    overwrites the same part)."""

    def __init__(self):
        self._arrays = {}

    def get(self, xp, name, shape, dtype, zero=False):
        shape = tuple(int(x) for x in shape)
        a = self._arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
            self._arrays[name] = a
        return a


def _in_parallel(xp, n, fn, min_chunk=256):
    accel.in_parallel(xp, n, fn, min_chunk)


_LOCAL = threading.local()
_KEPT_WORKSPACES = 2


def _workspace(key):
    """The workspace of the tiling ``key`` for this thread: the filters of successive forwards on
    images of the same size share one (the last _KEPT_WORKSPACES tilings are kept per thread;
    :func:`clear_workspaces` drops them)."""
    cache = getattr(_LOCAL, 'workspaces', None)
    if cache is None:
        cache = _LOCAL.workspaces = collections.OrderedDict()
    ws = cache.pop(key, None) or _Workspace()
    cache[key] = ws
    while len(cache) > _KEPT_WORKSPACES:
        cache.popitem(last=False)
    return ws


def clear_workspaces():
    """Free the kept intermediate arrays of this thread's spatial filters."""
    _LOCAL.workspaces = collections.OrderedDict()


def _buffer(xp, ws, name, shape, dtype, zero=False):
    """A scratch array from the workspace ``ws`` (None: a new one)."""
    if ws is None:
        return xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
    return ws.get(xp, name, shape, dtype, zero)


def _cuda(xp, a):
    """The CUDA kernels for the real array ``a`` (None: use the array code)."""
    if a.dtype not in (np.float32, np.float64):
        return None
    return cuda_kernels.kernels(xp)


def _cuda_mix(ks, xp, kt, xhat, ws=None):
    """The CUDA version of :func:`_tile_mix` with the kernel set ``ks``: kt (O, C, Ph·Pf) the kernel
    transform channel-major (contiguous), xhat (C, T, Ph, Pf) -> (O, T, Ph, Pf)."""
    c, t, ph, pf = xhat.shape
    real = np.empty(0, dtype=xhat.dtype).real.dtype
    out = _buffer(xp, ws, 'mixed_k', (kt.shape[0], t, ph, pf), xhat.dtype)
    # complex arrays go in as they are: the kernel reads them as interleaved (re, im) pairs of REAL
    ks.launch('freq_mix', t * ph * pf, (xp.ascontiguousarray(xhat), kt, out, kt.shape[0], t, ph * pf),
              real, CIN=c)
    return out


class _Tiling:
    """Overlap-save tiling of an H×W image for a k×k bank: ny×nx tiles of th×tw output pixels,
    periods Ph×Pw >= (th + 2p)×(tw + 2p)."""

    def __init__(self, height, width, k):
        self.k = k
        self.p = k // 2
        self.th, self.ph, self.ny = _tile_axis(height, k)
        self.tw, self.pw, self.nx = _tile_axis(width, k)
        self.height, self.width = height, width

    @property
    def pf(self):
        return self.pw // 2 + 1

    def windows(self, xp, a, ws=None):
        """a (N, C, H, W) -> (C, N·ny·nx, Ph, Pw): the input window of every tile (the image
        zero-padded by p; window (i, j) starts at padded row i·th, column j·tw), channel-major.
        Each window receives its part of the image straight from ``a``; the rest of the (kept)
        buffer is zero from its allocation and never written."""
        n, c, h, w = a.shape
        th, tw, ph, pw, p = self.th, self.tw, self.ph, self.pw, self.p
        ks = _cuda(xp, a)
        if ks is not None:
            out = _buffer(xp, ws, 'windows', (c, n, self.ny, self.nx, ph, pw), a.dtype)
            ks.launch('tile_windows', out.size, (xp.ascontiguousarray(a), out, n, c, h, w, self.ny, self.nx,
                                                 th, tw, ph, pw, p), a.dtype)
            return out.reshape(c, n * self.ny * self.nx, ph, pw)
        out = _buffer(xp, ws, 'windows', (c, n, self.ny, self.nx, ph, pw), a.dtype, True)
        at = a.transpose(1, 0, 2, 3)
        boxes = []
        for i in range(self.ny):
            y0, y1 = max(0, i * th - p), min(h, i * th - p + ph)           # image rows of window i
            for j in range(self.nx):
                x0, x1 = max(0, j * tw - p), min(w, j * tw - p + pw)
                if y1 > y0 and x1 > x0:
                    boxes.append((i, j, y0, y1, x0, x1, y0 - (i * th - p), x0 - (j * tw - p)))

        def part(lo, hi):
            for i, j, y0, y1, x0, x1, oy, ox in boxes:
                out[lo:hi, :, i, j, oy:oy + y1 - y0, ox:ox + x1 - x0] = at[lo:hi, :, y0:y1, x0:x1]
        _in_parallel(xp, c, part, min_chunk=1)
        return out.reshape(c, n * self.ny * self.nx, ph, pw)

    def cores(self, xp, a, ws=None):
        """a (N, C, H, W) -> (C, N·ny·nx, th, tw): the output pixels of every tile (zero beyond
        the image), channel-major."""
        n, c, h, w = a.shape
        th, tw = self.th, self.tw
        ks = _cuda(xp, a)
        if ks is not None:
            out = _buffer(xp, ws, 'cores', (c, n, self.ny, self.nx, th, tw), a.dtype)
            ks.launch('tile_cores', out.size, (xp.ascontiguousarray(a), out, n, c, h, w, self.ny, self.nx,
                                               th, tw), a.dtype)
            return out.reshape(c, n * self.ny * self.nx, th, tw)
        pad = _buffer(xp, ws, 'cores_pad', (c, n, self.ny * th, self.nx * tw), a.dtype, True)
        pad[:, :, :h, :w] = a.transpose(1, 0, 2, 3)                     # the rest stays zero
        t = pad.reshape(c, n, self.ny, th, self.nx, tw).transpose(0, 1, 2, 4, 3, 5)
        out = _buffer(xp, ws, 'cores', (c, n, self.ny, self.nx, th, tw), a.dtype)
        out[...] = t
        return out.reshape(c, n * self.ny * self.nx, th, tw)

    def assemble(self, xp, t, n):
        """(O, N·ny·nx, >=th, >=tw) tile outputs -> (N, O, H, W)."""
        o = t.shape[0]
        th, tw, h, w = self.th, self.tw, self.height, self.width
        out = xp.empty((n, o, h, w), dtype=t.dtype)
        ks = _cuda(xp, t)
        if ks is not None:
            t = xp.ascontiguousarray(t)
            ks.launch('tile_assemble', out.size, (t, out, n, o, h, w, self.ny, self.nx, th, tw,
                                                  t.shape[-2], t.shape[-1]), t.dtype)
            return out
        t = t.reshape(o, n, self.ny, self.nx, t.shape[-2], t.shape[-1])

        def part(lo, hi):
            for i in range(self.ny):
                rows = min(th, h - i * th)
                for j in range(self.nx):
                    cols = min(tw, w - j * tw)
                    if rows > 0 and cols > 0:
                        out[:, lo:hi, i * th:i * th + rows, j * tw:j * tw + cols] = \
                            t[lo:hi, :, i, j, :rows, :cols].transpose(1, 0, 2, 3)
        _in_parallel(xp, o, part, min_chunk=1)
        return out

    def rfft(self, xp, a):
        """rfft2 over the last two axes on the Ph×Pw period (zero-padding smaller tiles)."""
        return _fft(xp).rfft2(a, s=(self.ph, self.pw), axes=(-2, -1), **_fft_options(xp))

    def irfft(self, xp, a, overwrite=False):
        """Inverse of :meth:`rfft`; ``overwrite``: ``a`` is scratch (saves a copy on NumPy)."""
        opts = _fft_options(xp)
        if overwrite and opts:
            opts['overwrite_x'] = True
        return _fft(xp).irfft2(a, s=(self.ph, self.pw), axes=(-2, -1), **opts)


def _tap_dft(xp, k, period, nfreq, cdtype, offset):
    """(k, nfreq): exp(-2πi·pos(j)·f/period) for the k taps j placed at pos(j) = (offset - j) mod
    period (the phase reduced exactly in integers before the float64 exponential)."""
    pos = (offset - np.arange(k)) % period
    phase = np.outer(pos, np.arange(nfreq)) % period
    return xp.asarray(np.exp(-2j * np.pi * phase / period).astype(cdtype))


def _bank_transform(weights, ph, pw, offset):
    """rfft2 of the bank with tap (ky, kx) at ((offset - ky) mod Ph, (offset - kx) mod Pw),
    frequency-major (Ph, Pw//2+1, O, C).  Only k rows and k columns of the padded bank are
    non-zero, so the 2-D DFT is two small products with partial DFT matrices (along x, then along
    y into the frequency-major layout) instead of O·C full transforms."""
    xp = backend.get_array_module(weights)
    k = _check_weights(weights)
    pf = pw // 2 + 1
    o, c = weights.shape[:2]
    cdtype = np.result_type(weights.dtype, np.complex64)
    ex = _tap_dft(xp, k, pw, pf, cdtype, offset)                       # (kx, Pf)
    ey = _tap_dft(xp, k, ph, ph, cdtype, offset).T                     # (Ph, ky)
    kx = xp.matmul(weights.astype(cdtype).reshape(o * c * k, k), ex)   # (O·C·ky, Pf)
    kx = xp.ascontiguousarray(kx.reshape(o, c, k, pf).transpose(2, 3, 0, 1)).reshape(k, pf * o * c)
    return xp.matmul(ey, kx).reshape(ph, pf, o, c)


def kernel_transform(weights, height, width):
    """rfft2 of the bank placed for circular convolution on the whole-image grid
    :func:`_fft_grid`, frequency-major: (Ph, Pw//2+1, O, C).

    out[y] = Σ_ky W[ky] q[y + ky - p] = Σ_j h[j] q[y - j] with h[j] = W[p - j]: tap ky sits at
    (p - ky) mod P."""
    k = _check_weights(weights)
    ph, pw = _fft_grid(height, width, k)
    return _bank_transform(weights, ph, pw, k // 2)


def _fft(xp):
    """The FFT module: scipy.fft for NumPy arrays (several times faster than numpy.fft on float32),
    else the array module's own (cupy.fft)."""
    if xp.__name__ == 'numpy':
        try:
            import scipy.fft
            return scipy.fft
        except ImportError:  # pragma: no cover - scipy is a dependency
            pass
    return xp.fft


def _fft_options(xp):
    """scipy.fft runs its transforms on all CPU cores (workers); cupy.fft takes no such option."""
    if xp.__name__ == 'numpy' and _fft(xp) is not np.fft:
        return {'workers': os.cpu_count() or 1}
    return {}


def _rfft(xp, a, ph, pw):
    return _fft(xp).rfft2(a, s=(ph, pw), axes=(2, 3), **_fft_options(xp))


def _irfft(xp, a, ph, pw, h, w, dtype):
    full = _fft(xp).irfft2(a, s=(ph, pw), axes=(2, 3), **_fft_options(xp))
    return xp.ascontiguousarray(full[:, :, :h, :w]).astype(dtype, copy=False)


def _freq_major(xp, khat):
    """Kernel transform (Ph, Pf, O, C) as (F, O, C)."""
    ph, pf, o, c = khat.shape
    return khat.reshape(ph * pf, o, c)


def _freq_mix(xp, kf, xhat, adjoint=False):
    """Per frequency f: kf[f] (out, in) @ xhat[:, :, f] (in, N), or with ``adjoint`` the conjugate
    transpose kf[f]^H (in, out) @ xhat[:, :, f] (out, N), computed as conj(kf[f]^T conj(x̂)) so
    that no conjugated copy of the kernel transform is kept.  xhat (N, ·, Ph, Pf)."""
    n, cin, ph, pf = xhat.shape
    xf = xhat.reshape(n, cin, ph * pf).transpose(2, 1, 0)             # (F, ·, N)
    if adjoint:
        yf = xp.conj(xp.matmul(kf.transpose(0, 2, 1), xp.conj(xf)))   # (F, C, N)
    else:
        yf = xp.matmul(kf, xf)                                         # (F, O, N)
    return yf.transpose(2, 1, 0).reshape(n, yf.shape[1], ph, pf)


def _transpose2(xp, a, out=None):
    """(R, S) -> contiguous (S, R) (into ``out`` when given).  NumPy with R > S: in blocks of 64
    rows (a plain transposing copy of a tall array strides through memory and is several times
    slower)."""
    r, s = a.shape
    if out is None:
        out = xp.empty((s, r), dtype=a.dtype)
    if xp.__name__ != 'numpy' or r <= s:
        out[...] = a.T
        return out
    for i in range(0, r, 64):
        out[:, i:i + 64] = a[i:i + 64].T
    return out


def _freq_first(xp, ahat, ws=None, name='freq'):
    """(C, T, Ph, Pf) tile transforms -> frequency-major (F, C, T)."""
    c, t, ph, pf = ahat.shape
    out = _buffer(xp, ws, name, (ph * pf, c * t), ahat.dtype)
    a = ahat.reshape(c * t, ph * pf)
    _in_parallel(xp, ph * pf, lambda lo, hi: _transpose2(xp, a[:, lo:hi], out[lo:hi]))
    return out.reshape(ph * pf, c, t)


def _tile_mix(xp, kf, xhat, ws=None):
    """Per frequency: kf[f] (O, C) @ the C×tiles transforms.  xhat (C, T, Ph, Pf) -> (O, T, Ph, Pf)
    (transpose to frequency-major, batched products, transpose back; split over frequencies)."""
    c, t, ph, pf = xhat.shape
    o = kf.shape[1]
    nf = ph * pf
    xf = _buffer(xp, ws, 'freq', (nf, c, t), xhat.dtype)
    yf = _buffer(xp, ws, 'mix', (nf, o, t), xhat.dtype)
    out = _buffer(xp, ws, 'mixed', (o * t, nf), xhat.dtype)
    a = xhat.reshape(c * t, nf)

    def part(lo, hi):
        _transpose2(xp, a[:, lo:hi], xf.reshape(nf, c * t)[lo:hi])
        xp.matmul(kf[lo:hi], xf[lo:hi], out=yf[lo:hi])
        _transpose2(xp, yf[lo:hi].reshape(hi - lo, o * t), out[:, lo:hi])
    _in_parallel(xp, nf, part)
    return out.reshape(o, t, ph, pf)


def _tile_corr(xp, qhat, ghat, ws=None):
    """Σ over the tiles (of all images) of ĝ[f] conj(q̂[f])ᵀ: (F, O, C) per frequency.  qhat
    (C, T, Ph, Pf) of the tile cores, ghat (O, T, Ph, Pf) of the windows."""
    gf = _freq_first(xp, ghat, ws, 'freq')                             # (F, O, T)
    qf = xp.conj(_freq_first(xp, qhat, ws, 'freq2'))                   # (F, C, T)
    return xp.matmul(gf, qf.transpose(0, 2, 1))


def _partial_inverse_weights(xp, k, ph, pw, cdtype, lags=None):
    """Inverse-DFT rows for the given lags only (default -p..p): A (k, Ph) along y (full spectrum)
    and B (Pf, k) along x (half spectrum, irfft's weights: 1 for DC and Nyquist, 2 otherwise)."""
    p = k // 2
    lags = np.arange(k) - p if lags is None else np.asarray(lags)
    fy = np.arange(ph)
    A = np.exp(2j * np.pi * (np.outer(lags, fy) % ph) / ph) / ph
    pf = pw // 2 + 1
    fx = np.arange(pf)
    wx = np.full(pf, 2.0)
    wx[0] = 1.0
    if pw % 2 == 0:
        wx[-1] = 1.0
    B = (wx[:, None] * np.exp(2j * np.pi * (np.outer(fx, lags) % pw) / pw)) / pw
    return xp.asarray(A.astype(cdtype)), xp.asarray(B.astype(cdtype))


def _corr_to_weight_grad(xp, r, tiling, dtype):
    """r (F, O, C) = Σ ĝ conj(q̂) over the tiles -> dW (O, C, k, k).  The correlation
    Σ_s q_core[s] g_window[s + L] at the lags L = 0..k-1 (no wrap-around: s + L < Ph) is
    dW[.., ky, kx] at L = 2p - ky, 2p - kx; two small products (a partial inverse DFT)."""
    k = tiling.k
    ph, pw, pf = tiling.ph, tiling.pw, tiling.pf
    o, c = r.shape[1:]
    lags = 2 * tiling.p - np.arange(k)
    A, B = _partial_inverse_weights(xp, k, ph, pw, r.dtype, lags)
    t = xp.matmul(A, r.reshape(ph, pf * o * c)).reshape(k, pf, o * c)  # inverse along y
    corr = xp.matmul(B.T[None], t).real                                # (k, k, O·C): along x
    return xp.ascontiguousarray(corr.reshape(k, k, o, c).transpose(2, 3, 0, 1)).astype(dtype, copy=False)


# rows of the frequency grid per block of the weight gradient (bounds its (rows, Pf, O, C) buffer)
_WGRAD_BLOCK_BYTES = 32 << 20


def fft_weight_grad_from_hats(xp, qhat, ghat, k, ph, pw, dtype):
    """dW from the whole-image transforms (:func:`_fft_grid`) of q (N, C, ...) and g (N, O, ...):
    the circular cross-correlation corr[o, c, l] = Σ_{n,y} g[n, o, y] q[n, c, y + l] at the k×k lags
    |l| <= p only, as two small matrix products (a partial inverse DFT) instead of O·C full inverse
    transforms; the per-frequency sums are formed block by block of frequency rows.  ``qhat`` and
    ``ghat`` may also be lists of such arrays (concatenated along N block by block)."""
    qs = list(qhat) if isinstance(qhat, (list, tuple)) else [qhat]
    gs = list(ghat) if isinstance(ghat, (list, tuple)) else [ghat]
    n = sum(int(a.shape[0]) for a in qs)
    c, _, pf = qs[0].shape[1:]
    o = gs[0].shape[1]
    cdtype = np.result_type(qs[0].dtype, gs[0].dtype)
    A, B = _partial_inverse_weights(xp, k, ph, pw, cdtype)
    rows = max(1, min(ph, _WGRAD_BLOCK_BYTES // max(1, pf * o * c * np.dtype(cdtype).itemsize)))
    t = None
    for y0 in range(0, ph, rows):
        y1 = min(ph, y0 + rows)
        gb = xp.concatenate([a[:, :, y0:y1] for a in gs], axis=0) if len(gs) > 1 else gs[0][:, :, y0:y1]
        qb = xp.concatenate([a[:, :, y0:y1] for a in qs], axis=0) if len(qs) > 1 else qs[0][:, :, y0:y1]
        gb = xp.conj(gb).transpose(2, 3, 1, 0).reshape((y1 - y0) * pf, o, n)
        qb = qb.transpose(2, 3, 0, 1).reshape((y1 - y0) * pf, n, c)
        r = xp.matmul(gb, qb).reshape(y1 - y0, pf * o * c)            # Σ_n conj(ĝ) q̂ on these rows
        part = xp.matmul(A[:, y0:y1], r)                               # inverse along y at k lags
        t = part if t is None else t + part
    corr = xp.matmul(B.T[None], t.reshape(k, pf, o * c)).real          # (k, k, O·C): along x, real part
    return xp.ascontiguousarray(corr.reshape(k, k, o, c).transpose(2, 3, 0, 1)).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
class SpatialFilter:
    """The spatial operator S for a fixed bank ``weights`` (O, C, k, k) on H×W images.

    ``method`` 'auto' | 'direct' | 'fft'.  With FFT the kernel transforms (of the bank and of
    its flipped transpose) are computed here once, for the tile periods, and reused by every
    call.  All maps take batched (N, ·, H, W) arrays.
    """

    def __init__(self, weights, height, width, method='auto'):
        self.xp = backend.get_array_module(weights)
        self.k = _check_weights(weights)
        self.weights = weights
        self.height, self.width = int(height), int(width)
        self.num_out, self.num_in = int(weights.shape[0]), int(weights.shape[1])
        if method == 'auto':
            method = choose_method(self.num_in, self.num_out, self.k, self.height, self.width)
        if method not in ('direct', 'fft'):
            raise ValueError("method must be 'auto', 'direct' or 'fft', got %r" % (method,))
        self.method = method
        self.tiling = _Tiling(self.height, self.width, self.k)
        self.grid = (self.tiling.ph, self.tiling.pw)
        self._kf = self._kf_adj_cache = None
        self._kt = {}                      # channel-major copies of the kernel transforms (CUDA mixing)
        t = self.tiling
        self._ws = _workspace((self.xp.__name__, t.th, t.tw, t.ph, t.pw, t.ny, t.nx))
        if method == 'fft':
            # correlation on a window: tap ky at (-ky) mod Ph
            ph, pw = self.grid
            self._kf = _freq_major(self.xp, _bank_transform(weights, ph, pw, 0))

    @property
    def _kf_adj(self):
        """Kernel transform of Sᵀ, the correlation with the flipped, transposed bank (made on the
        first adjoint)."""
        if self._kf_adj_cache is None:
            xp = self.xp
            ph, pw = self.grid
            flipped = xp.ascontiguousarray(self.weights[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            self._kf_adj_cache = _freq_major(xp, _bank_transform(flipped, ph, pw, 0))
        return self._kf_adj_cache

    # radius of interaction in pixels (Chebyshev distance), used by the rounding schedule
    @property
    def interaction_radius(self):
        return self.k // 2

    def has_self_interaction(self):
        """True when the pixel-with-itself block (centre taps, symmetric part) is non-zero."""
        xp = self.xp
        if self.num_in != self.num_out:
            return True
        c = self.weights[:, :, self.k // 2, self.k // 2]
        return bool(xp.any((c + c.T) != 0))

    def _check(self, a, channels):
        if a.ndim != 4 or a.shape[1] != channels or a.shape[2:] != (self.height, self.width):
            raise ValueError('expected (N, %d, %d, %d), got %s' % (channels, self.height, self.width, a.shape))

    def _channel_major(self, kf):
        """kf (Ph·Pf, O, C) as (O, C, Ph·Pf) for the CUDA mixing (one copy per transform, kept)."""
        key = id(kf)
        if key not in self._kt:
            self._kt[key] = (kf, self.xp.ascontiguousarray(kf.transpose(1, 2, 0)))
        return self._kt[key][1]

    def _tiled(self, kf, ahat, n, dtype):
        xp, t = self.xp, self.tiling
        ks = cuda_kernels.kernels(xp)
        if ks is not None and ahat.shape[0] <= cuda_kernels.MAX_MIX_CHANNELS and ahat.dtype == kf.dtype:
            mixed = _cuda_mix(ks, xp, self._channel_major(kf), ahat, self._ws)
        else:
            mixed = _tile_mix(xp, kf, ahat, self._ws)
        return t.assemble(xp, t.irfft(xp, mixed, overwrite=True), n).astype(dtype, copy=False)

    def apply(self, q):
        """S(q): (N, C, H, W) -> (N, O, H, W)."""
        self._check(q, self.num_in)
        if self.method == 'direct':
            return direct_apply(q, self.weights)
        xp, t = self.xp, self.tiling
        return self._tiled(self._kf, t.rfft(xp, t.windows(xp, q, self._ws)), q.shape[0], q.dtype)

    def adjoint(self, g):
        """Sᵀ(g): (N, O, H, W) -> (N, C, H, W)."""
        self._check(g, self.num_out)
        if self.method == 'direct':
            return direct_adjoint(g, self.weights)
        xp, t = self.xp, self.tiling
        return self._tiled(self._kf_adj, t.rfft(xp, t.windows(xp, g, self._ws)), g.shape[0], g.dtype)

    def _corr(self, q, ghat):
        """Σ over images and tiles of ĝ conj(q̂) per frequency, q̂ of the tile cores of q."""
        xp, t = self.xp, self.tiling
        return _tile_corr(xp, t.rfft(xp, t.cores(xp, q, self._ws)), ghat, self._ws)

    def weight_grad(self, q, g):
        """d<g, S(q)>/dW: q (N, C, H, W), g (N, O, H, W) -> (O, C, k, k)."""
        self._check(q, self.num_in)
        self._check(g, self.num_out)
        if self.method == 'direct':
            return direct_weight_grad(q, g, self.k)
        xp, t = self.xp, self.tiling
        r = self._corr(q, t.rfft(xp, t.windows(xp, g, self._ws)))
        return _corr_to_weight_grad(xp, r, t, np.result_type(q.dtype, g.dtype))

    param_grad = weight_grad

    def backward(self, q, g):
        """(Sᵀ g, d<g, S(q)>/dW), sharing the transform of g on the FFT path."""
        dq, token = self.backward_deferred(q, g)
        return dq, self.param_grad_deferred([token])

    def backward_deferred(self, q, g):
        """(Sᵀ g, token): the parameter gradient of this pair is left for :meth:`param_grad_deferred`,
        which sums the tokens of several calls (e.g. all PGD steps) and finishes them in one pass.
        On the FFT path the token is the per-frequency sum of ĝ conj(q̂) over the tiles ((F, O, C));
        :meth:`merge_deferred` adds tokens up as they come, so one is kept.  The transform of g is
        shared with the adjoint."""
        self._check(q, self.num_in)
        self._check(g, self.num_out)
        if self.method == 'direct':
            return direct_adjoint(g, self.weights), (q, g)
        xp, t = self.xp, self.tiling
        ghat = t.rfft(xp, t.windows(xp, g, self._ws))
        dq = self._tiled(self._kf_adj, ghat, g.shape[0], g.dtype)
        return dq, (self._corr(q, ghat), np.result_type(q.dtype, g.dtype))

    def merge_deferred(self, tokens):
        """[one token] equivalent to ``tokens`` (FFT path: summed into the first, in place)."""
        if self.method == 'direct' or len(tokens) < 2:
            return list(tokens)
        r, dtype = tokens[0]
        for tok in tokens[1:]:
            r += tok[0]
            dtype = np.result_type(dtype, tok[1])
        return [(r, dtype)]

    def param_grad_deferred(self, tokens):
        """Σ over the tokens of :meth:`backward_deferred` of d<g, S(q)>/dW: (O, C, k, k)."""
        xp = self.xp
        if self.method == 'direct':
            return direct_weight_grad(xp.concatenate([t[0] for t in tokens], axis=0),
                                      xp.concatenate([t[1] for t in tokens], axis=0), self.k)
        r, dtype = tokens[0]
        for tok in tokens[1:]:
            r = r + tok[0]
            dtype = np.result_type(dtype, tok[1])
        return _corr_to_weight_grad(xp, r, self.tiling, dtype)


def spatial_filter(q, weights, method='auto'):
    """One-shot S(q) (builds a :class:`SpatialFilter`)."""
    return SpatialFilter(weights, q.shape[2], q.shape[3], method).apply(q)


def spatial_filter_adjoint(g, weights, method='auto'):
    return SpatialFilter(weights, g.shape[2], g.shape[3], method).adjoint(g)


def spatial_filter_weight_grad(q, g, k, method='auto'):
    """Filter gradient without a bank (the FFT path needs no weights for it)."""
    xp = backend.get_array_module(q, g)
    n, c, h, w = q.shape
    if method == 'auto':
        method = choose_method(c, g.shape[1], k, h, w)
    if method == 'direct':
        return direct_weight_grad(q, g, k)
    t = _Tiling(h, w, k)
    r = _tile_corr(xp, t.rfft(xp, t.cores(xp, q)), t.rfft(xp, t.windows(xp, g)))
    return _corr_to_weight_grad(xp, r, t, np.result_type(q.dtype, g.dtype))
