"""Unrolled projected gradient descent for the CRF energy (paper Alg. 1, eqs. 6-13, 14-22).

Shapes: probabilities ``p`` and states x_t (N, L, H, W).  The pairwise operator is
K = Σ_i K_i over "terms", objects with

* ``apply(q)``  -> K_i q           (N, L, H, W)
* ``adjoint(g)`` -> K_iᵀ g
* ``param_grad(q, g)`` -> d<g, K_i q>/dθ_i (the term's parameter shape)
* ``backward(q, g)`` -> (K_iᵀ g, param_grad(q, g))  (may share work)
* ``has_self_interaction()`` (pixel-with-itself block non-zero) and ``interaction_radius``
  (Chebyshev radius in pixels, None = unbounded), used by :mod:`rounding`.

:class:`~crfgrad_cupy.core.spatial.SpatialFilter` is such a term; :class:`BilateralTerm`
wraps per-image permutohedral filters; :class:`DensePairwise` is an explicit matrix
(reference/stand-in for tests and small problems).

Forward, exactly as the authors' Caffe runs it (x_0 = p is NOT projected):

    u   = -w·log(p + eps)
    g_t = K x_t + u,   s_t = x_t - γ g_t,   x_{t+1} = proj_leak(s_t),   t = 0..T-1;  output x_T

Backward (BPTT through the T steps, eqs. 14-22): with δ = dL/dx_{t+1},
γ_t = Jᵀ_proj(s_t) δ;  dθ_i += -γ·dK_i(x_t)/dθ_i[γ_t];  a += -γ·γ_t;  δ <- γ_t - γ·Σ K_iᵀ γ_t;
finally dL/dp = a·(-w/(p+eps)) + δ and dL/dw = Σ a·(-log(p+eps)).  Terms that provide
``backward_deferred(q, g) -> (Kᵀg, token)`` and ``param_grad_deferred(tokens)`` (the spatial
filter) have their parameter gradient summed over the steps in one pass at the end (with
``merge_deferred(tokens) -> tokens`` the tokens are combined as they come).

Caffe's quirk (``reproduce_caffe_quirks=True``): terms with ``caffe_stale_param_grad`` (the
bilateral term) get their parameter gradient of EVERY step evaluated with the last
forward step's input x_{T-1} instead of x_t.  The default is the true gradient.

Energies per step t (state x_t at the START of step t, t = 0..T-1):
* 'eq6' (default, correct): E(x) = ψ·x + ½ xᵀKx per image -> (N, T);
* 'caffe': Σ over the whole batch of x·(u + Kx) (no ½) -> (T,) (Caffe writes it to row 0).
"""
from collections import namedtuple

from .. import backend
from .projection import leaky_apply, project_simplex, project_simplex_vjp
from .unary import unary, unary_grad_w, unary_grad_z


# ---------------------------------------------------------------------------------------------
# pairwise operators
# ---------------------------------------------------------------------------------------------
class PairwiseOperator:
    """Base class: default ``backward`` from ``adjoint`` + ``param_grad``."""
    caffe_stale_param_grad = False
    interaction_radius = None

    def backward(self, q, g):
        return self.adjoint(g), self.param_grad(q, g)

    def has_self_interaction(self):
        return True


class BilateralTerm(PairwiseOperator):
    """Permutohedral (bilateral) filtering with learnable taps, one lattice per image.

    ``filters``: list of N objects with ``apply(values (C, n), taps)``, ``adjoint(grad (O, n), taps)``
    and ``taps_grad(values, grad)`` (core.lattice.BilateralFilter); ``taps`` (O, C, F).
    Its parameter gradient is what Caffe evaluates with a stale input (quirk Q1).
    """
    caffe_stale_param_grad = True
    interaction_radius = None

    def __init__(self, filters, taps):
        self.filters = list(filters)
        self.taps = taps
        self.xp = backend.get_array_module(taps)

    @classmethod
    def from_features(cls, features, taps, norm_type='symmetric', neighborhood_size=1):
        """Build one lattice per image from ``features`` (N, d, H, W) (same points in and out)."""
        from .lattice import BilateralFilter, build_lattice
        n, d = features.shape[:2]
        filters = []
        for i in range(n):
            lat = build_lattice(features[i].reshape(d, -1), None, neighborhood_size=neighborhood_size)
            filters.append(BilateralFilter(lat, norm_type=norm_type))
        return cls(filters, taps)

    def _per_image(self, fn, a, out_channels):
        n, c, h, w = a.shape
        outs = [fn(f, a[i].reshape(c, h * w)).reshape(out_channels, h, w) for i, f in enumerate(self.filters)]
        return self.xp.stack(outs).astype(a.dtype, copy=False)

    def apply(self, q):
        return self._per_image(lambda f, v: f.apply(v, self.taps), q, self.taps.shape[0])

    def adjoint(self, g):
        return self._per_image(lambda f, v: f.adjoint(v, self.taps), g, self.taps.shape[1])

    def param_grad(self, q, g):
        n, c, h, w = q.shape
        o = g.shape[1]
        total = None
        for i, f in enumerate(self.filters):
            t = f.taps_grad(q[i].reshape(c, h * w), g[i].reshape(o, h * w))
            total = t if total is None else total + t
        return total.astype(q.dtype, copy=False)

    def backward(self, q, g):
        """(Kᵀ g, dθ) per image with one splat of g shared by both."""
        n, c, h, w = q.shape
        o = g.shape[1]
        dq, total = [], None
        for i, f in enumerate(self.filters):
            dx, t = f.backward(q[i].reshape(c, h * w), g[i].reshape(o, h * w), self.taps)
            dq.append(dx.reshape(c, h, w))
            total = t if total is None else total + t
        return self.xp.stack(dq).astype(g.dtype, copy=False), total.astype(q.dtype, copy=False)

    def has_self_interaction(self):
        return bool(self.xp.any(self.taps != 0))


class DensePairwise(PairwiseOperator):
    """An explicit pairwise matrix on the flattened state (channel-major, index c·H·W + y·W + x).

    ``K``: (P, P) shared by the batch or (N, P, P) per image, P = L·H·W; ``shape`` = (L, H, W).
    ``param_grad`` returns d<g, Kq>/dK with K's shape (summed over the batch when shared).
    """
    interaction_radius = None

    def __init__(self, K, shape):
        self.K = K
        self.shape = tuple(int(s) for s in shape)
        self.xp = backend.get_array_module(K)
        self.P = self.shape[0] * self.shape[1] * self.shape[2]
        if K.shape[-2:] != (self.P, self.P):
            raise ValueError('K must be (P, P) or (N, P, P) with P = %d, got %s' % (self.P, K.shape))

    def _mv(self, M, q):
        n = q.shape[0]
        v = q.reshape(n, self.P, 1)
        return self.xp.matmul(M, v).reshape((n,) + self.shape)

    def apply(self, q):
        return self._mv(self.K, q)

    def adjoint(self, g):
        return self._mv(self.xp.swapaxes(self.K, -1, -2), g)

    def param_grad(self, q, g):
        n = q.shape[0]
        outer = g.reshape(n, self.P, 1) * q.reshape(n, 1, self.P)
        return outer.sum(axis=0) if self.K.ndim == 2 else outer

    def has_self_interaction(self):
        xp = self.xp
        L, H, W = self.shape
        K = self.K.reshape((-1, L, H * W, L, H * W))
        pix = xp.arange(H * W)
        blocks = K[:, :, pix, :, pix]                      # (HW, N, L, L): pixel-with-itself blocks
        return bool(xp.any((blocks + xp.swapaxes(blocks, -1, -2)) != 0))


# ---------------------------------------------------------------------------------------------
# energies
# ---------------------------------------------------------------------------------------------
def _per_image_sum(xp, a):
    return a.reshape(a.shape[0], -1).sum(axis=1)


def pairwise_apply(terms, q):
    """[K_i q for each term]."""
    return [t.apply(q) for t in terms]


def energy_eq6(q, u, terms, kq=None):
    """E(q) = ψ·q + ½ qᵀKq per image: (N,).  ``kq`` = precomputed [K_i q]."""
    xp = backend.get_array_module(q)
    if kq is None:
        kq = pairwise_apply(terms, q)
    e = _per_image_sum(xp, q * u)
    for k in kq:
        e = e + q.dtype.type(0.5) * _per_image_sum(xp, q * k)
    return e


def energy_caffe(q, u, kq):
    """Caffe's reported energy: Σ over the batch of q·(u + K q) without ½ (a 0-d array)."""
    xp = backend.get_array_module(q)
    tot = q * u
    for k in kq:
        tot = q * k + tot
    return xp.sum(tot)


def energy_gradient(q, u, terms):
    """∇E of eq. (6) for a general (not necessarily symmetric) K: u + ½(K + Kᵀ) q."""
    g = u
    half = q.dtype.type(0.5)
    for t in terms:
        g = g + half * (t.apply(q) + t.adjoint(q))
    return g


# ---------------------------------------------------------------------------------------------
# forward / backward
# ---------------------------------------------------------------------------------------------
PGDCache = namedtuple('PGDCache', ['p', 'u', 'unary_weight', 'log_eps', 'step_size', 'leak_factor',
                                   'terms', 'pre', 'info'])
PGDCache.__doc__ = """What :func:`pgd_backward` needs: inputs, parameters, the pre-projection states
``pre`` = [s_0..s_{T-1}] and their projection info (tau, rho)."""


def pgd_forward(p, unary_weight, terms, num_iterations, step_size, leak_factor, log_eps, energy=None):
    """Run T = ``num_iterations`` PGD steps from x_0 = p.

    Returns (x_T, cache, energies): energies is None, (N, T) for energy='eq6' or (T,) for 'caffe'.
    """
    xp = backend.get_array_module(p)
    dt = p.dtype.type
    T = int(num_iterations)
    u = unary(p, unary_weight, log_eps)
    x = p
    pre, info = [], []
    energies = []
    neg_step = dt(-step_size)
    for _ in range(T):
        kq = pairwise_apply(terms, x)
        if energy == 'eq6':
            energies.append(energy_eq6(x, u, terms, kq))
        elif energy == 'caffe':
            energies.append(energy_caffe(x, u, kq))
        elif energy is not None:
            raise ValueError("energy must be None, 'eq6' or 'caffe', got %r" % (energy,))
        g = kq[0] if kq else xp.zeros_like(x)
        for k in kq[1:]:
            g = g + k
        g = g + u
        s = x + neg_step * g
        x, inf = project_simplex(s, leak_factor, axis=1)
        pre.append(s)
        info.append(inf)
    cache = PGDCache(p, u, unary_weight, log_eps, step_size, leak_factor, list(terms), pre, info)
    if energy == 'eq6':
        en = xp.stack(energies, axis=1) if T else xp.zeros((p.shape[0], 0), p.dtype)
    elif energy == 'caffe':
        en = xp.stack(energies) if T else xp.zeros((0,), p.dtype)
    else:
        en = None
    return x, cache, en


def state(cache, t):
    """x_t of the forward pass (x_0 = p), recomputed from the stored s_{t-1}."""
    if t == 0:
        return cache.p
    return leaky_apply(cache.pre[t - 1], cache.info[t - 1].tau, cache.leak_factor)


def pgd_backward(cache, top_diff, reproduce_caffe_quirks=False):
    """Gradients of L given dL/dx_T = ``top_diff``.

    Returns a dict: 'p' (dL/dp, (N, L, H, W)), 'unary_weight' (0-d), 'terms' (list of parameter
    gradients, one per term, in the terms' order).
    """
    xp = backend.get_array_module(top_diff)
    dt = top_diff.dtype.type
    T = len(cache.pre)
    neg_step = dt(-cache.step_size)
    terms = cache.terms
    stale = [reproduce_caffe_quirks and getattr(t, 'caffe_stale_param_grad', False) for t in terms]
    grads = [None] * len(terms)
    stale_sum = [None] * len(terms)
    deferred = [not stale[i] and hasattr(t, 'backward_deferred') for i, t in enumerate(terms)]
    tokens = [[] for _ in terms]
    delta = top_diff
    acc_u = xp.zeros_like(top_diff)
    for t in range(T - 1, -1, -1):
        x_t = state(cache, t)
        gam = project_simplex_vjp(delta, cache.pre[t], cache.info[t], cache.leak_factor, axis=1)
        back = None
        for i, term in enumerate(terms):
            if stale[i]:
                dq = term.adjoint(gam)
                stale_sum[i] = gam if stale_sum[i] is None else stale_sum[i] + gam
            elif deferred[i]:
                dq, tok = term.backward_deferred(x_t, gam)
                tokens[i].append(tok)
                if len(tokens[i]) > 1 and hasattr(term, 'merge_deferred'):
                    tokens[i] = term.merge_deferred(tokens[i])
            else:
                dq, dth = term.backward(x_t, gam)
                grads[i] = neg_step * dth if grads[i] is None else grads[i] + neg_step * dth
            back = dq if back is None else back + dq
        acc_u = acc_u + neg_step * gam
        delta = gam if back is None else gam + neg_step * back
    if T > 0:
        x_last = state(cache, T - 1) if any(stale) else None
        for i, term in enumerate(terms):
            if stale[i]:
                grads[i] = neg_step * term.param_grad(x_last, stale_sum[i])
            elif deferred[i]:
                grads[i] = neg_step * term.param_grad_deferred(tokens[i])
    dp = unary_grad_z(acc_u, cache.p, cache.unary_weight, cache.log_eps) + delta
    dw = unary_grad_w(acc_u, cache.p, cache.log_eps)
    return {'p': dp, 'unary_weight': dw, 'terms': grads}
