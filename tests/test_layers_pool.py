"""Pooling: oracle cases, a per-window reference of Caffe's loops, finite differences, errors."""
import itertools
import math

import numpy as np
import pytest
from google.protobuf import text_format

import oracle_util
from gradcheck import TEST, TRAIN, check_layer_gradients
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.blob import Blob
from crfgrad_cupy.layers.base import create_layer
from crfgrad_cupy.proto import caffe_pb2


@pytest.mark.parametrize('name', oracle_util.case_names('pool_'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name, rtol=1e-5, atol=1e-6)
    assert errors


def reference_pool(x, dy, method, k, s, p):
    """Caffe's CPU loops written out per window (tiny shapes only). Returns y, mask, dx."""
    n, c, h, w = x.shape
    out = []
    for a, size in enumerate((h, w)):
        o = int(math.ceil((size + 2 * p[a] - k[a]) / s[a])) + 1
        if (p[0] or p[1]) and (o - 1) * s[a] >= size + p[a]:
            o -= 1
        out.append(o)
    y = np.zeros((n, c, out[0], out[1]))
    mask = np.full(y.shape, -1.0)
    dx = np.zeros(x.shape)
    for nn, cc, i, j in itertools.product(range(n), range(c), range(out[0]), range(out[1])):
        hs, ws = i * s[0] - p[0], j * s[1] - p[1]
        he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
        size = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
        if method == 'MAX':
            best, arg = -np.finfo(np.float32).max, None
            for r in range(hs, he):
                for q in range(ws, we):
                    if x[nn, cc, r, q] > best:
                        best, arg = x[nn, cc, r, q], (r, q)
            y[nn, cc, i, j] = best
            if arg is not None:
                mask[nn, cc, i, j] = arg[0] * w + arg[1]
                dx[nn, cc, arg[0], arg[1]] += dy[nn, cc, i, j]
        else:
            y[nn, cc, i, j] = x[nn, cc, hs:he, ws:we].sum() / size
            dx[nn, cc, hs:he, ws:we] += dy[nn, cc, i, j] / size
    return y, mask, dx


def run_layer(text, x, dy=None, phase=TEST, ntop=1):
    p = text_format.Merge('name: "pool" type: "Pooling" ' + text, caffe_pb2.LayerParameter())
    layer = create_layer(p, phase)
    bottom = [Blob(x.shape)]
    bottom[0].data[...] = x
    top = [Blob(()) for _ in range(ntop)]
    layer.setup(bottom, top)
    layer.forward(bottom, top)
    outs = [t.data.copy() for t in top]
    if dy is not None:
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        outs.append(bottom[0].diff.copy())
    return outs


GEOMS = [((3, 3), (2, 2), (1, 1)), ((3, 3), (2, 2), (0, 0)), ((3, 2), (2, 3), (2, 1)),
         ((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((4, 3), (3, 1), (0, 2)),
         ((3, 3), (2, 2), (2, 2))]


@pytest.mark.parametrize('geo', GEOMS)
@pytest.mark.parametrize('method', ['MAX', 'AVE'])
def test_matches_reference_loops(geo, method):
    k, s, p = geo
    rng = np.random.default_rng(3)
    # small integers: many ties, so the first-maximum rule is exercised
    x = rng.integers(-3, 4, size=(2, 2, 7, 10)).astype(np.float32)
    text = 'pooling_param { pool: %s kernel_h: %d kernel_w: %d stride_h: %d stride_w: %d pad_h: %d pad_w: %d }' % (
        (method,) + k + s + p)
    ntop = 2 if method == 'MAX' else 1
    outs = run_layer(text, x, ntop=ntop)
    dy = rng.standard_normal(outs[0].shape).astype(np.float32)
    y_ref, mask_ref, dx_ref = reference_pool(x.astype(np.float64), dy.astype(np.float64), method, k, s, p)
    outs = run_layer(text, x, dy, ntop=ntop)
    np.testing.assert_allclose(outs[0], y_ref, rtol=1e-6, atol=1e-6)
    if method == 'MAX':
        np.testing.assert_array_equal(outs[1], mask_ref)
    np.testing.assert_allclose(outs[-1], dx_ref, rtol=1e-5, atol=1e-6)


def test_global_pooling_max_and_ave():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    y = run_layer('pooling_param { pool: MAX global_pooling: true }', x)[0]
    np.testing.assert_allclose(y[:, :, 0, 0], x.max(axis=(2, 3)))
    y = run_layer('pooling_param { pool: AVE global_pooling: true }', x)[0]
    np.testing.assert_allclose(y[:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-6)


def _distinct(rng, shape):
    """Well separated distinct values (max pooling is smooth there)."""
    return rng.permutation(np.prod(shape)).reshape(shape) * 0.1 + rng.uniform(0, 0.01, shape)


@pytest.mark.parametrize('text', [
    'pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }',
    'pooling_param { pool: MAX kernel_size: 3 stride: 2 }',
    'pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }',
    'pooling_param { pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 }',
    'pooling_param { pool: AVE global_pooling: true }',
])
def test_gradients(text):
    check_layer_gradients('type: "Pooling" ' + text, [(2, 2, 5, 6)], bottom_init=_distinct)


def test_stochastic_test_phase():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 1.0, (1, 2, 5, 6)).astype(np.float32)
    y = run_layer('pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }', x)[0]
    assert y.shape == (1, 2, 3, 3)
    win = x[:, :, 0:2, 2:4].astype(np.float64)
    np.testing.assert_allclose(y[:, :, 0, 1], (win ** 2).sum(axis=(2, 3)) / win.sum(axis=(2, 3)), rtol=1e-6)
    last = x[:, :, 4:5, 4:6].astype(np.float64)  # ceil overhang: partial window
    np.testing.assert_allclose(y[:, :, 2, 2], (last ** 2).sum(axis=(2, 3)) / last.sum(axis=(2, 3)), rtol=1e-6)
    check_layer_gradients('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }',
                          [(1, 2, 5, 6)], bottom_init=lambda r, sh: r.uniform(0.5, 1.5, sh))


@pytest.mark.parametrize('text, field, phase, ntop', [
    ('pooling_param { pool: STOCHASTIC kernel_size: 2 }', 'pool', TRAIN, 1),
    ('pooling_param { pool: AVE kernel_size: 2 }', 'top', TEST, 2),
    ('pooling_param { pool: MAX kernel_size: 2 pad: 2 }', 'pad', TEST, 1),
    ('pooling_param { pool: MAX global_pooling: true kernel_size: 2 }', 'kernel_size', TEST, 1),
    ('pooling_param { pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2 }', 'kernel_size', TEST, 1),
    ('pooling_param { pool: MAX kernel_h: 2 }', 'kernel_size', TEST, 1),
    ('pooling_param { pool: MAX kernel_size: 2 pad_h: 1 }', 'pad', TEST, 1),
    ('pooling_param { pool: MAX global_pooling: true stride: 2 }', 'global_pooling', TEST, 1),
])
def test_bad_parameters(text, field, phase, ntop):
    p = text_format.Merge('name: "badpool" type: "Pooling" ' + text, caffe_pb2.LayerParameter())
    layer = create_layer(p, phase)
    with pytest.raises(CrfGradError) as info:
        layer.setup([Blob((1, 2, 5, 5))], [Blob(()) for _ in range(ntop)])
    assert 'badpool' in str(info.value) and field in str(info.value)


def test_window_outside_the_image_without_padding():
    # H = W = 5, k = 1, s = 3: ceil(4/3) + 1 = 3 outputs, the last window starts at 6 >= 5
    # (no clipping without padding): Caffe leaves -FLT_MAX and mask -1, and no gradient flows.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    y, mask, dx = run_layer('pooling_param { pool: MAX kernel_size: 1 stride: 3 }', x, dy, ntop=2)
    y_ref, mask_ref, dx_ref = reference_pool(x.astype(np.float64), dy.astype(np.float64), 'MAX',
                                             (1, 1), (3, 3), (0, 0))
    assert y[0, 0, 2, 2] == -np.finfo(np.float32).max and mask[0, 0, 2, 2] == -1
    np.testing.assert_allclose(y, y_ref)
    np.testing.assert_array_equal(mask, mask_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6)
