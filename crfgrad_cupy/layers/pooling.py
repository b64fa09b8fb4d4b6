"""Pooling layer (Caffe's MAX / AVE / STOCHASTIC-at-test, global pooling) and the pure
pooling functions it uses (also used by LRN WITHIN_CHANNEL).

Geometry (per spatial axis, Caffe): ``out = ceil((in + 2p - k)/s) + 1``; when any pad is
non-zero, ``out -= 1`` if ``(out-1)·s >= in + p``.  Window of output i: rows
``[i·s - p, min(i·s - p + k, in + p))`` of which only the in-image rows are read.
The functions loop over the k_h·k_w taps (never over pixels): tap (u, v) of every
window is one strided view of a padded canvas.
"""
import math

import numpy as np

from .. import backend
from ..proto import caffe_pb2
from .base import Layer, register

FLT_MAX = float(np.finfo(np.float32).max)


def pooled_size(size, k, s, p, any_pad):
    """Caffe's pooled length (ceil rounding, float32 division, clipping rule when padded)."""
    out = int(math.ceil(float(np.float32(size + 2 * p - k) / np.float32(s)))) + 1
    if any_pad and (out - 1) * s >= size + p:
        out -= 1
    return out


def _canvas_hw(image_hw, out_hw, k, s, p):
    """Size of a canvas covering every window: rows [-p_h, -p_h + Hc)."""
    return tuple(max(image_hw[a] + p[a], (out_hw[a] - 1) * s[a] + k[a] - p[a]) + p[a] for a in range(2))


def _canvas(x, out_hw, k, s, p, fill):
    """Padded copy of x covering every window, ``fill`` outside the image."""
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    canvas = xp.full((n, c) + _canvas_hw((h, w), out_hw, k, s, p), fill, dtype=x.dtype)
    canvas[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    return canvas


def _tap(a, u, v, out_hw, s):
    """View of tap (u, v) of every window: a[:, :, u + i·s_h, v + j·s_w] for i < Ho, j < Wo."""
    return a[:, :, u:u + (out_hw[0] - 1) * s[0] + 1:s[0], v:v + (out_hw[1] - 1) * s[1] + 1:s[1]]


def max_pool2d(x, k, s, p, out_hw):
    """MAX pooling. x (N, C, H, W) -> (y, arg): y (N, C, Ho, Wo); arg = index u·k_w + v of the
    winning tap (strict '>' in row-major order, so ties go to the first; padding never
    wins unless the window has no pixel, then y = -FLT_MAX as in Caffe)."""
    xp = backend.get_array_module(x)
    canvas = _canvas(x, out_hw, k, s, p, -FLT_MAX)
    best = _tap(canvas, 0, 0, out_hw, s).copy()
    arg = xp.zeros(best.shape, dtype=np.int32)
    for u in range(k[0]):
        for v in range(k[1]):
            if u == 0 and v == 0:
                continue
            val = _tap(canvas, u, v, out_hw, s)
            better = val > best
            best = xp.where(better, val, best)
            arg = xp.where(better, np.int32(u * k[1] + v), arg)
    return best, arg


def max_pool2d_mask(arg, k, s, p, image_hw):
    """Caffe's MAX mask top: flat input index h·W + w of each window's maximum (-1 if the
    window holds no pixel), as int64."""
    xp = backend.get_array_module(arg)
    ho, wo = arg.shape[2], arg.shape[3]
    u = arg // k[1]
    v = arg % k[1]
    hh = xp.arange(ho).reshape(ho, 1) * s[0] - p[0] + u
    ww = xp.arange(wo).reshape(1, wo) * s[1] - p[1] + v
    inside = (hh >= 0) & (hh < image_hw[0]) & (ww >= 0) & (ww < image_hw[1])
    return xp.where(inside, hh * image_hw[1] + ww, -1)


def max_pool2d_backward(dy, arg, k, s, p, image_hw):
    """dL/dx of :func:`max_pool2d`: each top diff goes to its window's maximum (summed where
    windows overlap)."""
    xp = backend.get_array_module(dy)
    n, c, ho, wo = dy.shape
    canvas = xp.zeros((n, c) + _canvas_hw(image_hw, (ho, wo), k, s, p), dtype=dy.dtype)
    zero = xp.zeros((), dtype=dy.dtype)
    for u in range(k[0]):
        for v in range(k[1]):
            _tap(canvas, u, v, (ho, wo), s)[...] += xp.where(arg == u * k[1] + v, dy, zero)
    return canvas[:, :, p[0]:p[0] + image_hw[0], p[1]:p[1] + image_hw[1]]


def ave_pool_divisor(xp, image_hw, k, s, p, out_hw, dtype):
    """(Ho, Wo) window sizes clipped to [-p, in + p) (padding counts, the ceil overhang not)."""
    sizes = []
    for a in range(2):
        start = np.arange(out_hw[a]) * s[a] - p[a]
        end = np.minimum(start + k[a], image_hw[a] + p[a])
        sizes.append(end - start)
    return xp.asarray(np.outer(sizes[0], sizes[1]).astype(dtype))


def ave_pool2d(x, k, s, p, out_hw):
    """AVE pooling: sum of the in-image pixels of each window / :func:`ave_pool_divisor`."""
    xp = backend.get_array_module(x)
    canvas = _canvas(x, out_hw, k, s, p, 0)
    acc = _tap(canvas, 0, 0, out_hw, s).copy()
    for u in range(k[0]):
        for v in range(k[1]):
            if u or v:
                acc += _tap(canvas, u, v, out_hw, s)
    return acc / ave_pool_divisor(xp, x.shape[2:], k, s, p, out_hw, x.dtype)


def ave_pool2d_backward(dy, k, s, p, image_hw):
    """dL/dx of :func:`ave_pool2d`."""
    xp = backend.get_array_module(dy)
    n, c, ho, wo = dy.shape
    g = dy / ave_pool_divisor(xp, image_hw, k, s, p, (ho, wo), dy.dtype)
    canvas = xp.zeros((n, c) + _canvas_hw(image_hw, (ho, wo), k, s, p), dtype=dy.dtype)
    for u in range(k[0]):
        for v in range(k[1]):
            _tap(canvas, u, v, (ho, wo), s)[...] += g
    return canvas[:, :, p[0]:p[0] + image_hw[0], p[1]:p[1] + image_hw[1]]


def stochastic_pool2d_test(x, k, s, out_hw):
    """Caffe's STOCHASTIC pooling at test time: Σx² / (FLT_MIN + Σx) over each window
    (windows start at i·s, padding ignored; inputs are expected to be non-negative)."""
    xp = backend.get_array_module(x)
    canvas = _canvas(x, out_hw, k, s, (0, 0), 0)
    s1 = xp.full((x.shape[0], x.shape[1]) + tuple(out_hw), np.finfo(np.float32).tiny, dtype=x.dtype)
    s2 = xp.zeros_like(s1)
    for u in range(k[0]):
        for v in range(k[1]):
            t = _tap(canvas, u, v, out_hw, s)
            s1 += t
            s2 += t * t
    return s2 / s1, s1, s2


def stochastic_pool2d_test_backward(dy, x, k, s, out_hw, s1, s2):
    """Exact derivative of :func:`stochastic_pool2d_test`: d/dx_i = (2·x_i·S1 - S2)/S1²."""
    xp = backend.get_array_module(dy)
    n, c, h, w = x.shape
    canvas = _canvas(x, out_hw, k, s, (0, 0), 0)
    dcanvas = xp.zeros_like(canvas)
    a = dy / s1
    b = dy * s2 / (s1 * s1)
    for u in range(k[0]):
        for v in range(k[1]):
            _tap(dcanvas, u, v, out_hw, s)[...] += 2 * a * _tap(canvas, u, v, out_hw, s) - b
    return dcanvas[:, :, :h, :w]


@register('Pooling')
class PoolingLayer(Layer):
    """bottom (N, C, H, W) -> top (N, C, Ho, Wo) [, MAX mask top (N, C, Ho, Wo)]."""
    exact_num_bottom = 1
    min_top = 1
    max_top = 2

    def layer_setup(self, bottom, top):
        pp = self.param.pooling_param
        P = caffe_pb2.PoolingParameter
        self.method = int(pp.pool)
        if self.method not in (P.MAX, P.AVE, P.STOCHASTIC):
            raise self.error('unknown pool method %d' % self.method, field='pooling_param.pool')
        if len(top) > 1 and self.method != P.MAX:
            raise self.error('a second (mask) top is only produced by MAX pooling', field='top')
        if self.method == P.STOCHASTIC and self.phase == caffe_pb2.TRAIN:
            raise self.error('STOCHASTIC pooling in the TRAIN phase samples with Caffe\'s GPU random '
                             'generator and is not supported; use MAX or AVE',
                             field='pooling_param.pool')
        self.global_pooling = bool(pp.global_pooling)
        has_hw = pp.HasField('kernel_h') and pp.HasField('kernel_w')
        if self.global_pooling:
            if pp.HasField('kernel_size') or pp.HasField('kernel_h') or pp.HasField('kernel_w'):
                raise self.error('with global_pooling the kernel size cannot be given',
                                 field='pooling_param.kernel_size')
        else:
            if pp.HasField('kernel_size') == has_hw:
                raise self.error('give kernel_size or both kernel_h and kernel_w (not both forms)',
                                 field='pooling_param.kernel_size')
        if pp.HasField('pad_h') or pp.HasField('pad_w'):
            if pp.HasField('pad') or not (pp.HasField('pad_h') and pp.HasField('pad_w')):
                raise self.error('give pad or both pad_h and pad_w', field='pooling_param.pad')
            self.pad = (int(pp.pad_h), int(pp.pad_w))
        else:
            self.pad = (int(pp.pad), int(pp.pad))
        if pp.HasField('stride_h') or pp.HasField('stride_w'):
            if pp.HasField('stride') or not (pp.HasField('stride_h') and pp.HasField('stride_w')):
                raise self.error('give stride or both stride_h and stride_w', field='pooling_param.stride')
            self.stride = (int(pp.stride_h), int(pp.stride_w))
        else:
            self.stride = (int(pp.stride), int(pp.stride))
        if self.global_pooling:
            if self.pad != (0, 0) or self.stride != (1, 1):
                raise self.error('with global_pooling only pad 0 and stride 1 are allowed',
                                 field='pooling_param.global_pooling')
            self.kernel = None
        else:
            self.kernel = ((int(pp.kernel_size),) * 2 if pp.HasField('kernel_size')
                           else (int(pp.kernel_h), int(pp.kernel_w)))
            if min(self.kernel) <= 0:
                raise self.error('kernel size must be positive', field='pooling_param.kernel_size')
        if min(self.stride) <= 0:
            raise self.error('stride must be positive', field='pooling_param.stride')
        if self.pad != (0, 0):
            if self.method == P.STOCHASTIC:
                raise self.error('padding is implemented only for MAX and AVE pooling',
                                 field='pooling_param.pad')
            if self.kernel is not None and (self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]):
                raise self.error('pad %s must be smaller than the kernel %s' % (self.pad, self.kernel),
                                 field='pooling_param.pad')

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error('input must have 4 axes (N, C, H, W), got shape %s' % (shape,), field='bottom')
        h, w = shape[2], shape[3]
        if self.global_pooling:
            self.k = (h, w)
        else:
            self.k = self.kernel
        any_pad = self.pad != (0, 0)
        self.out_hw = (pooled_size(h, self.k[0], self.stride[0], self.pad[0], any_pad),
                       pooled_size(w, self.k[1], self.stride[1], self.pad[1], any_pad))
        if min(self.out_hw) <= 0:
            raise self.error('kernel %s larger than the padded input %dx%d' % (self.k, h, w),
                             field='pooling_param.kernel_size')
        for t in top:
            t.reshape(shape[0], shape[1], self.out_hw[0], self.out_hw[1])

    def forward(self, bottom, top):
        P = caffe_pb2.PoolingParameter
        x = bottom[0].data
        self.image_hw = x.shape[2:]
        if self.method == P.MAX:
            y, self.arg = max_pool2d(x, self.k, self.stride, self.pad, self.out_hw)
            if len(top) > 1:
                top[1].data[...] = max_pool2d_mask(self.arg, self.k, self.stride, self.pad, self.image_hw)
        elif self.method == P.AVE:
            y = ave_pool2d(x, self.k, self.stride, self.pad, self.out_hw)
        else:
            self.x_saved = x.copy()
            y, self.s1, self.s2 = stochastic_pool2d_test(x, self.k, self.stride, self.out_hw)
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        P = caffe_pb2.PoolingParameter
        dy = top[0].diff
        if self.method == P.MAX:
            dx = max_pool2d_backward(dy, self.arg, self.k, self.stride, self.pad, self.image_hw)
        elif self.method == P.AVE:
            dx = ave_pool2d_backward(dy, self.k, self.stride, self.pad, self.image_hw)
        else:
            dx = stochastic_pool2d_test_backward(dy, self.x_saved, self.k, self.stride, self.out_hw,
                                                 self.s1, self.s2)
        bottom[0].diff[...] = dx
