"""DeepLab's Interp layer: bilinear resizing with aligned corners, as in the fork.

The resize is separable, so it is written as two small interpolation matrices,
A_h (H_out x H) and A_w (W_out x W), with y = A_h x A_w^T per (n, c) plane; the
backward pass is the exact adjoint dx = A_h^T dy A_w.  The crop given by negative
pads is folded into the matrices (columns outside the crop are zero).
"""
import numpy as np

from .. import backend
from .base import Layer
from .base import register


def interp_output_size(size_eff, zoom=None, shrink=None):
    """One axis: zoom z -> s + (s-1)(z-1); shrink f -> (s-1)//f + 1; both: shrink, then zoom."""
    if shrink is not None:
        size_eff = (size_eff - 1) // shrink + 1
    if zoom is not None:
        size_eff = size_eff + (size_eff - 1) * (zoom - 1)
    return size_eff


def interp_weights(n_in_eff, n_out):
    """Caffe's align-corners sampling for one axis (all in float32, as the fork):
    output i reads input r = i * ratio with ratio = (n_in_eff-1)/(n_out-1) (0 when n_out == 1);
    returns NumPy arrays (i0, i1, lam1): the two input indices (i1 clamped at the border)
    and the weight of i1, lam1 = r - floor(r) in float32 (i0 gets 1 - lam1)."""
    ratio = np.float32(n_in_eff - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    r = np.float32(ratio) * np.arange(n_out, dtype=np.float32)
    i0 = r.astype(np.int64)                       # truncation, r >= 0
    i1 = i0 + (i0 < n_in_eff - 1)
    lam1 = (r - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam1


def interp_matrix(n_in, n_in_eff, n_out, offset, dtype):
    """(n_out, n_in) NumPy matrix A with A[i, offset+i0] += lam0, A[i, offset+i1] += lam1."""
    i0, i1, lam1 = interp_weights(n_in_eff, n_out)
    lam1 = lam1.astype(dtype)
    lam0 = dtype(1) - lam1
    cols = np.arange(n_in)[None, :]
    a = lam0[:, None] * (cols == (i0 + offset)[:, None]) + lam1[:, None] * (cols == (i1 + offset)[:, None])
    return a.astype(dtype)


def interp_forward(x, a_h, a_w):
    """x (..., H, W) -> (..., H_out, W_out): along W first, then along H (Caffe's order)."""
    xp = backend.get_array_module(x)
    t = xp.matmul(x, a_w.T)
    return xp.matmul(a_h, t)


def interp_backward(dy, a_h, a_w):
    """Adjoint of :func:`interp_forward`: dy (..., H_out, W_out) -> (..., H, W)."""
    xp = backend.get_array_module(dy)
    t = xp.matmul(a_h.T, dy)
    return xp.matmul(t, a_w)


@register('Interp')
class InterpLayer(Layer):
    """interp_param: zoom_factor, shrink_factor, height+width, pad_beg/pad_end (<= 0, a crop).

    Bottom (N, C, H, W) (fewer axes are read as trailing 1s, as Caffe's legacy shape);
    top (N, C, H_out, W_out).  H_eff = H + pad_beg + pad_end; the crop starts at row and
    column -pad_beg.  Output size: shrink only, zoom only, else height+width, else both
    shrink then zoom (the fork's order of checks).  Same effective and output size -> copy."""
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.interp_param
        self.pad_beg = int(p.pad_beg)
        self.pad_end = int(p.pad_end)
        if self.pad_beg > 0:
            raise self.error('only non-positive padding (cropping) is supported, got %d' % self.pad_beg,
                             field='interp_param.pad_beg')
        if self.pad_end > 0:
            raise self.error('only non-positive padding (cropping) is supported, got %d' % self.pad_end,
                             field='interp_param.pad_end')
        if top[0] is bottom[0]:
            raise self.error('Interp does not allow in-place computation', field='top')
        self._cache = {}

    def _out_size(self, h_eff, w_eff):
        p = self.param.interp_param
        has_zoom, has_shrink = p.HasField('zoom_factor'), p.HasField('shrink_factor')
        if has_shrink and p.shrink_factor < 1:
            raise self.error('shrink factor must be positive', field='interp_param.shrink_factor')
        if has_zoom and p.zoom_factor < 1:
            raise self.error('zoom factor must be positive', field='interp_param.zoom_factor')
        if has_shrink and not has_zoom:
            f = int(p.shrink_factor)
            return interp_output_size(h_eff, shrink=f), interp_output_size(w_eff, shrink=f)
        if has_zoom and not has_shrink:
            z = int(p.zoom_factor)
            return interp_output_size(h_eff, zoom=z), interp_output_size(w_eff, zoom=z)
        if p.HasField('height') and p.HasField('width'):
            return int(p.height), int(p.width)
        if has_zoom and has_shrink:
            z, f = int(p.zoom_factor), int(p.shrink_factor)
            return (interp_output_size(h_eff, zoom=z, shrink=f), interp_output_size(w_eff, zoom=z, shrink=f))
        raise self.error('give zoom_factor, shrink_factor, or both height and width', field='interp_param')

    def reshape(self, bottom, top):
        s = bottom[0].shape
        if len(s) > 4:
            raise self.error('bottom must have at most 4 axes, got shape %s' % (s,), field='bottom')
        n, c, h, w = tuple(s) + (1,) * (4 - len(s))
        h_eff = h + self.pad_beg + self.pad_end
        w_eff = w + self.pad_beg + self.pad_end
        if h_eff <= 0 or w_eff <= 0:
            raise self.error('cropped input size %dx%d must be positive' % (h_eff, w_eff),
                             field='interp_param')
        h_out, w_out = self._out_size(h_eff, w_eff)
        if h_out <= 0 or w_out <= 0:
            raise self.error('output size %dx%d must be positive' % (h_out, w_out), field='interp_param')
        self.in_shape4 = (n, c, h, w)
        self.h_eff, self.w_eff, self.h_out, self.w_out = h_eff, w_eff, h_out, w_out
        self.off = -self.pad_beg
        self.copy = (h_eff == h_out and w_eff == w_out)
        top[0].reshape((n, c, h_out, w_out))

    def _matrices(self, arr):
        xp = backend.get_array_module(arr)
        dtype = arr.dtype.type
        key = (self.in_shape4[2], self.in_shape4[3], self.h_eff, self.w_eff, self.h_out, self.w_out,
               self.off, np.dtype(dtype).str, xp.__name__)
        if key not in self._cache:
            self._cache = {key: (
                xp.asarray(interp_matrix(self.in_shape4[2], self.h_eff, self.h_out, self.off, dtype)),
                xp.asarray(interp_matrix(self.in_shape4[3], self.w_eff, self.w_out, self.off, dtype)))}
        return self._cache[key]

    def _crop(self):
        o = self.off
        return (Ellipsis, slice(o, o + self.h_eff), slice(o, o + self.w_eff))

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.in_shape4)
        if self.copy:
            top[0].data[...] = x[self._crop()]
            return
        a_h, a_w = self._matrices(x)
        top[0].data[...] = interp_forward(x, a_h, a_w)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff
        xp = backend.get_array_module(dy)
        if self.copy:
            dx = xp.zeros(self.in_shape4, dy.dtype)
            dx[self._crop()] = dy
        else:
            a_h, a_w = self._matrices(dy)
            dx = interp_backward(dy, a_h, a_w)
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)
