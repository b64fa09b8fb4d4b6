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
* FFT: the linear correlation is a circular one on a grid padded to
  (H + p, W + p) (rounded up to a 2/3/5/7-smooth size), so
  ``S(q) = crop(irfft2(K̂ · rfft2(q)))`` with one complex (O×C) product per
  frequency.  The kernel transform K̂ is computed once per :class:`SpatialFilter`
  and reused by every apply/adjoint of all T steps and the backward pass.

``method='auto'`` picks the cheaper one from a flop estimate (FFT for large k·C).
Everything runs on NumPy or CuPy (``xp.fft``); the dtype of the inputs is kept
(float32 → complex64 transforms, float64 → complex128).
"""
import math

from .. import backend

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
    ph, pw = _fft_grid(height, width, k)
    pts = ph * pw
    ffts = (num_in + num_out) * batch * _FFT_COST * pts * math.log2(max(pts, 2))
    products = 8.0 * num_in * num_out * batch * ph * (pw // 2 + 1)
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
def _fft_grid(h, w, k):
    # a period of at least size + p keeps the wrap-around in the zero padding; at least k keeps the
    # k taps on distinct grid points
    p = k // 2
    return _good_size(max(h + p, k)), _good_size(max(w + p, k))


def kernel_transform(weights, height, width):
    """rfft2 of the bank placed for circular convolution on the padded grid, frequency-major:
    (Ph, Pw//2+1, O, C) (the layout of the per-frequency products)."""
    xp = backend.get_array_module(weights)
    k = _check_weights(weights)
    p = k // 2
    ph, pw = _fft_grid(height, width, k)
    o, c = weights.shape[:2]
    # out[y] = Σ_ky W[ky] q[y + ky - p] = Σ_j h[j] q[y - j] with h[j] = W[p - j]: tap ky at (p - ky) mod P
    kern = xp.zeros((ph, pw, o, c), dtype=weights.dtype)
    iy = (p - xp.arange(k)) % ph
    ix = (p - xp.arange(k)) % pw
    kern[iy[:, None], ix[None, :]] = weights.transpose(2, 3, 0, 1)
    return _fft(xp).rfft2(kern, axes=(0, 1))


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


def _rfft(xp, a, ph, pw):
    return _fft(xp).rfft2(a, s=(ph, pw), axes=(2, 3))


def _irfft(xp, a, ph, pw, h, w, dtype):
    return xp.ascontiguousarray(_fft(xp).irfft2(a, s=(ph, pw), axes=(2, 3))[:, :, :h, :w]).astype(dtype, copy=False)


def _freq_major(xp, khat, conj=False):
    """Kernel transform (Ph, Pf, O, C) as (F, O, C), or conjugated and transposed (F, C, O)."""
    ph, pf, o, c = khat.shape
    kf = khat.reshape(ph * pf, o, c)
    if conj:
        return xp.ascontiguousarray(xp.conj(kf).transpose(0, 2, 1))
    return kf


def _freq_mix(xp, kf, xhat):
    """Per frequency f: kf[f] (out, in) @ xhat[:, :, f] (in, N).  xhat (N, in, Ph, Pf) -> (N, out, Ph, Pf)."""
    n, cin, ph, pf = xhat.shape
    xf = xhat.reshape(n, cin, ph * pf).transpose(2, 1, 0)             # (F, in, N)
    yf = xp.matmul(kf, xf)                                             # (F, out, N)
    return yf.transpose(2, 1, 0).reshape(n, kf.shape[1], ph, pf)


def _partial_inverse_weights(xp, k, ph, pw, cdtype):
    """Inverse-DFT rows for the lags l = -p..p only: A (k, Ph) along y (full spectrum) and
    B (Pf, k) along x (half spectrum, irfft's weights: 1 for DC and Nyquist, 2 otherwise)."""
    import numpy as np
    p = k // 2
    lags = np.arange(k) - p
    fy = np.arange(ph)
    A = np.exp(2j * np.pi * np.outer(lags, fy) / ph) / ph
    pf = pw // 2 + 1
    fx = np.arange(pf)
    wx = np.full(pf, 2.0)
    wx[0] = 1.0
    if pw % 2 == 0:
        wx[-1] = 1.0
    B = (wx[:, None] * np.exp(2j * np.pi * np.outer(fx, lags) / pw)) / pw
    return xp.asarray(A.astype(cdtype)), xp.asarray(B.astype(cdtype))


def fft_weight_grad_from_hats(xp, qhat, ghat, k, ph, pw, dtype):
    """dW from the transforms of q (N, C, ...) and g (N, O, ...): the circular cross-correlation
    corr[o, c, l] = Σ_{n,y} g[n, o, y] q[n, c, y + l] at the k×k lags |l| <= p only, as two small
    matrix products (a partial inverse DFT) instead of O·C full inverse transforms."""
    n, c, _, pf = qhat.shape
    o = ghat.shape[1]
    gf = xp.conj(ghat).reshape(n, o, ph * pf).transpose(2, 1, 0)      # (F, O, N)
    qf = qhat.reshape(n, c, ph * pf).transpose(2, 0, 1)               # (F, N, C)
    r = xp.matmul(gf, qf).reshape(ph, pf * o * c)                     # Σ_n conj(ĝ) q̂, (Ph, Pf·O·C)
    A, B = _partial_inverse_weights(xp, k, ph, pw, r.dtype)
    t = xp.matmul(A, r).reshape(k, pf, o * c)                          # inverse along y at k lags
    corr = xp.matmul(B.T[None], t).real                                # (k, k, O·C): along x, real part
    return xp.ascontiguousarray(corr.reshape(k, k, o, c).transpose(2, 3, 0, 1)).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
class SpatialFilter:
    """The spatial operator S for a fixed bank ``weights`` (O, C, k, k) on H×W images.

    ``method`` 'auto' | 'direct' | 'fft'.  With FFT the kernel transform is computed
    here once and reused by every call.  All maps take batched (N, ·, H, W) arrays.
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
        self.grid = _fft_grid(self.height, self.width, self.k)
        self._kf = self._kf_adj = None
        if method == 'fft':
            khat = kernel_transform(weights, self.height, self.width)
            self._kf = _freq_major(self.xp, khat)
            self._kf_adj = _freq_major(self.xp, khat, conj=True)

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

    def apply(self, q):
        """S(q): (N, C, H, W) -> (N, O, H, W)."""
        self._check(q, self.num_in)
        if self.method == 'direct':
            return direct_apply(q, self.weights)
        xp = self.xp
        ph, pw = self.grid
        yhat = _freq_mix(xp, self._kf, _rfft(xp, q, ph, pw))
        return _irfft(xp, yhat, ph, pw, self.height, self.width, q.dtype)

    def adjoint(self, g):
        """Sᵀ(g): (N, O, H, W) -> (N, C, H, W)."""
        self._check(g, self.num_out)
        if self.method == 'direct':
            return direct_adjoint(g, self.weights)
        xp = self.xp
        ph, pw = self.grid
        yhat = _freq_mix(xp, self._kf_adj, _rfft(xp, g, ph, pw))
        return _irfft(xp, yhat, ph, pw, self.height, self.width, g.dtype)

    def weight_grad(self, q, g):
        """d<g, S(q)>/dW: q (N, C, H, W), g (N, O, H, W) -> (O, C, k, k)."""
        self._check(q, self.num_in)
        self._check(g, self.num_out)
        if self.method == 'direct':
            return direct_weight_grad(q, g, self.k)
        xp = self.xp
        ph, pw = self.grid
        return fft_weight_grad_from_hats(xp, _rfft(xp, q, ph, pw), _rfft(xp, g, ph, pw), self.k, ph, pw, q.dtype)

    param_grad = weight_grad

    def backward(self, q, g):
        """(Sᵀ g, d<g, S(q)>/dW), sharing the transform of g on the FFT path."""
        if self.method == 'direct':
            return direct_adjoint(g, self.weights), direct_weight_grad(q, g, self.k)
        self._check(q, self.num_in)
        self._check(g, self.num_out)
        xp = self.xp
        ph, pw = self.grid
        ghat = _rfft(xp, g, ph, pw)
        dq = _irfft(xp, _freq_mix(xp, self._kf_adj, ghat), ph, pw, self.height, self.width, g.dtype)
        dw = fft_weight_grad_from_hats(xp, _rfft(xp, q, ph, pw), ghat, self.k, ph, pw, q.dtype)
        return dq, dw


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
    ph, pw = _fft_grid(h, w, k)
    return fft_weight_grad_from_hats(xp, _rfft(xp, q, ph, pw), _rfft(xp, g, ph, pw), k, ph, pw, q.dtype)
