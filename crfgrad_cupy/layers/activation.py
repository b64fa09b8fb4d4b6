"""Element-wise ("neuron") layers as in Caffe: ReLU, PReLU, Sigmoid, TanH, Power,
AbsVal, Dropout.  One bottom, one top of the same shape (any rank); in-place use
(top is bottom) is allowed except for AbsVal (Caffe refuses it too)."""
import numpy as np

from .. import backend
from ..proto import caffe_pb2
from .base import Layer
from .base import register
from .fillers import fill


class _NeuronLayer(Layer):
    """Common shape rule: top has the bottom's shape."""
    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)


# --------------------------------------------------------------------------- functions

def relu(x, negative_slope=0.0):
    """y = max(x, 0) + slope * min(x, 0)."""
    xp = backend.get_array_module(x)
    if negative_slope == 0:
        return xp.maximum(x, 0)
    return xp.maximum(x, 0) + x.dtype.type(negative_slope) * xp.minimum(x, 0)


def relu_grad(x, dy, negative_slope=0.0):
    """dx = dy * (1 if x > 0 else slope)   (x == 0 takes the slope, as Caffe)."""
    xp = backend.get_array_module(x)
    return dy * xp.where(x > 0, x.dtype.type(1), x.dtype.type(negative_slope))


def sigmoid(x):
    """y = 1 / (1 + exp(-x)), evaluated as 0.5 tanh(x/2) + 0.5 (no overflow)."""
    xp = backend.get_array_module(x)
    half = x.dtype.type(0.5)
    return half * xp.tanh(half * x) + half


# --------------------------------------------------------------------------- layers

@register('ReLU')
class ReLULayer(_NeuronLayer):
    """relu_param.negative_slope (default 0).  Backward reads the bottom data, which
    for in-place use is the top (the sign is preserved for slope >= 0)."""

    def layer_setup(self, bottom, top):
        self.negative_slope = float(self.param.relu_param.negative_slope)

    def forward(self, bottom, top):
        top[0].data[...] = relu(bottom[0].data, self.negative_slope)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = relu_grad(bottom[0].data, top[0].diff, self.negative_slope)


@register('PReLU')
class PReLULayer(_NeuronLayer):
    """Learned negative slope a_c per channel (axis 1), or one shared scalar.
    blob[0]: (C,) or () with ``channel_shared``; default filler constant 0.25.
    y = max(x, 0) + a_c min(x, 0); da_c += sum dy * x * [x <= 0]; dx = dy * ([x > 0] + a_c [x <= 0])."""

    def layer_setup(self, bottom, top):
        p = self.param.prelu_param
        self._x_saved = None
        if len(bottom[0].shape) < 2:
            raise self.error('bottom must have at least 2 axes, got shape %s' % (bottom[0].shape,),
                             field='bottom')
        self.channel_shared = bool(p.channel_shared)
        channels = bottom[0].shape[1]
        if not self.blobs:
            blob = self.make_blob(() if self.channel_shared else (channels,))
            if p.HasField('filler'):
                fill(blob, p.filler, layer=self.name)
            else:
                filler = caffe_pb2.FillerParameter(type='constant', value=0.25)
                fill(blob, filler, layer=self.name)
            self.blobs = [blob]
        if len(self.blobs) != 1:
            raise self.error('expected 1 parameter blob, got %d' % len(self.blobs), field='blobs')
        want = 1 if self.channel_shared else channels
        if self.blobs[0].count != want:
            raise self.error('negative slope blob has %d values, expected %d (channel_shared: %s)'
                             % (self.blobs[0].count, want, self.channel_shared), field='prelu_param')

    def reshape(self, bottom, top):
        if len(bottom[0].shape) < 2:
            raise self.error('bottom must have at least 2 axes, got shape %s' % (bottom[0].shape,),
                             field='bottom')
        super().reshape(bottom, top)

    def _slope(self, x):
        a = self.blobs[0].data
        if self.channel_shared:
            return a.reshape(())
        return a.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward(self, bottom, top):
        x = bottom[0].data
        self._x_saved = x.copy() if top[0] is bottom[0] else None
        xp = backend.get_array_module(x)
        top[0].data[...] = xp.maximum(x, 0) + self._slope(x) * xp.minimum(x, 0)

    def backward(self, top, propagate_down, bottom):
        x = self._x_saved if (top[0] is bottom[0] and self._x_saved is not None) else bottom[0].data
        xp = backend.get_array_module(x)
        dy = top[0].diff
        neg = x <= 0
        # parameter first: in-place, writing the bottom diff overwrites the top diff
        if self.param_propagate_down and self.param_propagate_down[0]:
            contrib = dy * x * neg
            if self.channel_shared:
                self.blobs[0].diff[...] += contrib.sum()
            else:
                axes = (0,) + tuple(range(2, x.ndim))
                self.blobs[0].diff[...] += contrib.sum(axis=axes).reshape(self.blobs[0].shape)
        if propagate_down[0]:
            bottom[0].diff[...] = dy * xp.where(neg, self._slope(x), x.dtype.type(1))


@register('Sigmoid')
class SigmoidLayer(_NeuronLayer):
    """y = 1/(1 + e^-x); dx = dy * y (1 - y) (from the top data, so in-place works)."""

    def forward(self, bottom, top):
        top[0].data[...] = sigmoid(bottom[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * y * (1 - y)


@register('TanH')
class TanHLayer(_NeuronLayer):
    """y = tanh(x); dx = dy * (1 - y^2)."""

    def forward(self, bottom, top):
        xp = backend.get_array_module(bottom[0].data)
        top[0].data[...] = xp.tanh(bottom[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * (1 - y * y)


@register('Power')
class PowerLayer(_NeuronLayer):
    """y = (shift + scale * x)^power  (power_param: power 1, scale 1, shift 0).

    Caffe's special cases are kept: scale * power == 0 gives the constant
    1 (power 0) or shift^power and a zero gradient; power 1 gives dx = scale * dy;
    power 2 uses dx = dy * 2 scale (shift + scale x); shift 0 uses dx = dy * power * y / x
    (inf/NaN at x = 0, as Caffe); otherwise dx = dy * power * scale * y / (shift + scale x)."""

    def layer_setup(self, bottom, top):
        p = self.param.power_param
        self.power = float(np.float32(p.power))
        self.scale = float(np.float32(p.scale))
        self.shift = float(np.float32(p.shift))
        self.diff_scale = self.power * self.scale
        self._x_saved = None

    def forward(self, bottom, top):
        x = bottom[0].data
        xp = backend.get_array_module(x)
        t = x.dtype.type
        self._x_saved = x.copy() if top[0] is bottom[0] else None
        if self.diff_scale == 0:
            value = 1.0 if self.power == 0 else float(np.power(t(self.shift), t(self.power)))
            top[0].data[...] = value
            return
        y = x * t(self.scale) if self.scale != 1 else x
        if self.shift != 0:
            y = y + t(self.shift)
        if self.power != 1:
            y = xp.power(y, t(self.power))
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self._x_saved if (top[0] is bottom[0] and self._x_saved is not None) else bottom[0].data
        t = x.dtype.type
        dy = top[0].diff
        if self.diff_scale == 0:
            bottom[0].diff[...] = 0
            return
        if self.power == 1:
            bottom[0].diff[...] = dy * t(self.diff_scale)
            return
        if self.power == 2:
            g = x * t(self.diff_scale * self.scale)
            if self.shift != 0:
                g = g + t(self.diff_scale * self.shift)
        elif self.shift == 0:
            with np.errstate(divide='ignore', invalid='ignore'):
                g = (top[0].data / x) * t(self.power)
        else:
            base = x * t(self.scale) if self.scale != 1 else x
            base = base + t(self.shift)
            with np.errstate(divide='ignore', invalid='ignore'):
                g = top[0].data / base
            if self.diff_scale != 1:
                g = g * t(self.diff_scale)
        bottom[0].diff[...] = dy * g


@register('AbsVal')
class AbsValLayer(_NeuronLayer):
    """y = |x|; dx = dy * sign(x) (sign(0) = 0).  Not in-place (as Caffe)."""

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error('AbsVal does not allow in-place computation', field='top')

    def forward(self, bottom, top):
        xp = backend.get_array_module(bottom[0].data)
        top[0].data[...] = xp.abs(bottom[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = backend.get_array_module(bottom[0].data)
            bottom[0].diff[...] = top[0].diff * xp.sign(bottom[0].data)


@register('Dropout')
class DropoutLayer(_NeuronLayer):
    """dropout_param.dropout_ratio r (0.5).  TEST: identity.  TRAIN: a fresh mask
    m ~ Bernoulli(1 - r) per element (from fillers.rng()), y = x * m / (1 - r);
    backward uses the same mask: dx = dy * m / (1 - r)."""

    def layer_setup(self, bottom, top):
        self.ratio = float(np.float32(self.param.dropout_param.dropout_ratio))
        if not 0.0 <= self.ratio < 1.0:
            raise self.error('dropout_ratio must be in [0, 1), got %g' % self.ratio,
                             field='dropout_param.dropout_ratio')
        self.train = self.phase == caffe_pb2.TRAIN
        self.mask = None

    def forward(self, bottom, top):
        x = bottom[0].data
        if not self.train:
            if top[0] is not bottom[0]:
                top[0].data[...] = x
            return
        from .fillers import rng
        xp = backend.get_array_module(x)
        t = x.dtype.type
        keep = rng().random(x.shape) >= self.ratio       # P(keep) = 1 - r
        self.mask = xp.asarray(keep.astype(x.dtype))
        self.scale = t(1.0) / (t(1.0) - t(self.ratio))
        top[0].data[...] = x * self.mask * self.scale

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if not self.train:
            if top[0] is not bottom[0]:
                bottom[0].diff[...] = top[0].diff
            return
        if self.mask is None or self.mask.shape != top[0].diff.shape:
            raise self.error('backward called before forward', field='phase')
        bottom[0].diff[...] = top[0].diff * self.mask * self.scale
