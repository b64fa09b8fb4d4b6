"""Permutohedral layer (bilateralNN / caffe-crfgd): learnable sparse high-dimensional filtering.

Bottoms: data (N, C, H, W), input features (N, d, H, W), output features (N, d, H', W'),
optionally a lattice blob (bottom[3]) made by another Permutohedral layer's second top.
Tops: (N, O, H', W') — the output lives at the pixels of the output features — and
optionally the lattice blob (N, 3, 1, 8) whose ``lattice_payload`` attribute carries the
lattices and normalisers of this layer to other layers (Caffe passes raw pointers).

Per image n (see core.lattice)::

    out = norm_back ⊙ Slice(Blur_{W_eff}(Splat(norm_there ⊙ x))) (+ bias[o])

W_eff is the filter blob (O, C/G, 1, F) plus the Gaussian taps g (offset_type FULL: on
every (o, c) row; DIAG: on (o, o); NONE: nothing) — the stored blob never holds g.
Backward (as Caffe): the filter and bias diffs are RESET and then set (summed over the
batch), the data diff is overwritten, the feature bottoms get no diff; the filter
gradient uses the splatted input of the last forward.
"""
import numpy as np

from ..core import lattice as latmod
from ..proto import caffe_pb2
from .base import Layer, register

_P = caffe_pb2.PermutohedralParameter


@register('Permutohedral')
class PermutohedralLayer(Layer):
    min_bottom = 3
    max_bottom = 4
    min_top = 1
    max_top = 2

    def layer_setup(self, bottom, top):
        p = self.param.permutohedral_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error('num_output must be given and > 0', field='permutohedral_param.num_output')
        self.neighborhood_size = int(p.neighborhood_size)
        self.group = int(p.group)
        if self.group <= 0:
            raise self.error('group must be > 0', field='permutohedral_param.group')
        self.bias_term = bool(p.bias_term)
        self.repeated_init = bool(p.repeated_init)
        self.visualize = bool(p.visualize_lattice)
        self.skip_blur = bool(p.do_skip_blur)
        self.norm_type = {_P.AFTER: 'after', _P.SYMMETRIC: 'symmetric'}[p.norm_type]
        self.offset_type = {_P.FULL: 'full', _P.DIAG: 'diag', _P.NONE: 'none'}[p.offset_type]
        self.channels = bottom[0].channels
        self.feature_size = bottom[1].channels
        if self.channels % self.group:
            raise self.error('the %d data channels are not divisible by group %d'
                             % (self.channels, self.group), field='permutohedral_param.group')
        if self.offset_type == 'diag' and self.num_output != self.channels // self.group:
            raise self.error('offset_type DIAG needs num_output (%d) == channels / group (%d)'
                             % (self.num_output, self.channels // self.group),
                             field='permutohedral_param.offset_type')
        if self.skip_blur and self.channels != self.num_output:
            raise self.error('do_skip_blur needs num_output (%d) == channels (%d)'
                             % (self.num_output, self.channels), field='permutohedral_param.do_skip_blur')
        F = latmod.num_taps(self.feature_size, self.neighborhood_size)
        fshape = (self.num_output, self.channels // self.group, 1, F)
        want = [fshape] + ([(1, 1, 1, self.num_output)] if self.bias_term else [])
        if self.blobs:
            if len(self.blobs) != len(want):
                raise self.error('expected %d parameter blobs, got %d' % (len(want), len(self.blobs)),
                                 field='blobs')
            for i, (b, w) in enumerate(zip(self.blobs, want)):
                if b.count != int(np.prod(w)):
                    raise self.error('parameter blob %d has shape %s, expected %s' % (i, b.shape, w),
                                     field='blobs')
                if b.shape != w:
                    b.reshape(w)
        else:
            bias = self.filled_blob(want[1], p, 'bias_filler') if self.bias_term else None
            self.blobs = [self.filled_blob(fshape, p, 'filter_filler')]   # Caffe fills the bias first
            if bias is not None:
                self.blobs.append(bias)
        self._ops = None          # per image: BilateralFilter (lattice + normalisers)
        self._splatted = None     # per image: splat of the normalised input of the last forward

    def reshape(self, bottom, top):
        data, fin, fout = bottom[0], bottom[1], bottom[2]
        n = data.num
        if fin.num != n or fout.num != n:
            raise self.error('data, input and output features need the same batch size (%d, %d, %d)'
                             % (n, fin.num, fout.num), field='bottom')
        if (fin.height, fin.width) != (data.height, data.width):
            raise self.error('input features are %dx%d but the data is %dx%d'
                             % (fin.height, fin.width, data.height, data.width), field='bottom')
        if fout.channels != fin.channels:
            raise self.error('output features have %d channels, input features %d'
                             % (fout.channels, fin.channels), field='bottom')
        if data.channels != self.channels or fin.channels != self.feature_size:
            raise self.error('bottom channels changed after setup (data %d -> %d, features %d -> %d)'
                             % (self.channels, data.channels, self.feature_size, fin.channels),
                             field='bottom')
        top[0].reshape(n, self.num_output, fout.height, fout.width)
        if len(top) > 1:
            top[1].reshape(n, 3, 1, 8)

    # ------------------------------------------------------------------ helpers
    def _effective_filter(self):
        """(O, C/G, F) filter with the Gaussian offset added (the blob is left untouched)."""
        w = self.blobs[0].data
        O, Cg, _, F = w.shape
        w = w.reshape(O, Cg, F)
        if self.offset_type == 'none':
            return w
        g = latmod.gaussian_taps(self.feature_size, self.neighborhood_size, self.xp, w.dtype)
        if self.offset_type == 'full':
            return w + g[None, None, :]
        out = w.copy()
        idx = self.xp.arange(O)
        out[idx, idx, :] += g[None, :]
        return out

    def _init_lattices(self, bottom, top):
        shared = len(bottom) > 3
        if shared:
            payload = getattr(bottom[3], 'lattice_payload', None)
            if payload is None or len(payload) != bottom[0].num:
                raise self.error('bottom[3] carries no lattice of a Permutohedral layer for %d images'
                                 % bottom[0].num, field='bottom')
            self._ops = list(payload)
        elif self._ops is None or self.repeated_init or not self._ops_fit(bottom):
            fin, fout = bottom[1], bottom[2]
            d = self.feature_size
            same = fin is fout
            ops = []
            for n in range(bottom[0].num):
                a = fin.data[n].reshape(d, -1)
                b = None if same else fout.data[n].reshape(d, -1)
                try:
                    lat = latmod.build_lattice(a, b, self.neighborhood_size, visualize=self.visualize)
                except ValueError as exc:
                    raise self.error('image %d: %s' % (n, exc), field='bottom')
                ops.append(latmod.BilateralFilter(lat, self.norm_type))
            self._ops = ops
        if len(top) > 1:
            top[1].lattice_payload = list(self._ops)

    def _ops_fit(self, bottom):
        n_in = bottom[0].height * bottom[0].width
        n_out = bottom[2].height * bottom[2].width
        return (len(self._ops) == bottom[0].num and
                all(op.lattice.n_in == n_in and op.lattice.n_out == n_out for op in self._ops))

    # ------------------------------------------------------------------ passes
    def forward(self, bottom, top):
        self._init_lattices(bottom, top)
        xp = self.xp
        data = bottom[0].data
        C = data.shape[1]
        O = self.num_output
        w_eff = None if self.skip_blur else self._effective_filter()
        out = xp.zeros(top[0].shape, dtype=top[0].dtype)
        splatted = []
        for n, op in enumerate(self._ops):
            lat = op.lattice
            latT = op.splat_input(data[n].reshape(C, -1))          # (M, C)
            splatted.append(latT)
            yT = latT if self.skip_blur else lat._blurT(latT, w_eff, self.group)
            yT = lat._sliceT(yT, 'out')                           # (n_out, O)
            if op.norm_back is not None:
                yT = yT * op.norm_back[:, None]
            out[n] = yT.T.reshape(O, out.shape[2], out.shape[3])
        if self.bias_term:
            out += self.blobs[1].data.reshape(1, O, 1, 1)
        top[0].data[...] = out
        self._splatted = splatted
        self._w_eff = w_eff

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        grad = top[0].diff
        O = grad.shape[1]
        C = bottom[0].channels
        fblob = self.blobs[0]
        fgrad = xp.zeros(fblob.shape, dtype=fblob.dtype)
        dx = xp.zeros(bottom[0].shape, dtype=bottom[0].dtype)
        for n, op in enumerate(self._ops):
            lat = op.lattice
            gT = op._grad_lattice(grad[n].reshape(O, -1))         # Sliceᵀ(norm_back ⊙ G): (M, O)
            if self.skip_blur:
                zT = gT
            else:
                fgrad += lat._taps_gradT(self._splatted[n], gT, self.group).reshape(fblob.shape)
                zT = lat._blur_adjointT(gT, self._w_eff, self.group)
            xT = lat._sliceT(zT, 'in')                             # Splatᵀ: (n_in, C)
            if op.norm_there is not None:
                xT = xT * op.norm_there[:, None]
            dx[n] = xT.T.reshape(C, dx.shape[2], dx.shape[3])
        bias_grad = grad.sum(axis=(0, 2, 3)).reshape(self.blobs[1].shape) if self.bias_term else None
        if self.param.permutohedral_param.accumulate_param_diff:   # our extension (shared filters)
            fblob.diff[...] += fgrad
            if self.bias_term:
                self.blobs[1].diff[...] += bias_grad
        else:
            fblob.diff[...] = fgrad                               # Caffe resets, then sets
            if self.bias_term:
                self.blobs[1].diff[...] = bias_grad
        bottom[0].diff[...] = dx                                  # always written, as Caffe
