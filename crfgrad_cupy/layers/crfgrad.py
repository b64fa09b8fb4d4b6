"""The CrfGrad layer of the authors' Caffe fork: T unrolled projected-gradient steps of the CRF.

bottom[0] probabilities p (N, L, H, W) (L = crfgrad_param.num_classes);
bottom[1] features (N, d, H, W) for the bilateral term (e.g. PixelFeature POSITION_AND_RGB);
top[0] x_T (N, L, H, W); top[1] (only with calculate_energy) energies (N, 1, 1, T).

Blobs: [0] unary weight w_u (1, 1, 1, 1); [1] spatial filters (L, L, k, k) (Caffe convolution
weights, cross-correlation, pad (k-1)/2); [2] permutohedral taps (L, L, 1, F), F = 2^(d+1) - 1,
used with neighbourhood 1, offset NONE, SYMMETRIC normalisation, the features as both input
and output points; one lattice per image, built once per forward.

The maths is :mod:`crfgrad_cupy.core.pgd` (see there).  Diff rules: bottom[0].diff is
OVERWRITTEN, the parameter diffs ACCUMULATED (the fork overwrites blobs[0].diff: quirk mode only),
no diff to bottom[1]; all three parameter diffs are computed whatever lr_mult says.

``crfgrad_param.reproduce_caffe_quirks`` (our field 100, default false) switches on the fork's
deviations: the bilateral taps gradient of every step evaluated with the last step's input
x_{T-1}; the unary-weight diff overwritten instead of accumulated (wrong with iter_size > 1); the energy top holding Σ over the whole batch of x·(u + Kx) (no ½) in row 0 only (the
other rows are not written); no backward at all (not even parameter diffs) when bottom[0] does
not need a gradient.  Default: the true gradient, per-image eq. (6) energies
E = ψ·x + ½ xᵀKx in row n, and parameter diffs whenever the layer runs backward.
"""
import numpy as np

from .. import backend
from ..core import lattice as lat
from ..core.pgd import BilateralTerm, pgd_backward, pgd_forward
from ..core.spatial import SpatialFilter
from .base import Layer, register

_GAUSS_INIT_DIM = 5          # the fork always takes the d = 5 Gaussian for the default init


@register('CrfGrad')
class CrfGradLayer(Layer):
    exact_num_bottom = 2
    min_top = 1
    max_top = 2

    def layer_setup(self, bottom, top):
        p = self.param.crfgrad_param
        self.leak_factor = float(p.leak_factor)
        self.num_iterations = int(p.num_iterations)          # float field, truncated like C++
        self.step_size = float(p.step_size)
        self.log_eps = float(p.log_eps)
        self.kernel_size = int(p.kernel_size)
        self.num_classes = int(p.num_classes)
        self.calculate_energy = bool(p.calculate_energy)
        self.quirks = bool(p.reproduce_caffe_quirks)
        if self.num_iterations < 0:
            raise self.error('num_iterations must be >= 0, got %g' % p.num_iterations,
                             field='crfgrad_param.num_iterations')
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise self.error('kernel_size must be odd (the spatial filter is padded by (k-1)/2), got %d'
                             % self.kernel_size, field='crfgrad_param.kernel_size')
        if self.num_classes < 1:
            raise self.error('num_classes must be positive', field='crfgrad_param.num_classes')
        if self.calculate_energy and len(top) != 2:
            raise self.error('calculate_energy needs a second top for the energies',
                             field='crfgrad_param.calculate_energy')
        if not self.calculate_energy and len(top) != 1:
            raise self.error('a second top is only produced with calculate_energy: true', field='top')
        if len(bottom[1].shape) != 4:
            raise self.error('bottom[1] (features) must be 4-D (N, d, H, W), got %s' % (bottom[1].shape,),
                             field='bottom')
        L, k = self.num_classes, self.kernel_size
        d = bottom[1].shape[1]
        F = lat.num_taps(d, 1)
        shapes = [(1, 1, 1, 1), (L, L, k, k), (L, L, 1, F)]
        if self.blobs:
            if len(self.blobs) != 3:
                raise self.error('needs 3 parameter blobs, got %d' % len(self.blobs), field='blobs')
            for i, (b, s) in enumerate(zip(self.blobs, shapes)):
                if tuple(b.shape) != s:
                    raise self.error('parameter blob %d has shape %s, expected %s' % (i, b.shape, s),
                                     field='blobs')
        else:
            self.blobs = [self.make_blob(s) for s in shapes]
            self._default_init(p, L, k, F)
        self.param_propagate_down = [True] * 3
        self._cache = None

    def _default_init(self, p, L, k, F):
        """The fork's initialisation: w_u = unary_weight_init; spatial 0 (debug_mode: 1 at the four
        direct neighbours of the centre for class pairs i != j); taps -pl_filter_init_scale times the
        d = 5 Gaussian written as 63 consecutive values from [c, c, 0, 0] (spills into the next pairs
        for d < 5 and is cut at the end of the blob; only the first 63 taps for d > 5)."""
        xp, dt = self.xp, self.dtype
        self.blobs[0].data = xp.full((1, 1, 1, 1), p.unary_weight_init, dtype=dt)
        spatial = np.zeros(L * L * k * k, dtype=dt)
        if p.debug_mode:
            m = k // 2
            for i in range(L):
                for j in range(L):
                    if i == j:
                        continue
                    base = (i * L + j) * k
                    for idx in ((base + m + 1) * k + m, (base + m - 1) * k + m,
                                (base + m) * k + m + 1, (base + m) * k + m - 1):
                        if 0 <= idx < spatial.size:       # (k = 1 spills into the neighbouring pairs)
                            spatial[idx] = 1
        spatial = spatial.reshape(L, L, k, k)
        self.blobs[1].data = xp.asarray(spatial)
        g = lat.gaussian_taps(_GAUSS_INIT_DIM, 1, xp=np, dtype=dt)
        init = (dt(-1) * dt(p.pl_filter_init_scale) * g).astype(dt)
        flat = np.zeros(L * L * F, dtype=dt)
        for c in range(L):
            start = (c * L + c) * F
            stop = min(start + init.size, flat.size)
            flat[start:stop] = init[:stop - start]
        self.blobs[2].data = xp.asarray(flat.reshape(L, L, 1, F))

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error('bottom[0] must be 4-D (N, L, H, W), got %s' % (shape,), field='bottom')
        if shape[1] != self.num_classes:
            raise self.error('num_classes is %d but bottom[0] has %d channels' % (self.num_classes, shape[1]),
                             field='crfgrad_param.num_classes')
        fshape = bottom[1].shape
        if len(fshape) != 4 or fshape[0] != shape[0] or fshape[2:] != shape[2:]:
            raise self.error('bottom[1] (features) must be (N, d, H, W) = (%d, d, %d, %d), got %s'
                             % (shape[0], shape[2], shape[3], fshape), field='bottom')
        F = lat.num_taps(fshape[1], 1)
        if self.blobs[2].shape[3] != F:
            raise self.error('the taps blob has %d taps but %d-D features need %d'
                             % (self.blobs[2].shape[3], fshape[1], F), field='blobs')
        top[0].reshape(shape)
        if self.calculate_energy:
            top[1].reshape(shape[0], 1, 1, self.num_iterations)

    def terms(self, features):
        """The pairwise operators [spatial, bilateral] for the current parameters and features."""
        L = self.num_classes
        n, d, h, w = features.shape
        spatial = SpatialFilter(self.blobs[1].data, h, w)
        taps = self.blobs[2].data.reshape(L, L, -1)
        bilateral = BilateralTerm.from_features(features, taps, norm_type='symmetric', neighborhood_size=1)
        return [spatial, bilateral]

    def forward(self, bottom, top):
        p = bottom[0].data
        if top[0] is bottom[0]:
            p = p.copy()
        terms = self.terms(bottom[1].data)
        energy = None
        if self.calculate_energy:
            energy = 'caffe' if self.quirks else 'eq6'
        w = self.blobs[0].data.reshape(())
        out, cache, en = pgd_forward(p, w, terms, self.num_iterations, self.step_size, self.leak_factor,
                                     self.log_eps, energy=energy)
        self._cache = cache
        top[0].data[...] = out
        if self.calculate_energy:
            T = self.num_iterations
            if self.quirks:
                top[1].data.reshape(-1)[:T] = en            # rows n > 0 are left as they were
            else:
                top[1].data[...] = en.reshape(en.shape[0], 1, 1, T)

    def backward(self, top, propagate_down, bottom):
        if self._cache is None:
            raise self.error('backward called before forward')
        if self.quirks and not propagate_down[0]:
            return                                          # the fork computes nothing then
        g = pgd_backward(self._cache, top[0].diff, reproduce_caffe_quirks=self.quirks)
        if propagate_down[0]:
            bottom[0].diff[...] = g['p']
        dt = self.blobs[0].dtype
        unary_grad = backend.xp().asarray(g['unary_weight'], dtype=dt).reshape(1, 1, 1, 1)
        if self.quirks:
            self.blobs[0].diff[...] = unary_grad            # the fork overwrites this one diff
        else:
            self.blobs[0].diff[...] += unary_grad           # accumulate, like every parameter diff
        if g['terms'][0] is not None:
            self.blobs[1].diff[...] += g['terms'][0]
            self.blobs[2].diff[...] += g['terms'][1].reshape(self.blobs[2].shape)
