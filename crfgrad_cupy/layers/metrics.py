"""ArgMax and Accuracy (no gradients), as Caffe's."""
import numpy as np

from .. import backend
from .base import Layer
from .base import register
from .shape_ops import canonical_axis


def topk_desc(x, k, axis):
    """Indices and values of the ``k`` largest entries along ``axis``, ordered as Caffe's
    partial_sort with greater<pair<value, index>>: by value descending, ties by the
    larger index first.  Returns (idx, val), both with ``axis`` of length k."""
    xp = backend.get_array_module(x)
    n = x.shape[axis]
    rev = xp.flip(x, axis=axis)
    order = xp.argsort(-rev, axis=axis, kind='stable')      # stable: ties keep reversed order
    order = xp.take(order, xp.arange(k), axis=axis)
    val = xp.take_along_axis(rev, order, axis=axis)
    idx = (n - 1) - order
    return idx, val


@register('ArgMax')
class ArgMaxLayer(Layer):
    """argmax_param: out_max_val (false), top_k (1), axis (unset: per item over all but axis 0).

    With axis: top = bottom shape with axis -> top_k, holding indices (or the values when
    out_max_val).  Without axis: top (N, 1 or 2, top_k, 1, ...) (at least 3 axes); with
    out_max_val the second channel holds the values after the indices."""
    exact_num_bottom = 1
    exact_num_top = 1

    def allow_force_backward(self, bottom_index):
        return False

    def layer_setup(self, bottom, top):
        p = self.param.argmax_param
        self.out_max_val = bool(p.out_max_val)
        self.top_k = int(p.top_k)
        self.has_axis = p.HasField('axis')
        if self.top_k < 1:
            raise self.error('top_k must not be less than 1', field='argmax_param.top_k')

    def reshape(self, bottom, top):
        s = bottom[0].shape
        if self.has_axis:
            self.axis = canonical_axis(self.param.argmax_param.axis, len(s), self, 'argmax_param.axis')
            if self.top_k > s[self.axis]:
                raise self.error('top_k (%d) must be <= the size of axis %d (%d)'
                                 % (self.top_k, self.axis, s[self.axis]), field='argmax_param.top_k')
            shape = list(s)
            shape[self.axis] = self.top_k
        else:
            dim = int(np.prod(s[1:], dtype=np.int64))
            if self.top_k > dim:
                raise self.error('top_k (%d) must be <= the flattened size per item (%d)'
                                 % (self.top_k, dim), field='argmax_param.top_k')
            shape = [1] * max(3, len(s))
            shape[0] = s[0]
            shape[2] = self.top_k
            if self.out_max_val:
                shape[1] = 2
        top[0].reshape(tuple(shape))

    def forward(self, bottom, top):
        x = bottom[0].data
        xp = backend.get_array_module(x)
        if self.has_axis:
            idx, val = topk_desc(x, self.top_k, self.axis)
            top[0].data[...] = val if self.out_max_val else idx.astype(x.dtype)
        else:
            flat = x.reshape(x.shape[0], -1)
            idx, val = topk_desc(flat, self.top_k, 1)
            if self.out_max_val:
                out = xp.concatenate([idx.astype(x.dtype), val], axis=1)
            else:
                out = idx.astype(x.dtype)
            top[0].data[...] = out.reshape(top[0].shape)


@register('Accuracy')
class AccuracyLayer(Layer):
    """bottom[0] scores (outer, C, inner) around accuracy_param.axis (1); bottom[1] labels
    (outer*inner values).  top[0] (shape ()): fraction of non-ignored pixels whose label
    is among the top_k scores — correct when at most top_k classes score >= the label's
    score (0 when nothing counts); optional top[1] (C,): the same per true class."""
    exact_num_bottom = 2
    min_top = 1
    max_top = 2

    def allow_force_backward(self, bottom_index):
        return False

    def layer_setup(self, bottom, top):
        p = self.param.accuracy_param
        self.top_k = int(p.top_k)
        self.has_ignore = p.HasField('ignore_label')
        self.ignore_label = int(p.ignore_label) if self.has_ignore else None

    def reshape(self, bottom, top):
        s0 = bottom[0].shape
        if bottom[1].count == 0 or self.top_k > bottom[0].count // bottom[1].count:
            raise self.error('top_k must be less than or equal to the number of classes',
                             field='accuracy_param.top_k')
        self.axis = canonical_axis(self.param.accuracy_param.axis, len(s0), self, 'accuracy_param.axis')
        self.outer = int(np.prod(s0[:self.axis], dtype=np.int64))
        self.channels = int(s0[self.axis])
        self.inner = int(np.prod(s0[self.axis + 1:], dtype=np.int64))
        if self.outer * self.inner != bottom[1].count:
            raise self.error('number of labels (%d) must match number of predictions (%d)'
                             % (bottom[1].count, self.outer * self.inner), field='bottom')
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        xp = backend.get_array_module(x)
        lab = bottom[1].data.reshape(self.outer, self.inner).astype(np.int64)
        valid = (lab != self.ignore_label) if self.has_ignore else xp.ones(lab.shape, dtype=bool)
        bad = valid & ((lab < 0) | (lab >= self.channels))
        if bool(bad.any()):
            raise self.error('labels must be in [0, %d) (or the ignore_label); found %d outside'
                             % (self.channels, int(bad.sum())), field='bottom[1]')
        safe = xp.where(valid, lab, 0)
        p_true = xp.take_along_axis(x, safe[:, None, :], axis=1)
        num_ge = (x >= p_true).sum(axis=1)              # includes the true class itself
        correct = valid & (num_ge <= self.top_k)
        count = valid.sum()
        acc = correct.sum().astype(x.dtype)
        cnt = count.astype(x.dtype)
        top[0].data[...] = xp.where(count > 0, acc / xp.maximum(cnt, 1), 0)
        if len(top) > 1:
            flat = safe.reshape(-1)
            nums = xp.bincount(flat, weights=valid.reshape(-1).astype(np.float64), minlength=self.channels)
            hits = xp.bincount(flat, weights=correct.reshape(-1).astype(np.float64), minlength=self.channels)
            per = xp.where(nums > 0, hits / xp.maximum(nums, 1), 0)
            top[1].data[...] = per.astype(x.dtype)
