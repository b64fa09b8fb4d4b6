"""Leaky projection onto the probability simplex (paper Alg. 2, eq. 12) and its VJP (eq. 13).

Per pixel, over the L values ``v`` along ``axis`` (Caffe's rule, float arithmetic in the
input dtype with a sequential running sum):

1. sort descending v(1) >= ... >= v(L);
2. for r = 1..L-1: t_r = (v(1)+...+v(r) - 1)/r; the FIRST r with t_r >= v(r+1) gives t = t_r, rho = r;
3. if none stops: t = (v(1)+...+v(L) - 1)/L, rho = L ("all active");
4. out = v - t where v - t > 0, else leak·(v - t).

leak = 0 is the exact Euclidean projection (Chen & Ye); leak > 0 is the paper's f_alpha.
"""
from collections import namedtuple

import numpy as np

from .. import backend
from . import accel, cuda_kernels

ProjectionInfo = namedtuple('ProjectionInfo', ['tau', 'rho'])
ProjectionInfo.__doc__ = """What the VJP needs besides the input: ``tau`` (the threshold t) and ``rho``
(the stop index r, = L when the loop did not stop), both with the projection axis kept as size 1."""


def simplex_threshold(s, axis=0):
    """(tau, rho) of Caffe's rule along ``axis``; both keep ``axis`` with size 1 (rho is int32)."""
    xp = backend.get_array_module(s)
    v = xp.moveaxis(s, axis, -1)
    L = v.shape[-1]
    srt = xp.flip(xp.sort(v, axis=-1), axis=-1)                        # descending
    csum = xp.cumsum(srt, axis=-1)                                     # sequential, as Caffe's loop
    r = xp.arange(1, L + 1, dtype=s.dtype)
    tau_r = (csum - 1) / r                                             # t_r for r = 1..L
    if L > 1:
        stop = tau_r[..., :-1] >= srt[..., 1:]                         # r = 1..L-1
        any_stop = xp.any(stop, axis=-1)
        first = xp.argmax(stop, axis=-1)                               # first True (0 if none)
        rho = xp.where(any_stop, first + 1, L).astype(xp.int32)
    else:
        rho = xp.ones(v.shape[:-1], dtype=xp.int32)
    tau = xp.take_along_axis(tau_r, (rho - 1)[..., None].astype(xp.int64), axis=-1)
    rho = rho[..., None]
    return xp.moveaxis(tau, -1, axis), xp.moveaxis(rho, -1, axis)


def _three_axes(shape, axis):
    """(A, L, B) of ``shape`` with the projection axis in the middle."""
    axis = axis % len(shape)
    a = int(np.prod(shape[:axis], dtype=np.int64))
    return a, int(shape[axis]), int(np.prod(shape[axis + 1:], dtype=np.int64))


def _compiled(xp, s, axis=None):
    """The compiled kernels for float NumPy arrays (None: use the array code)."""
    K = accel.kernels(xp)
    if K is None or s.dtype not in (np.float32, np.float64) or s.ndim == 0:
        return None
    return K


def _kept_shape(shape, axis):
    axis = axis % len(shape)
    return shape[:axis] + (1,) + shape[axis + 1:]


def leaky_apply(s, tau, leak):
    """Step 4 given the threshold: z = s - tau; z if z > 0 else leak·z."""
    xp = backend.get_array_module(s)
    K = _compiled(xp, s)
    if K is not None and tau.ndim == s.ndim:
        axes = [i for i in range(s.ndim) if tau.shape[i] != s.shape[i]]
        if len(axes) == 1 and tau.shape[axes[0]] == 1:
            A, L, B = _three_axes(s.shape, axes[0])
            s3 = np.ascontiguousarray(s).reshape(A, L, B)
            out = np.empty_like(s3)
            K.simplex_leaky_apply(s3, np.ascontiguousarray(tau, dtype=s.dtype).reshape(A, B), s.dtype.type(leak), out)
            return out.reshape(s.shape)
    z = s - tau
    return xp.where(z > 0, z, z * s.dtype.type(leak))


def _threshold_split(s, axis):
    """simplex_threshold of a large NumPy array in pieces along another axis, one thread per core
    (the sort and the scans release the GIL)."""
    xp = backend.get_array_module(s)
    axis = axis % s.ndim
    other = [i for i in range(s.ndim) if i != axis and s.shape[i] > 1]
    if xp is not np or not other or s.size < (1 << 16):
        return simplex_threshold(s, axis)
    split = max(other, key=lambda i: s.shape[i])
    kept = _kept_shape(s.shape, axis)
    tau = np.empty(kept, dtype=s.dtype)
    rho = np.empty(kept, dtype=np.int32)

    def part(lo, hi):
        idx = tuple(slice(lo, hi) if i == split else slice(None) for i in range(s.ndim))
        t, r = simplex_threshold(s[idx], axis)
        tau[idx], rho[idx] = t, r
    accel.in_parallel(xp, s.shape[split], part, min_chunk=1)
    return tau, rho


def _cuda(xp, s, axis):
    """The CUDA kernels for ``s`` (None: use the array code)."""
    if s.ndim == 0 or s.dtype not in (np.float32, np.float64) or \
            s.shape[axis] > cuda_kernels.MAX_PROJECT_LABELS:
        return None
    return cuda_kernels.kernels(xp)


def project_simplex(s, leak, axis=0):
    """Leaky simplex projection of ``s`` along ``axis``. Returns (out, ProjectionInfo)."""
    xp = backend.get_array_module(s)
    ks = _cuda(xp, s, axis)
    if ks is not None:                           # one thread per pixel sorts its L values
        A, L, B = _three_axes(s.shape, axis)
        s3 = xp.ascontiguousarray(s).reshape(A, L, B)
        out = xp.empty_like(s3)
        tau = xp.empty((A, B), dtype=s.dtype)
        rho = xp.empty((A, B), dtype=np.int32)
        ks.launch('simplex_project', A * B, (s3, out, tau, rho, float(leak), A, L, B), s.dtype, LMAX=L)
        kept = _kept_shape(s.shape, axis)
        return out.reshape(s.shape), ProjectionInfo(tau.reshape(kept), rho.reshape(kept))
    tau, rho = _threshold_split(s, axis)
    return leaky_apply(s, tau, leak), ProjectionInfo(tau, rho)


def project_simplex_vjp(g, s, info, leak, axis=0):
    """Jᵀg of the leaky projection at ``s`` (eq. 13, Caffe's backward).

    a_c = 1 if s_c > t else leak;  dt/ds_c = 1/rho if s_c > t, 0 otherwise, or 1/L for every c when
    the loop did not stop (rho = L);  (Jᵀg)_c = a_c·g_c - dt/ds_c · Σ_j a_j·g_j.
    """
    xp = backend.get_array_module(s, g)
    L = s.shape[axis]
    dt = s.dtype.type
    ks = _cuda(xp, s, axis)
    if ks is not None and g.shape == s.shape:
        A, _, B = _three_axes(s.shape, axis)
        out = xp.empty(s.shape, dtype=s.dtype)
        ks.launch('simplex_vjp', A * B, (xp.ascontiguousarray(g, dtype=s.dtype), xp.ascontiguousarray(s),
                                         xp.ascontiguousarray(info.tau, dtype=s.dtype),
                                         xp.ascontiguousarray(info.rho, dtype=np.int32), float(leak), out,
                                         A, L, B), s.dtype)
        return out
    K = _compiled(xp, s)
    if K is not None and g.shape == s.shape:
        A, _, B = _three_axes(s.shape, axis)
        s3 = np.ascontiguousarray(s).reshape(A, L, B)
        g3 = np.ascontiguousarray(g, dtype=s.dtype).reshape(A, L, B)
        out = np.empty_like(s3)
        K.simplex_vjp(g3, s3, np.ascontiguousarray(info.tau, dtype=s.dtype).reshape(A, B),
                      np.ascontiguousarray(info.rho, dtype=np.int32).reshape(A, B), dt(leak),
                      np.arange(1, L + 1).astype(s.dtype), out)
        return out.reshape(s.shape)
    active = s > info.tau
    a = xp.where(active, dt(1), dt(leak))
    ag = a * g
    total = xp.sum(ag, axis=axis, keepdims=True)
    inv_rho = dt(1) / info.rho.astype(s.dtype)
    dtau = xp.where(info.rho == L, dt(1) / dt(L), xp.where(active, inv_rho, dt(0)))
    return ag - dtau * total
