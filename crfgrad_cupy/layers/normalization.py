"""BatchNorm, Scale, Bias and LRN layers (Caffe's semantics)."""

from ..proto import caffe_pb2
from .base import Layer, register
from .fillers import fill
from .pooling import ave_pool2d, ave_pool2d_backward


def _canonical_axis(layer, axis, ndim, field):
    if not -ndim <= axis < max(ndim, 1):
        raise layer.error('axis %d out of range for a %d-D bottom' % (axis, ndim), field=field)
    return axis + ndim if axis < 0 else axis


def _count(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


@register('BatchNorm')
class BatchNormLayer(Layer):
    """Per-channel normalisation of (N, C, ...) over every axis but 1 (1-D input: one channel).
    Blobs (statistics, never learned): [0] mean sum (C,), [1] variance sum (C,), [2] scale
    factor (1,); the statistics used with global stats are blob/scale factor (0 if it is 0).
    TRAIN without global stats: batch mean, biased batch variance, and the running sums are
    updated as ``f = maf·f + 1, m = maf·m + μ, v = maf·v + m/(m-1)·σ²``."""
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.batch_norm_param
        self.maf = float(p.moving_average_fraction)
        self.use_global_stats = self.phase == caffe_pb2.TEST
        if p.HasField('use_global_stats'):
            self.use_global_stats = bool(p.use_global_stats)
        shape = bottom[0].shape
        self.channels = 1 if len(shape) == 1 else int(shape[1])
        self.eps = float(p.eps)
        if self.blobs:
            if len(self.blobs) != 3:
                raise self.error('expects 3 blobs (mean, variance, scale factor), got %d' % len(self.blobs),
                                 field='blobs')
            for i, want in enumerate([(self.channels,), (self.channels,), (1,)]):
                if self.blobs[i].count != want[0]:
                    raise self.error('blob %d has shape %s, expected %s' % (i, self.blobs[i].shape, want),
                                     field='blobs')
                if self.blobs[i].shape != want:
                    self.blobs[i].reshape(want)
        else:
            self.blobs = [self.make_blob((self.channels,)), self.make_blob((self.channels,)),
                          self.make_blob((1,))]
        # the statistics are not parameters: lr_mult 0 (as Caffe, which also refuses others)
        for i in range(len(self.blobs)):
            if len(self.param.param) == i:
                self.param.param.add().lr_mult = 0.0
            elif self.param.param[i].lr_mult != 0:
                raise self.error('cannot configure batch normalization statistics as layer parameters '
                                 '(param %d has lr_mult %g; it must be 0)' % (i, self.param.param[i].lr_mult),
                                 field='param.lr_mult')
        self.param_propagate_down = [False] * 3

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) > 1 and shape[1] != self.channels:
            raise self.error('bottom has %d channels, the layer was set up for %d' % (shape[1], self.channels),
                             field='bottom')
        if top[0] is not bottom[0]:
            top[0].reshape(shape)

    def _view(self, a):
        """(N, C, S) view of an (N, C, ...) array."""
        return a.reshape(a.shape[0], self.channels, -1)

    def forward(self, bottom, top):
        xp = self.xp
        x = self._view(bottom[0].data)
        if self.use_global_stats:
            f = self.blobs[2].data.reshape(-1)[0]
            sf = 0 if float(f) == 0 else 1 / f
            mean = self.blobs[0].data * sf
            var = self.blobs[1].data * sf
        else:
            mean = x.mean(axis=(0, 2))
            var = ((x - mean.reshape(1, -1, 1)) ** 2).mean(axis=(0, 2))
            m = x.size // self.channels
            corr = m / (m - 1.0) if m > 1 else 1.0
            b0, b1, b2 = self.blobs
            b2.data[...] = b2.data * self.maf + 1
            b0.data[...] = b0.data * self.maf + mean
            b1.data[...] = b1.data * self.maf + var * corr
        self.std = xp.sqrt(var + self.eps).astype(x.dtype)
        xn = (x - mean.reshape(1, -1, 1)) / self.std.reshape(1, -1, 1)
        self.x_norm = xn
        top[0].data[...] = xn.reshape(bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = self._view(top[0].diff)
        std = self.std.reshape(1, -1, 1)
        if self.use_global_stats:
            dx = dy / std
        else:
            y = self.x_norm
            dx = (dy - dy.mean(axis=(0, 2), keepdims=True)
                  - (dy * y).mean(axis=(0, 2), keepdims=True) * y) / std
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)


class _Broadcast:
    """outer × dim × inner view of bottom[0] for a parameter of shape
    bottom.shape[axis : axis + num_axes]."""

    @staticmethod
    def setup_param_shape(layer, shape, axis_field, num_axes_field, axis, num_axes):
        axis = _canonical_axis(layer, axis, len(shape), axis_field)
        if num_axes < -1:
            raise layer.error('num_axes must be non-negative, or -1 to extend to the end of bottom[0]',
                              field=num_axes_field)
        if num_axes >= 0 and len(shape) < axis + num_axes:
            raise layer.error('parameter shape extends past bottom[0]\'s shape %s when applied from axis %d'
                              % (shape, axis), field=num_axes_field)
        end = len(shape) if num_axes == -1 else axis + num_axes
        return tuple(shape[axis:end])

    @staticmethod
    def dims(layer, shape, pshape, axis, axis_field):
        """(outer, dim, inner) for a parameter of shape ``pshape`` applied at ``axis``."""
        axis = 0 if len(pshape) == 0 else _canonical_axis(layer, axis, len(shape), axis_field)
        if len(shape) < axis + len(pshape) or tuple(shape[axis:axis + len(pshape)]) != tuple(pshape):
            raise layer.error('parameter shape %s does not match bottom[0] shape %s from axis %d'
                              % (tuple(pshape), tuple(shape), axis), field=axis_field)
        return _count(shape[:axis]), _count(pshape), _count(shape[axis + len(pshape):])


@register('Bias')
class BiasLayer(Layer):
    """top = bottom[0] + b broadcast; b = blobs[0] of shape bottom.shape[axis : axis+num_axes]
    (filler default constant 0), or b = bottom[1]."""
    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.bias_param
        if len(bottom) == 1 and not self.blobs:
            shape = _Broadcast.setup_param_shape(self, bottom[0].shape, 'bias_param.axis', 'bias_param.num_axes',
                                                 int(p.axis), int(p.num_axes))
            self.blobs = [self.filled_blob(shape, p, 'filler')]

    def _bias(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.dims = _Broadcast.dims(self, bottom[0].shape, self._bias(bottom).shape,
                                    int(self.param.bias_param.axis), 'bias_param.axis')
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        outer, dim, inner = self.dims
        b = self._bias(bottom).data.reshape(1, dim, 1)
        y = bottom[0].data.reshape(outer, dim, inner) + b
        top[0].data[...] = y.reshape(bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        outer, dim, inner = self.dims
        dy = top[0].diff
        if len(bottom) == 1:
            if self.param_propagate_down[0]:
                self.blobs[0].diff += dy.reshape(outer, dim, inner).sum(axis=(0, 2)).reshape(self.blobs[0].shape)
        elif propagate_down[1]:
            bottom[1].diff[...] = dy.reshape(outer, dim, inner).sum(axis=(0, 2)).reshape(bottom[1].shape)
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].diff[...] = dy


@register('Scale')
class ScaleLayer(Layer):
    """top = bottom[0] · s (+ b) broadcast. One bottom: s = blobs[0] of shape
    bottom.shape[axis : axis+num_axes] (filler default constant 1), bias = blobs[1].
    Two bottoms: s = bottom[1] (a scalar shape () puts the axis at 0), bias = blobs[0]."""
    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.scale_param
        nb = len(bottom)
        if nb == 1 and not self.blobs:
            shape = _Broadcast.setup_param_shape(self, bottom[0].shape, 'scale_param.axis', 'scale_param.num_axes',
                                                 int(p.axis), int(p.num_axes))
            s = self.make_blob(shape)
            if p.HasField('filler'):
                fill(s, p.filler, layer=self.name)
            else:
                s.data[...] = 1
            self.blobs = [s]
        self.bias_term = bool(p.bias_term)
        self.bias_index = None
        if self.bias_term:
            if len(self.blobs) + nb < 3:
                # the bias is created here (shape as the scale's)
                if nb > 1:
                    bshape = tuple(bottom[1].shape)
                else:
                    bshape = tuple(self.blobs[0].shape)
                self.blobs.append(self.filled_blob(bshape, p, 'bias_filler'))
            self.bias_index = len(self.blobs) - 1
        want = (1 if nb == 1 else 0) + (1 if self.bias_term else 0)
        if len(self.blobs) != want:
            raise self.error('expected %d parameter blobs, got %d' % (want, len(self.blobs)), field='blobs')

    def _scale(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        axis = int(self.param.scale_param.axis)
        self.dims = _Broadcast.dims(self, bottom[0].shape, self._scale(bottom).shape, axis, 'scale_param.axis')
        if self.bias_term:
            bias = self.blobs[self.bias_index]
            bdims = _Broadcast.dims(self, bottom[0].shape, bias.shape, axis, 'scale_param.axis')
            if bdims != self.dims and bias.count != 1:
                raise self.error('bias shape %s does not match the scale shape %s'
                                 % (bias.shape, self._scale(bottom).shape), field='blobs')
            self.bias_dims = bdims
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        outer, dim, inner = self.dims
        x = bottom[0].data.reshape(outer, dim, inner)
        self.x_saved = x.copy() if top[0] is bottom[0] else None
        y = x * self._scale(bottom).data.reshape(1, dim, 1)
        if self.bias_term:
            bo, bd, bi = self.bias_dims
            y = y.reshape(bo, bd, bi) + self.blobs[self.bias_index].data.reshape(1, bd, 1)
        top[0].data[...] = y.reshape(bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        outer, dim, inner = self.dims
        dy = top[0].diff
        if self.bias_term and self.param_propagate_down[self.bias_index]:
            bo, bd, bi = self.bias_dims
            bias = self.blobs[self.bias_index]
            bias.diff += dy.reshape(bo, bd, bi).sum(axis=(0, 2)).reshape(bias.shape)
        dy3 = dy.reshape(outer, dim, inner)
        scale = self._scale(bottom)
        one_bottom = len(bottom) == 1
        if (one_bottom and self.param_propagate_down[0]) or (not one_bottom and propagate_down[1]):
            x = self.x_saved if self.x_saved is not None else bottom[0].data.reshape(outer, dim, inner)
            ds = (dy3 * x).sum(axis=(0, 2)).reshape(scale.shape)
            if one_bottom:
                scale.diff += ds
            else:
                scale.diff[...] = ds
        if propagate_down[0]:
            dx = dy3 * scale.data.reshape(1, dim, 1)
            bottom[0].diff[...] = dx.reshape(bottom[0].shape)


@register('LRN')
class LRNLayer(Layer):
    """Local response normalisation of (N, C, H, W), n = local_size (odd):
    ACROSS_CHANNELS: y = x · (k + α/n · Σ_{c' ∈ [c-(n-1)/2, c+(n-1)/2]} x_{c'}²)^(-β)
    WITHIN_CHANNEL:  y = x · (1 + α · AVE_{n×n, pad (n-1)/2}(x²))^(-β)."""
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 != 1:
            raise self.error('LRN only supports odd values for local_size, got %d' % self.size,
                             field='lrn_param.local_size')
        self.pre_pad = (self.size - 1) // 2
        self.alpha = float(p.alpha)
        self.beta = float(p.beta)
        self.k = float(p.k)
        self.region = int(p.norm_region)
        if self.region not in (caffe_pb2.LRNParameter.ACROSS_CHANNELS, caffe_pb2.LRNParameter.WITHIN_CHANNEL):
            raise self.error('unknown norm_region %d' % self.region, field='lrn_param.norm_region')

    def reshape(self, bottom, top):
        if len(bottom[0].shape) != 4:
            raise self.error('input must have 4 axes (N, C, H, W), got shape %s' % (bottom[0].shape,),
                             field='bottom')
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def _channel_window_sum(self, a, lo, hi):
        """s[:, c] = Σ_{c' = c-lo}^{c+hi} a[:, c'] (zero outside)."""
        xp = self.xp
        n, c, h, w = a.shape
        padded = xp.zeros((n, c + lo + hi, h, w), dtype=a.dtype)
        padded[:, lo:lo + c] = a
        out = padded[:, 0:c].copy()
        for j in range(1, lo + hi + 1):
            out += padded[:, j:j + c]
        return out

    def _pool(self):
        n = self.size
        return (n, n), (1, 1), (self.pre_pad, self.pre_pad)

    def forward(self, bottom, top):
        x = bottom[0].data
        self.x_saved = x.copy()
        if self.region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
            scale = self.k + (self.alpha / self.size) * self._channel_window_sum(x * x, self.pre_pad, self.pre_pad)
        else:
            k, s, p = self._pool()
            scale = 1 + self.alpha * ave_pool2d(x * x, k, s, p, x.shape[2:])
        self.scale = scale
        self.y = x * scale ** (-self.beta)
        top[0].data[...] = self.y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff
        x, scale, y = self.x_saved, self.scale, self.y
        # ∂L/∂scale = -β · dy · y / scale;  scale depends on x² through the window sum
        g = -self.beta * dy * y / scale
        if self.region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
            back = self._channel_window_sum(g, self.pre_pad, self.pre_pad)   # symmetric window
            dx = dy * scale ** (-self.beta) + (2 * self.alpha / self.size) * x * back
        else:
            k, s, p = self._pool()
            back = ave_pool2d_backward(g, k, s, p, x.shape[2:])
            dx = dy * scale ** (-self.beta) + 2 * self.alpha * x * back
        bottom[0].diff[...] = dx
