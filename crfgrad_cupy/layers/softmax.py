"""Softmax and SoftmaxWithLoss (multinomial logistic loss of a softmax), as Caffe's."""
import numpy as np

from .. import backend
from ..proto import caffe_pb2
from .base import Layer
from .base import register
from .shape_ops import canonical_axis

FLT_MIN = np.float32(np.finfo(np.float32).tiny)   # C's FLT_MIN = 1.17549435e-38


def softmax(x, axis):
    """exp(x - max) / sum exp(x - max) along ``axis`` (any rank)."""
    xp = backend.get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_grad(y, dy, axis):
    """Vector-Jacobian product of the softmax: dx = (dy - sum_axis(dy * y)) * y."""
    return (dy - (dy * y).sum(axis=axis, keepdims=True)) * y


@register('Softmax')
class SoftmaxLayer(Layer):
    """softmax_param.axis (default 1; negative counts from the end).  Top has the bottom's shape."""
    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        self.axis = canonical_axis(self.param.softmax_param.axis, len(bottom[0].shape), self,
                                   'softmax_param.axis')
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = softmax(bottom[0].data, self.axis)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = softmax_grad(top[0].data, top[0].diff, self.axis)


def loss_normalizer(mode, outer, inner, valid_count):
    """Caffe's get_normalizer: FULL outer*inner, VALID #non-ignored, BATCH_SIZE outer, NONE 1,
    always at least 1.  ``valid_count`` may be an array (0-d); the result is then an array."""
    N = caffe_pb2.LossParameter
    if mode == N.FULL:
        return max(1.0, float(outer * inner))
    if mode == N.VALID:
        xp = backend.get_array_module(valid_count)
        return xp.maximum(valid_count, 1)
    if mode == N.BATCH_SIZE:
        return max(1.0, float(outer))
    if mode == N.NONE:
        return 1.0
    raise ValueError('unknown normalization mode %r' % mode)


def normalization_mode(loss_param):
    """normalization if given, else legacy normalize (true -> VALID, false -> BATCH_SIZE), else VALID."""
    if not loss_param.HasField('normalization') and loss_param.HasField('normalize'):
        return caffe_pb2.LossParameter.VALID if loss_param.normalize else caffe_pb2.LossParameter.BATCH_SIZE
    return int(loss_param.normalization)


@register('SoftmaxWithLoss')
class SoftmaxWithLossLayer(Layer):
    """bottom[0] scores (outer, C, inner) around softmax_param.axis; bottom[1] labels with
    outer*inner values (cast to int by truncation).  top[0]: the loss, shape ();
    optional top[1]: the probabilities.

    loss = -sum_valid log(max(p_label, FLT_MIN)) / normalizer, where pixels whose label
    equals loss_param.ignore_label (when set) are skipped.  Backward:
    dx = (p - onehot(label)) * top_diff / normalizer, 0 for ignored pixels; the labels
    get no diff (and may not be forced to)."""
    exact_num_bottom = 2
    min_top = 1
    max_top = 2
    is_loss = True

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def layer_setup(self, bottom, top):
        lp = self.param.loss_param
        self.has_ignore = lp.HasField('ignore_label')
        self.ignore_label = int(lp.ignore_label) if self.has_ignore else None
        self.mode = normalization_mode(lp)
        if self.mode not in (caffe_pb2.LossParameter.FULL, caffe_pb2.LossParameter.VALID,
                             caffe_pb2.LossParameter.BATCH_SIZE, caffe_pb2.LossParameter.NONE):
            raise self.error('unknown normalization mode %d' % self.mode, field='loss_param.normalization')
        self.prob = None

    def reshape(self, bottom, top):
        s0, s1 = bottom[0].shape, bottom[1].shape
        if not s0 or not s1 or s0[0] != s1[0]:
            raise self.error('data and label need the same first dimension (%s vs %s)' % (s0, s1),
                             field='bottom')
        self.axis = canonical_axis(self.param.softmax_param.axis, len(s0), self, 'softmax_param.axis')
        self.outer = int(np.prod(s0[:self.axis], dtype=np.int64))
        self.channels = int(s0[self.axis])
        self.inner = int(np.prod(s0[self.axis + 1:], dtype=np.int64))
        if self.outer * self.inner != bottom[1].count:
            raise self.error('number of labels (%d) must match number of predictions (%d = outer %d x inner %d)'
                             % (bottom[1].count, self.outer * self.inner, self.outer, self.inner),
                             field='bottom')
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape(s0)

    def _labels(self, bottom):
        """(outer, inner) int labels, the valid mask, and labels with ignored ones set to 0."""
        xp = backend.get_array_module(bottom[1].data)
        lab = bottom[1].data.reshape(self.outer, self.inner).astype(np.int64)   # truncation as C++
        if self.has_ignore:
            valid = lab != self.ignore_label
        else:
            valid = xp.ones(lab.shape, dtype=bool)
        bad = valid & ((lab < 0) | (lab >= self.channels))
        if bool(bad.any()):
            raise self.error('labels must be in [0, %d) (or the ignore_label); found %d outside'
                             % (self.channels, int(bad.sum())), field='bottom[1]')
        safe = xp.where(valid, lab, 0)
        return safe, valid

    def forward(self, bottom, top):
        x = bottom[0].data
        xp = backend.get_array_module(x)
        t = x.dtype.type
        p = softmax(x, self.axis).reshape(self.outer, self.channels, self.inner)
        self.prob = p
        lab, valid = self._labels(bottom)
        p_lab = xp.take_along_axis(p, lab[:, None, :], axis=1)[:, 0, :]
        nll = -xp.log(xp.maximum(p_lab, t(FLT_MIN)))
        loss = xp.where(valid, nll, t(0)).sum()
        count = valid.sum()
        norm = loss_normalizer(self.mode, self.outer, self.inner, count)
        top[0].data[...] = loss / xp.asarray(norm, dtype=x.dtype)
        if len(top) > 1:
            top[1].data[...] = p.reshape(top[1].shape)

    def backward(self, top, propagate_down, bottom):
        # propagate_down[1] (labels) is never served: labels get no diff.
        if not propagate_down[0]:
            return
        p = self.prob
        xp = backend.get_array_module(p)
        lab, valid = self._labels(bottom)
        onehot = xp.arange(self.channels)[None, :, None] == lab[:, None, :]
        g = p - onehot.astype(p.dtype)
        g = g * valid[:, None, :].astype(p.dtype)
        norm = loss_normalizer(self.mode, self.outer, self.inner, valid.sum())
        scale = top[0].diff.reshape(()) / xp.asarray(norm, dtype=p.dtype)
        bottom[0].diff[...] = (g * scale).reshape(bottom[0].shape)
