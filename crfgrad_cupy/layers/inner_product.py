"""InnerProduct (fully connected) layer, as Caffe's."""
from .base import Layer, register


def canonical_axis(axis, ndim, layer, field='axis'):
    """Caffe's CanonicalAxisIndex: negative axes count from the end."""
    if not -ndim <= axis < max(ndim, 1):
        raise layer.error('axis %d out of range for a %d-D bottom' % (axis, ndim), field=field)
    return axis + ndim if axis < 0 else axis


@register('InnerProduct')
class InnerProductLayer(Layer):
    """bottom (d0, ..., d_{axis-1}, d_axis, ...) is viewed as M×K with M = d0···d_{axis-1},
    K = d_axis···; top = bottom.shape[:axis] + (N,).
    Weights blob[0]: (N, K), or (K, N) with ``transpose``; bias blob[1]: (N,).
    y = X·Wᵀ + b (X·W when transposed)."""
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.inner_product_param
        if not self.param.HasField('inner_product_param') or not p.HasField('num_output'):
            raise self.error('num_output must be given', field='inner_product_param.num_output')
        self.num_output = int(p.num_output)
        self.bias_term = bool(p.bias_term)
        self.transpose = bool(p.transpose)
        shape = bottom[0].shape
        self.axis = canonical_axis(int(p.axis), len(shape), self, 'inner_product_param.axis')
        self.K = 1
        for d in shape[self.axis:]:
            self.K *= int(d)
        if self.blobs:
            want = [(self.K, self.num_output) if self.transpose else (self.num_output, self.K)]
            if self.bias_term:
                want.append((self.num_output,))
            if len(self.blobs) != len(want):
                raise self.error('expected %d parameter blobs, got %d' % (len(want), len(self.blobs)),
                                 field='blobs')
            for i, (b, w) in enumerate(zip(self.blobs, want)):
                if b.count != w[0] * (w[1] if len(w) > 1 else 1):
                    raise self.error('parameter blob %d has shape %s, expected %s' % (i, b.shape, w),
                                     field='blobs')
                if b.shape != w:
                    b.reshape(w)
            return
        wshape = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        self.blobs = [self.filled_blob(wshape, p, 'weight_filler')]
        if self.bias_term:
            self.blobs.append(self.filled_blob((self.num_output,), p, 'bias_filler'))

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        k = 1
        for d in shape[self.axis:]:
            k *= int(d)
        if k != self.K:
            raise self.error('input size incompatible with inner product parameters: K %d, expected %d'
                             % (k, self.K), field='bottom')
        self.M = 1
        for d in shape[:self.axis]:
            self.M *= int(d)
        top[0].reshape(tuple(shape[:self.axis]) + (self.num_output,))

    def _weight_nk(self):
        w = self.blobs[0].data
        return w.T if self.transpose else w  # (N, K)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.M, self.K)
        y = x @ self._weight_nk().T
        if self.bias_term:
            y = y + self.blobs[1].data
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.M, self.num_output)
        x = bottom[0].data.reshape(self.M, self.K)
        if self.param_propagate_down[0]:
            if self.transpose:
                self.blobs[0].diff += x.T @ dy          # (K, N)
            else:
                self.blobs[0].diff += dy.T @ x          # (N, K)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = (dy @ self._weight_nk()).reshape(bottom[0].shape)
