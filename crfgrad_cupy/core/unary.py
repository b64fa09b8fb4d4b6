"""Unary potentials of CRF-Grad (paper eq. 3): psi = -w · log(z + eps), elementwise.

``z`` is any array of class probabilities (N, L, H, W), ``w`` a scalar (the unary weight w_u,
Caffe blob (1, 1, 1, 1)), ``eps`` the log epsilon.  z + eps must be > 0.
"""
from .. import backend


def _scalar(xp, w, dtype):
    return xp.asarray(w, dtype=dtype).reshape(())


def unary(z, w, eps):
    """psi = -w·log(z + eps), computed as Caffe: (z + eps) -> log -> × (-w)."""
    xp = backend.get_array_module(z)
    dt = z.dtype.type
    return xp.log(z + dt(eps)) * (-_scalar(xp, w, z.dtype))


def unary_grad_z(g, z, w, eps):
    """dL/dz given g = dL/dpsi:  g · (-w / (z + eps))."""
    xp = backend.get_array_module(z)
    dt = z.dtype.type
    return g * (-_scalar(xp, w, z.dtype)) / (z + dt(eps))


def unary_grad_w(g, z, eps):
    """dL/dw given g = dL/dpsi:  Σ g · (-log(z + eps))  (a 0-d array)."""
    xp = backend.get_array_module(z)
    dt = z.dtype.type
    return xp.sum(g * -xp.log(z + dt(eps)))
