"""Layers that move or combine values without arithmetic on them (except Eltwise):
Eltwise, Crop, Concat, Slice, Flatten, Reshape, Silence — Caffe semantics."""
import numpy as np

from .. import backend
from ..proto import caffe_pb2
from .base import Layer
from .base import register


def canonical_axis(axis, ndim, layer, field='axis'):
    """Caffe's CanonicalAxisIndex: ``axis`` in [-ndim, ndim), negatives count from the end."""
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise layer.error('axis %d out of range for a %d-axis bottom' % (axis, ndim), field=field)
    return axis + ndim if axis < 0 else axis


def _count(shape, start=0, end=None):
    return int(np.prod(shape[start:end], dtype=np.int64))


# --------------------------------------------------------------------------- Eltwise

@register('Eltwise')
class EltwiseLayer(Layer):
    """eltwise_param: operation (PROD, SUM (default), MAX), coeff (SUM only; none or one
    per bottom), stable_prod_grad (true).  All bottoms have one shape; top has it too.

    SUM: y = sum_i c_i x_i, dx_i = c_i dy.  PROD: y = prod_i x_i,
    dx_i = dy * prod_{j != i} x_j (stable) or dy * y / x_i.  MAX: bottoms 0 and 1 are
    compared with ``x0 > x1`` (ties go to bottom 1), later bottoms win only when
    strictly greater; dy goes to the winning bottom, 0 to the others."""
    min_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.eltwise_param
        self.op = int(p.operation)
        if self.op not in (caffe_pb2.EltwiseParameter.PROD, caffe_pb2.EltwiseParameter.SUM,
                           caffe_pb2.EltwiseParameter.MAX):
            raise self.error('unknown operation %d' % self.op, field='eltwise_param.operation')
        coeffs = list(p.coeff)
        if coeffs and len(coeffs) != len(bottom):
            raise self.error('takes one coefficient per bottom blob (%d coeffs, %d bottoms)'
                             % (len(coeffs), len(bottom)), field='eltwise_param.coeff')
        if coeffs and self.op == caffe_pb2.EltwiseParameter.PROD:
            raise self.error('coefficients are only allowed for SUM', field='eltwise_param.coeff')
        self.coeffs = [float(np.float32(c)) for c in coeffs] if coeffs else [1.0] * len(bottom)
        self.stable_prod_grad = bool(p.stable_prod_grad)
        self._saved = {}
        self.max_idx = None

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.error('bottom[0] has shape %s but bottom[%d] has shape %s'
                                 % (bottom[0].shape, i, b.shape), field='bottom')
        if all(top[0] is not b for b in bottom):
            top[0].reshape(bottom[0].shape)

    def _inputs(self, bottom):
        return [self._saved.get(i, b.data) for i, b in enumerate(bottom)]

    def forward(self, bottom, top):
        xs = [b.data for b in bottom]
        # in-place: keep the bottom that the top overwrites (its value is needed in backward)
        self._saved = {i: b.data.copy() for i, b in enumerate(bottom)
                       if b is top[0] and self.op != caffe_pb2.EltwiseParameter.SUM}
        xp = backend.get_array_module(*xs)
        t = xs[0].dtype.type
        if self.op == caffe_pb2.EltwiseParameter.SUM:
            y = xs[0] * t(self.coeffs[0]) if self.coeffs[0] != 1 else xs[0].copy()
            for c, x in zip(self.coeffs[1:], xs[1:]):
                y = y + (x * t(c) if c != 1 else x)
        elif self.op == caffe_pb2.EltwiseParameter.PROD:
            y = xs[0] * xs[1]
            for x in xs[2:]:
                y = y * x
        else:
            take0 = xs[0] > xs[1]
            y = xp.where(take0, xs[0], xs[1])
            idx = xp.where(take0, 0, 1).astype(np.int32)
            for k, x in enumerate(xs[2:], 2):
                better = x > y
                y = xp.where(better, x, y)
                idx = xp.where(better, np.int32(k), idx)
            self.max_idx = idx
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        xs = self._inputs(bottom)
        grads = {}
        for i in range(len(bottom)):
            if not propagate_down[i]:
                continue
            if self.op == caffe_pb2.EltwiseParameter.SUM:
                c = self.coeffs[i]
                grads[i] = dy * dy.dtype.type(c) if c != 1 else dy.copy()
            elif self.op == caffe_pb2.EltwiseParameter.PROD:
                if self.stable_prod_grad:
                    g = None
                    for j, x in enumerate(xs):
                        if j != i:
                            g = x.copy() if g is None else g * x
                else:
                    g = top[0].data / xs[i]
                grads[i] = g * dy
            else:
                grads[i] = dy * (self.max_idx == i)
        # write after all are computed (a bottom may be the top: in-place)
        for i, g in grads.items():
            bottom[i].diff[...] = g


# --------------------------------------------------------------------------- Crop

@register('Crop')
class CropLayer(Layer):
    """crop_param: axis (2), offset (none: 0; one: all cropped axes; else one per axis
    from ``axis`` on).  Axes before ``axis`` keep bottom[0]'s size, the others take
    bottom[1]'s; top = bottom0[..., off_i : off_i + size_i, ...].  bottom[1] (the
    reference) never gets a diff."""
    exact_num_bottom = 2
    exact_num_top = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def layer_setup(self, bottom, top):
        if len(bottom[0].shape) != len(bottom[1].shape):
            raise self.error('bottom[0] and bottom[1] need the same number of axes (%d vs %d)'
                             % (len(bottom[0].shape), len(bottom[1].shape)), field='bottom')

    def reshape(self, bottom, top):
        p = self.param.crop_param
        s0, s1 = bottom[0].shape, bottom[1].shape
        ndim = len(s0)
        if len(s1) != ndim:
            raise self.error('bottom[0] and bottom[1] need the same number of axes (%d vs %d)'
                             % (ndim, len(s1)), field='bottom')
        start = canonical_axis(p.axis, ndim, self, 'crop_param.axis')
        offsets = [int(o) for o in p.offset]
        if len(offsets) > 1 and start + len(offsets) != ndim:
            raise self.error('number of offsets (%d) must equal the number of cropped axes (%d)'
                             % (len(offsets), ndim - start), field='crop_param.offset')
        self.slices = []
        shape = []
        for i in range(ndim):
            off, size = 0, s0[i]
            if i >= start:
                size = s1[i]
                if len(offsets) == 1:
                    off = offsets[0]
                elif len(offsets) > 1:
                    off = offsets[i - start]
                if s0[i] - off < s1[i]:
                    raise self.error('axis %d: offset %d + size %d exceeds the bottom size %d'
                                     % (i, off, s1[i], s0[i]), field='crop_param.offset')
            shape.append(size)
            self.slices.append(slice(off, off + size))
        self.slices = tuple(self.slices)
        top[0].reshape(tuple(shape))

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.slices]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            d = bottom[0].diff
            d[...] = 0
            d[self.slices] = top[0].diff


# --------------------------------------------------------------------------- Concat

@register('Concat')
class ConcatLayer(Layer):
    """concat_param: axis (1) or the legacy concat_dim (not both).  Bottoms agree on
    every other axis; backward hands each bottom its slice of the top diff."""
    min_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.concat_param
        if p.HasField('axis') and p.HasField('concat_dim'):
            raise self.error('either axis or concat_dim should be specified, not both',
                             field='concat_param')

    def reshape(self, bottom, top):
        p = self.param.concat_param
        s0 = bottom[0].shape
        ndim = len(s0)
        if p.HasField('concat_dim'):
            axis = int(p.concat_dim)
            if axis >= ndim:
                raise self.error('concat_dim %d out of range for %d axes' % (axis, ndim),
                                 field='concat_param.concat_dim')
        else:
            axis = canonical_axis(p.axis, ndim, self, 'concat_param.axis')
        self.axis = axis
        total = 0
        self.sizes = []
        for i, b in enumerate(bottom):
            if len(b.shape) != ndim:
                raise self.error('all bottoms need the same number of axes (bottom[%d]: %d, bottom[0]: %d)'
                                 % (i, len(b.shape), ndim), field='bottom')
            for j in range(ndim):
                if j != axis and b.shape[j] != s0[j]:
                    raise self.error('bottom[%d] shape %s does not match bottom[0] shape %s except on axis %d'
                                     % (i, b.shape, s0, axis), field='bottom')
            self.sizes.append(b.shape[axis])
            total += b.shape[axis]
        shape = list(s0)
        shape[axis] = total
        if len(bottom) == 1 and top[0] is bottom[0]:
            return
        top[0].reshape(tuple(shape))

    def forward(self, bottom, top):
        if len(bottom) == 1:
            if top[0] is not bottom[0]:
                top[0].data[...] = bottom[0].data
            return
        xp = backend.get_array_module(bottom[0].data)
        top[0].data[...] = xp.concatenate([b.data for b in bottom], axis=self.axis)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        if len(bottom) == 1:
            if propagate_down[0] and top[0] is not bottom[0]:
                bottom[0].diff[...] = dy
            return
        start = 0
        index = [slice(None)] * dy.ndim
        for i, (b, n) in enumerate(zip(bottom, self.sizes)):
            if propagate_down[i]:
                index[self.axis] = slice(start, start + n)
                b.diff[...] = dy[tuple(index)]
            start += n


# --------------------------------------------------------------------------- Slice

@register('Slice')
class SliceLayer(Layer):
    """slice_param: axis (1) or legacy slice_dim (not both); slice_point (one fewer than
    the tops, strictly increasing) or none: the axis is divided equally among the tops."""
    exact_num_bottom = 1
    min_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.slice_param
        if p.HasField('axis') and p.HasField('slice_dim'):
            raise self.error('either axis or slice_dim should be specified, not both', field='slice_param')
        points = [int(s) for s in p.slice_point]
        if points and len(points) != len(top) - 1:
            raise self.error('needs %d slice points for %d tops, got %d'
                             % (len(top) - 1, len(top), len(points)), field='slice_param.slice_point')

    def reshape(self, bottom, top):
        p = self.param.slice_param
        s = bottom[0].shape
        ndim = len(s)
        if p.HasField('slice_dim'):
            axis = int(p.slice_dim)
            if axis >= ndim:
                raise self.error('slice_dim %d out of range for %d axes' % (axis, ndim),
                                 field='slice_param.slice_dim')
        else:
            axis = canonical_axis(p.axis, ndim, self, 'slice_param.axis')
        self.axis = axis
        dim = s[axis]
        points = [int(q) for q in p.slice_point]
        if points:
            sizes, prev = [], 0
            for q in points:
                if q <= prev:
                    raise self.error('slice points must be strictly increasing and positive: %s' % points,
                                     field='slice_param.slice_point')
                sizes.append(q - prev)
                prev = q
            if prev > dim:
                raise self.error('slice point %d beyond axis %d of size %d' % (prev, axis, dim),
                                 field='slice_param.slice_point')
            sizes.append(dim - prev)
        else:
            if dim % len(top):
                raise self.error('axis %d of size %d cannot be divided equally among %d tops'
                                 % (axis, dim, len(top)), field='slice_param')
            sizes = [dim // len(top)] * len(top)
        self.sizes = sizes
        if len(top) == 1 and top[0] is bottom[0]:
            return
        for t, n in zip(top, sizes):
            shape = list(s)
            shape[axis] = n
            t.reshape(tuple(shape))

    def forward(self, bottom, top):
        x = bottom[0].data
        if len(top) == 1:
            if top[0] is not bottom[0]:
                top[0].data[...] = x
            return
        start = 0
        index = [slice(None)] * x.ndim
        for t, n in zip(top, self.sizes):
            index[self.axis] = slice(start, start + n)
            t.data[...] = x[tuple(index)]
            start += n

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if len(top) == 1:
            if top[0] is not bottom[0]:
                bottom[0].diff[...] = top[0].diff
            return
        xp = backend.get_array_module(top[0].diff)
        bottom[0].diff[...] = xp.concatenate([t.diff for t in top], axis=self.axis)


# --------------------------------------------------------------------------- Flatten / Reshape

class _ViewLayer(Layer):
    """Top is a reshaped view of the bottom's data; backward copies the diff back."""
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error('%s does not allow in-place computation' % self.type, field='top')
        self.read_param(bottom)

    def read_param(self, bottom):
        """Parse the layer parameters (called once from layer_setup)."""

    def forward(self, bottom, top):
        top[0].data = bottom[0].data.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register('Flatten')
class FlattenLayer(_ViewLayer):
    """flatten_param: axis (1), end_axis (-1): axes axis..end_axis merged into one."""

    def reshape(self, bottom, top):
        p = self.param.flatten_param
        s = bottom[0].shape
        ndim = len(s)
        start = canonical_axis(p.axis, ndim, self, 'flatten_param.axis')
        end = canonical_axis(p.end_axis, ndim, self, 'flatten_param.end_axis')
        if end < start:
            raise self.error('end_axis %d comes before axis %d' % (end, start), field='flatten_param.end_axis')
        shape = tuple(s[:start]) + (_count(s, start, end + 1),) + tuple(s[end + 1:])
        top[0].reshape(shape)


@register('Reshape')
class ReshapeLayer(_ViewLayer):
    """reshape_param: shape (dims; 0 = copy the bottom dim at that place, -1 = infer, at most
    one), axis (0) and num_axes (-1 = to the end): the bottom axes [axis, axis+num_axes)
    are replaced by ``shape``.  Negative axis counts from the end (-1 = after the last)."""

    def read_param(self, bottom):
        p = self.param.reshape_param
        dims = [int(d) for d in p.shape.dim]
        self.dims = dims
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error('new shape contains more than one -1 (inferred) dimension',
                             field='reshape_param.shape')
        bad = [d for d in dims if d < -1]
        if bad:
            raise self.error('invalid dimension %d in the new shape' % bad[0], field='reshape_param.shape')
        self.inferred_axis = inferred[0] if inferred else -1
        self.constant_count = 1
        for d in dims:
            if d > 0:
                self.constant_count *= d
        if int(p.num_axes) < -1:
            raise self.error('num_axes must be >= -1, got %d' % p.num_axes, field='reshape_param.num_axes')

    def reshape(self, bottom, top):
        p = self.param.reshape_param
        s = bottom[0].shape
        ndim = len(s)
        axis = int(p.axis)
        start = axis if axis >= 0 else ndim + axis + 1
        if not 0 <= start <= ndim:
            raise self.error('axis %d out of range for %d axes' % (axis, ndim), field='reshape_param.axis')
        num_axes = int(p.num_axes)
        end = ndim if num_axes == -1 else start + num_axes
        if end > ndim:
            raise self.error('axis + num_axes (%d) exceeds the %d bottom axes' % (end, ndim),
                             field='reshape_param.num_axes')
        replaced = end - start
        shape = list(s[:start]) + list(self.dims) + list(s[end:])
        for c in self.copy_axes:
            if c >= replaced:
                raise self.error('new shape contains a 0 at position %d but there is no bottom axis to copy'
                                 % c, field='reshape_param.shape')
            shape[start + c] = s[start + c]
        total = _count(s)
        if self.inferred_axis >= 0:
            explicit = self.constant_count * _count(s, 0, start) * _count(s, end)
            for c in self.copy_axes:
                explicit *= shape[start + c]
            if explicit == 0 or total % explicit:
                raise self.error('bottom count %d is not divisible by the product of the given dims %d'
                                 % (total, explicit), field='reshape_param.shape')
            shape[start + self.inferred_axis] = total // explicit
        if _count(shape) != total:
            raise self.error('new shape %s has count %d, bottom %s has count %d'
                             % (tuple(shape), _count(shape), s, total), field='reshape_param.shape')
        top[0].reshape(tuple(shape))


# --------------------------------------------------------------------------- Silence

@register('Silence')
class SilenceLayer(Layer):
    """Consumes its bottoms (so they are not net outputs); no tops; backward gives zeros."""
    min_bottom = 1
    exact_num_top = 0

    def reshape(self, bottom, top):
        """Nothing to shape."""

    def forward(self, bottom, top):
        """Nothing to compute."""

    def backward(self, top, propagate_down, bottom):
        for b, pd in zip(bottom, propagate_down):
            if pd:
                b.diff[...] = 0
