"""PixelFeature layer: oracle cases (pixfeat_*), formulas of every type, the
first-forward-only rule, random types and the (absent) backward."""
import math

import numpy as np
import pytest

import oracle_util
from crfgrad_cupy.layers import fillers
from crfgrad_cupy.proto import caffe_pb2
from layer_util import make_layer

TEST = caffe_pb2.TEST


@pytest.mark.parametrize('name', oracle_util.case_names('pixfeat'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name, rtol=0, atol=0)
    assert errors['output/feat'] == 0


def make(param, x):
    return make_layer('name: "pf" type: "PixelFeature" pixel_feature_param { %s }' % param, [x])


def _image(shape=(2, 3, 4, 5), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 50


def test_position_types_formulas():
    x = _image()
    n, c, h, w = x.shape
    y = np.arange(h, dtype=np.float32)[:, None] * np.float32(0.3) + np.float32(1.5)
    xx = np.arange(w, dtype=np.float32)[None, :] * np.float32(0.3) + np.float32(-2)
    col = np.float32(0.07) * x
    common = 'pos_scale: 0.3 color_scale: 0.07 offset_h: 1.5 offset_w: -2'
    for kind, expect in [
        ('POSITION', [np.broadcast_to(y, (h, w)), np.broadcast_to(xx, (h, w))]),
        ('POSITION_AND_RGB', [np.broadcast_to(y, (h, w)), np.broadcast_to(xx, (h, w))] + [None] * c),
        ('RGB_AND_POSITION', [None] * c + [np.broadcast_to(y, (h, w)), np.broadcast_to(xx, (h, w))]),
        ('RGB', [None] * c)]:
        layer, bottom, top = make('type: %s %s' % (kind, common), x)
        layer.forward(bottom, top)
        assert top[0].shape == (n, len(expect), h, w) and top[0].data.dtype == np.float32
        ci = 0
        for k, e in enumerate(expect):
            if e is None:
                np.testing.assert_array_equal(top[0].data[:, k], col[:, ci])
                ci += 1
            else:
                np.testing.assert_array_equal(top[0].data[:, k], np.broadcast_to(e, (n, h, w)))


def test_position_first_forward_only_but_rgb_every_time():
    x = _image()
    pos, bp, tp = make('type: POSITION pos_scale: 2', x)
    pos.forward(bp, tp)
    tp[0].data[...] = -1                     # e.g. a later in-place layer
    pos.forward(bp, tp)
    assert np.all(tp[0].data == -1)
    bp[0].reshape(1, 3, 6, 7)                # new size: recomputed (Caffe would leave zeros)
    pos.reshape(bp, tp)
    pos.forward(bp, tp)
    assert tp[0].shape == (1, 2, 6, 7) and tp[0].data[0, 0, 5, 0] == 10 and tp[0].data[0, 1, 0, 6] == 12
    rgb, br, tr = make('type: RGB', x)
    rgb.forward(br, tr)
    tr[0].data[...] = -1
    rgb.forward(br, tr)
    np.testing.assert_array_equal(tr[0].data, x)


@pytest.mark.parametrize('kind', ['RANDOM_POSITION', 'NUM_RANDOM_POSITION'])
def test_random_position(kind):
    x = _image((2, 3, 6, 9))
    fillers.set_random_seed(11)
    layer, bottom, top = make('type: %s pos_scale: 0.5 num_random_pos: 4' % kind, x)
    layer.forward(bottom, top)
    a = top[0].data.copy()
    assert a.shape == (2, 2, 6, 9)           # the fork's Reshape: (N, 2, H, W) for both
    assert a[:, 0].min() >= 0 and a[:, 0].max() < 3 and a[:, 1].min() >= 0 and a[:, 1].max() < 4.5
    assert a[:, 0].max() > 2 and a[:, 1].max() > 3.5 and len(np.unique(a)) > 100
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, a)        # drawn once
    fillers.set_random_seed(11)
    again, b2, t2 = make('type: %s pos_scale: 0.5' % kind, x)
    again.forward(b2, t2)
    np.testing.assert_array_equal(t2[0].data, a)         # reproducible from the seed


@pytest.mark.parametrize('angle', [0.0, 30.0, -90.0])
def test_warped_position(angle):
    x = _image((1, 3, 5, 8))
    layer, bottom, top = make('type: WARPED_POSITION rotation_angle: %g pos_scale: 0.5 rotation_sigma: 2'
                              % angle, x)
    layer.forward(bottom, top)
    a = -angle / 180.0 * math.pi
    my, mx = 5 // 2, 8 // 2
    yy, xx = np.meshgrid(np.arange(5), np.arange(8), indexing='ij')
    sy, sx = 0.5 * yy - my, 0.5 * xx - mx
    out = top[0].data[0]
    assert out.shape == (3, 5, 8)
    np.testing.assert_allclose(out[0], math.sin(a) * sx + math.cos(a) * sy + my, atol=1e-5)
    np.testing.assert_allclose(out[1], math.cos(a) * sx - math.sin(a) * sy + mx, atol=1e-5)
    np.testing.assert_allclose(out[2], a / 2, rtol=1e-6)


def test_random_rotate_cpu_formula():
    x = _image((1, 3, 6, 7))
    fillers.set_random_seed(3)
    layer, bottom, top = make('type: RANDOM_ROTATE pos_scale: 5', x)
    layer.forward(bottom, top)
    out = top[0].data[0].astype(np.float64)
    my, mx = 3, 3
    yy, xx = np.meshgrid(np.arange(6), np.arange(7), indexing='ij')
    sy, sx = yy - my, xx - mx                 # the CPU code ignores pos_scale
    # channel 1 = cos·sx − sin·sy + mx: solve for the angle from two pixels
    c = out[1, 0, 1] - out[1, 0, 0]           # d/dx = cos
    s = -(out[1, 1, 0] - out[1, 0, 0])        # d/dy = −sin
    a = math.atan2(s, c)
    assert abs(a) <= math.radians(10) + 1e-6 and abs(a) > 0
    np.testing.assert_allclose(out[0], math.sin(a) * sx + math.cos(a) * (sy - my) + my, atol=1e-4)
    np.testing.assert_allclose(out[1], math.cos(a) * sx - math.sin(a) * sy + mx, atol=1e-4)


def test_backward_leaves_bottom_diff():
    x = _image()
    layer, bottom, top = make('type: POSITION_AND_RGB', x)
    layer.forward(bottom, top)
    bottom[0].diff[...] = 3
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    assert np.all(bottom[0].diff == 3)


def test_float64():
    from crfgrad_cupy import backend
    with backend.dtype_scope(np.float64):
        x = _image().astype(np.float64)
        layer, bottom, top = make('type: POSITION_AND_RGB color_scale: 0.1 pos_scale: 0.1', x)
        layer.forward(bottom, top)
        assert top[0].data.dtype == np.float64
        scale = float(np.float32(0.1))        # proto floats, widened as Caffe's Dtype
        np.testing.assert_allclose(top[0].data[:, 2:], scale * x, rtol=1e-15)
        np.testing.assert_allclose(top[0].data[0, 0, 3, 0], 3 * scale, rtol=1e-15)
