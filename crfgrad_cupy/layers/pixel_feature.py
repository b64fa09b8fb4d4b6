"""PixelFeature layer (bilateralNN / caffe-crfgd): per-pixel feature vectors for the lattice.

Bottom (N, Cb, H, W) (normally the mean-subtracted BGR image); top (N, K, H, W); no
parameters, no backward.  y = row, x = column (0-based); arithmetic in the blob dtype
(float32 as Caffe)::

    POSITION          (pos_scale·y + offset_h, pos_scale·x + offset_w)
    POSITION_AND_RGB  the two positions, then color_scale·bottom[c] for every channel
    RGB_AND_POSITION  color_scale·bottom[c] ..., then the two positions
    RGB               color_scale·bottom[c]
    RANDOM_POSITION   (pos_scale·U[0, H), pos_scale·U[0, W)) i.i.d. per pixel
    NUM_RANDOM_POSITION  the same (the fork's Reshape makes the top (N, 2, H, W))
    WARPED_POSITION   rotation by a = -rotation_angle·π/180 about (⌊H/2⌋, ⌊W/2⌋) of the
                      scaled positions, plus a third channel a / rotation_sigma
    RANDOM_ROTATE     a ~ U(-10°, 10°) drawn once; the fork's CPU formula (which
                      subtracts ⌊H/2⌋ twice in channel 0), positions not scaled

As in Caffe, the position-only and random types are computed on the first forward only
(later forwards leave the top untouched); unlike Caffe they are recomputed when the
top's shape changes (Caffe would keep zeros or stale values then).  Random numbers come
from crfgrad_cupy.layers.fillers.rng().
"""
import math

import numpy as np

from ..proto import caffe_pb2
from .base import Layer, register
from .fillers import rng

_F = caffe_pb2.PixelFeatureParameter
_ONCE = (_F.POSITION, _F.RANDOM_POSITION, _F.NUM_RANDOM_POSITION, _F.WARPED_POSITION, _F.RANDOM_ROTATE)


@register('PixelFeature')
class PixelFeatureLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.pixel_feature_param
        self.kind = p.type
        cb = bottom[0].channels
        channels = {_F.POSITION: 2, _F.RANDOM_POSITION: 2, _F.RANDOM_ROTATE: 2,
                    _F.NUM_RANDOM_POSITION: 2, _F.POSITION_AND_RGB: 2 + cb,
                    _F.RGB_AND_POSITION: 2 + cb, _F.RGB: cb, _F.WARPED_POSITION: 3}
        if self.kind not in channels:
            raise self.error('unknown feature type %d' % self.kind, field='pixel_feature_param.type')
        self.rgb_channels = cb
        self.channels = channels[self.kind]
        self._done_shape = None     # top shape of the last first-forward-only computation

    def reshape(self, bottom, top):
        if self.kind in (_F.POSITION_AND_RGB, _F.RGB_AND_POSITION, _F.RGB) and \
                bottom[0].channels != self.rgb_channels:
            raise self.error('bottom channels changed after setup (%d -> %d)'
                             % (self.rgb_channels, bottom[0].channels), field='bottom')
        b = bottom[0]
        top[0].reshape(b.num, self.channels, b.height, b.width)

    def _positions(self, n, h, w, dtype):
        """(pos_scale·y + offset_h, pos_scale·x + offset_w), each (h, w), in dtype."""
        xp = self.xp
        p = self.param.pixel_feature_param
        scale, oh, ow = dtype(p.pos_scale), dtype(p.offset_h), dtype(p.offset_w)
        y = xp.arange(h, dtype=dtype)[:, None] * scale + oh
        x = xp.arange(w, dtype=dtype)[None, :] * scale + ow
        return xp.broadcast_to(y, (h, w)), xp.broadcast_to(x, (h, w))

    def forward(self, bottom, top):
        xp = self.xp
        p = self.param.pixel_feature_param
        out = top[0]
        n, _, h, w = out.shape
        dtype = out.dtype
        kind = self.kind
        if kind in _ONCE:
            if self._done_shape == out.shape:
                return
            self._done_shape = out.shape
        if kind in (_F.POSITION_AND_RGB, _F.RGB_AND_POSITION, _F.RGB):
            colour = dtype(p.color_scale) * bottom[0].data.astype(dtype, copy=False)
        res = xp.empty(out.shape, dtype=dtype)
        if kind in (_F.POSITION, _F.POSITION_AND_RGB, _F.RGB_AND_POSITION):
            y, x = self._positions(n, h, w, dtype)
            first = 0 if kind != _F.RGB_AND_POSITION else self.rgb_channels
            res[:, first] = y
            res[:, first + 1] = x
            if kind == _F.POSITION_AND_RGB:
                res[:, 2:] = colour
            elif kind == _F.RGB_AND_POSITION:
                res[:, :first] = colour
        elif kind == _F.RGB:
            res[...] = colour
        elif kind in (_F.RANDOM_POSITION, _F.NUM_RANDOM_POSITION):
            hb, wb = bottom[0].height, bottom[0].width
            u = rng().uniform(0.0, 1.0, size=(n, h, w, 2))
            scale = dtype(p.pos_scale)
            res[:, 0] = xp.asarray((u[..., 0] * hb).astype(dtype)) * scale
            res[:, 1] = xp.asarray((u[..., 1] * wb).astype(dtype)) * scale
        else:   # WARPED_POSITION, RANDOM_ROTATE
            if kind == _F.WARPED_POSITION:
                angle = dtype(-float(np.float32(p.rotation_angle)) / 180.0 * math.pi)
                scale = dtype(p.pos_scale)
            else:
                angle = dtype(float(dtype(rng().uniform(-10.0, 10.0))) / 180.0 * math.pi)
                scale = dtype(1)
            cos_a, sin_a = dtype(np.cos(angle)), dtype(np.sin(angle))
            mid_y, mid_x = dtype(h // 2), dtype(w // 2)
            sy = xp.arange(h, dtype=dtype)[:, None] * scale - mid_y
            sx = xp.arange(w, dtype=dtype)[None, :] * scale - mid_x
            if kind == _F.WARPED_POSITION:
                res[:, 0] = sin_a * sx + cos_a * sy + mid_y
                res[:, 1] = cos_a * sx - sin_a * sy + mid_x
                res[:, 2] = angle / dtype(p.rotation_sigma)
            else:
                res[:, 0] = sin_a * sx + cos_a * (sy - mid_y) + mid_y
                res[:, 1] = cos_a * sx - sin_a * sy + mid_x
        out.data[...] = res

    def backward(self, top, propagate_down, bottom):
        """No gradient: the bottom diff is left untouched (as Caffe)."""
