"""The pieces of one CRF-Grad step as separate layers (paper Fig. 2), for unrolled nets.

One step t of :class:`~crfgrad_cupy.layers.crfgrad.CrfGradLayer` written with these layers:

    psi   = CrfUnary(prob)                         (once; learnable w_u)
    s_t   = Convolution(x_t)  (bias-free, L×L×k×k, pad (k-1)/2)   - spatial term
    b_t   = Permutohedral(x_t, feat, feat)  (neighbourhood 1, offset NONE, SYMMETRIC) - bilateral
    y_t   = CrfGradStep(x_t, psi, s_t, b_t)      = x_t - γ (psi + s_t + b_t)
    x_t+1 = SimplexProjection(y_t)               (leaky, along the channel axis)

with the filters shared across steps by ``param { name: ... }`` (prototxt/crf_grad_unrolled.prototxt).
"""
from ..core.projection import project_simplex, project_simplex_vjp
from ..core.unary import unary, unary_grad_w, unary_grad_z
from .base import Layer, register


@register('CrfUnary')
class CrfUnaryLayer(Layer):
    """top = -w·log(bottom + log_eps) (eq. 3).  crf_unary_param {log_eps (0.1), weight_init (0.1)};
    blob [0] = w (1, 1, 1, 1).  Any bottom shape; in-place allowed."""
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.crf_unary_param
        self.log_eps = float(p.log_eps)
        if not self.blobs:
            self.blobs = [self.make_blob((1, 1, 1, 1))]
            self.blobs[0].data = self.xp.full((1, 1, 1, 1), p.weight_init, dtype=self.dtype)
        elif len(self.blobs) != 1 or self.blobs[0].count != 1:
            raise self.error('needs one parameter blob with one value (the unary weight)', field='blobs')
        self._z = None

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        z = bottom[0].data
        self._z = z.copy() if top[0] is bottom[0] else z
        top[0].data[...] = unary(z, self.blobs[0].data.reshape(()), self.log_eps)

    def backward(self, top, propagate_down, bottom):
        g = top[0].diff
        z = self._z if top[0] is bottom[0] else bottom[0].data
        w = self.blobs[0].data.reshape(())
        if self.param_propagate_down[0]:
            self.blobs[0].diff[...] += unary_grad_w(g, z, self.log_eps).reshape(1, 1, 1, 1)
        if propagate_down[0]:
            bottom[0].diff[...] = unary_grad_z(g, z, w, self.log_eps)


@register('CrfGradStep')
class CrfGradStepLayer(Layer):
    """top = bottom[0] - step_size · Σ_{i>=1} bottom[i]  (the gradient step, eq. 10).
    crf_grad_step_param {step_size (0.1)}; all bottoms of one shape; top may be bottom[0]."""
    min_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.step_size = float(self.param.crf_grad_step_param.step_size)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != shape:
                raise self.error('bottom %d has shape %s but bottom 0 has %s' % (i, b.shape, shape),
                                 field='bottom')
        if top[0] is not bottom[0]:
            top[0].reshape(shape)
        for b in bottom[1:]:
            if b is top[0]:
                raise self.error('only bottom 0 may be computed in place', field='top')

    def forward(self, bottom, top):
        q = bottom[0].data
        if len(bottom) == 1:
            top[0].data[...] = q
            return
        g = bottom[1].data
        for b in bottom[2:]:
            g = g + b.data
        top[0].data[...] = q + q.dtype.type(-self.step_size) * g

    def backward(self, top, propagate_down, bottom):
        g = top[0].diff
        scaled = g * g.dtype.type(-self.step_size)
        for i in range(1, len(bottom)):
            if propagate_down[i]:
                bottom[i].diff[...] = scaled
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].diff[...] = g


@register('SimplexProjection')
class SimplexProjectionLayer(Layer):
    """Leaky projection of every pixel's channel vector (axis 1) onto the simplex (Alg. 2, eq. 12),
    backward = eq. (13).  simplex_projection_param {leak_factor (0.5)}; in-place allowed."""
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        self.leak_factor = float(self.param.simplex_projection_param.leak_factor)
        if len(bottom[0].shape) < 2:
            raise self.error('bottom must have a channel axis (N, L, ...), got %s' % (bottom[0].shape,),
                             field='bottom')
        self._s = self._info = None

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        s = bottom[0].data
        out, self._info = project_simplex(s, self.leak_factor, axis=1)
        self._s = s.copy() if top[0] is bottom[0] else s
        top[0].data[...] = out

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = project_simplex_vjp(top[0].diff, self._s, self._info, self.leak_factor, axis=1)
