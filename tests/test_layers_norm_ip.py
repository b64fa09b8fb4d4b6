"""BatchNorm, Scale, Bias, LRN and InnerProduct: oracle cases, formulas, finite differences."""
import numpy as np
import pytest
from google.protobuf import text_format

import oracle_util
from gradcheck import TEST, TRAIN, check_layer_gradients
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.blob import Blob
from crfgrad_cupy.layers.base import create_layer, register
from crfgrad_cupy.layers.inner_product import InnerProductLayer
from crfgrad_cupy.proto import caffe_pb2


@pytest.mark.parametrize('name', oracle_util.case_names('innerproduct_') + oracle_util.case_names('batchnorm_')
                         + oracle_util.case_names('scale_'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name, rtol=1e-5, atol=1e-6)
    assert errors


def make(text, bottoms, phase=TEST, ntop=1, name='L'):
    p = text_format.Merge('name: "%s" ' % name + text, caffe_pb2.LayerParameter())
    layer = create_layer(p, phase)
    bl = []
    for a in bottoms:
        b = Blob(np.shape(a))
        b.data[...] = a
        bl.append(b)
    tops = [Blob(()) for _ in range(ntop)]
    layer.setup(bl, tops)
    return layer, bl, tops


# ---------------------------------------------------------------- gradcheck self-test

@register('GradcheckBrokenInnerProduct')
class _BrokenInnerProduct(InnerProductLayer):
    """InnerProduct whose bias gradient is off by a factor 2 (the checker must notice)."""

    def backward(self, top, propagate_down, bottom):
        super().backward(top, propagate_down, bottom)
        self.blobs[1].diff *= 2


def test_gradcheck_detects_wrong_gradient():
    text = 'type: "GradcheckBrokenInnerProduct" inner_product_param { num_output: 2 }'
    with pytest.raises(AssertionError, match='param'):
        check_layer_gradients(text, [(2, 3)])
    # ... and passes when that blob is not checked
    check_layer_gradients(text, [(2, 3)], check_params=False)


# ---------------------------------------------------------------- InnerProduct

@pytest.mark.parametrize('text, shape', [
    ('inner_product_param { num_output: 3 }', (2, 3, 2, 2)),
    ('inner_product_param { num_output: 2 bias_term: false axis: 2 }', (2, 3, 2, 2)),
    ('inner_product_param { num_output: 3 transpose: true axis: -1 }', (2, 2, 4)),
])
def test_inner_product_gradients(text, shape):
    check_layer_gradients('type: "InnerProduct" ' + text, [shape])


def test_inner_product_transpose_layout_and_shape():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    layer, b, t = make('type: "InnerProduct" inner_product_param { num_output: 5 transpose: true axis: 2 }', [x])
    assert layer.blobs[0].shape == (4, 5)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    layer.blobs[0].data[...] = w
    layer.blobs[1].data[...] = 0.5
    layer.forward(b, t)
    assert t[0].shape == (2, 3, 5)
    np.testing.assert_allclose(t[0].data, x @ w + 0.5, rtol=1e-5, atol=1e-6)
    with pytest.raises(CrfGradError, match='num_output'):
        make('type: "InnerProduct"', [x], name='ip_bad')


# ---------------------------------------------------------------- BatchNorm

def test_batchnorm_train_statistics_and_moving_average():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4, 5)).astype(np.float32) * 2 + 1
    layer, b, t = make('type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 }', [x], phase=TRAIN)
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]
    assert not layer.use_global_stats
    layer.forward(b, t)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3))
    ref = (x64 - mu[None, :, None, None]) / np.sqrt(var + 1e-5)[None, :, None, None]
    np.testing.assert_allclose(t[0].data, ref, rtol=1e-4, atol=1e-5)
    m = x.size // 2
    np.testing.assert_allclose(layer.blobs[2].data, [1.0])
    np.testing.assert_allclose(layer.blobs[0].data, mu, rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].data, var * m / (m - 1), rtol=1e-5)
    layer.forward(b, t)
    np.testing.assert_allclose(layer.blobs[2].data, [1.9], rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[0].data, 1.9 * mu, rtol=1e-5)
    # TEST phase layer with those blobs: uses blob/scale factor
    layer2, b2, t2 = make('type: "BatchNorm"', [x], phase=TEST)
    for src, dst in zip(layer.blobs, layer2.blobs):
        dst.data[...] = src.data
    layer2.forward(b2, t2)
    ref2 = (x64 - mu[None, :, None, None]) / np.sqrt(var * m / (m - 1) + 1e-5)[None, :, None, None]
    np.testing.assert_allclose(t2[0].data, ref2, rtol=1e-4, atol=1e-5)


def test_batchnorm_zero_scale_factor_and_lr_mult_refused():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    layer, b, t = make('type: "BatchNorm"', [x], phase=TEST)
    layer.forward(b, t)   # fresh blobs: f = 0 -> statistics 0 -> y = x / sqrt(eps)
    np.testing.assert_allclose(t[0].data, x / np.sqrt(1e-5), rtol=1e-5)
    with pytest.raises(CrfGradError, match='lr_mult'):
        make('type: "BatchNorm" param { lr_mult: 1 }', [x], name='bn_bad')


@pytest.mark.parametrize('phase, shape', [(TRAIN, (3, 2, 2, 3)), (TEST, (2, 3, 4)), (TRAIN, (5, 2))])
def test_batchnorm_gradients(phase, shape):
    params = [lambda r, s: r.standard_normal(s), lambda r, s: r.uniform(0.5, 2, s), lambda r, s: [0.7]]
    check_layer_gradients('type: "BatchNorm"', [shape], phase=phase, param_init=params, check_params=False)


# ---------------------------------------------------------------- Scale / Bias

@pytest.mark.parametrize('text, shapes', [
    ('scale_param { bias_term: true }', [(2, 3, 2, 2)]),
    ('scale_param { axis: 2 num_axes: 2 }', [(2, 3, 2, 2)]),
    ('scale_param { num_axes: 0 bias_term: true }', [(2, 3, 2)]),
    ('scale_param { num_axes: -1 }', [(2, 3, 2)]),
    ('scale_param { axis: 0 num_axes: 4 }', [(1, 3, 2, 2)]),
    ('scale_param { bias_term: true }', [(2, 3, 2, 2), (3, 2)]),
    ('scale_param { axis: 0 }', [(2, 3, 2), (2,)]),
    ('scale_param { }', [(2, 3, 2), ()]),
])
def test_scale_gradients(text, shapes):
    check_layer_gradients('type: "Scale" ' + text, shapes)


@pytest.mark.parametrize('text, shapes', [
    ('bias_param { }', [(2, 3, 2, 2)]),
    ('bias_param { axis: 2 num_axes: -1 }', [(2, 3, 2, 2)]),
    ('bias_param { num_axes: 0 }', [(2, 3)]),
    ('bias_param { }', [(2, 3, 2, 2), (3, 2)]),
])
def test_bias_gradients(text, shapes):
    check_layer_gradients('type: "Bias" ' + text, shapes)


def test_scale_two_bottoms_blob_order_and_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    s = rng.standard_normal((3,)).astype(np.float32)
    layer, b, t = make('type: "Scale" scale_param { bias_term: true bias_filler { type: "constant" value: 0.25 } }',
                       [x, s])
    assert len(layer.blobs) == 1 and layer.blobs[0].shape == (3,)   # the bias is blobs[0]
    layer.forward(b, t)
    np.testing.assert_allclose(t[0].data, x * s[None, :, None] + 0.25, rtol=1e-6)
    # one bottom: default scale 1, bias 0, blobs [scale, bias]
    layer, b, t = make('type: "Scale" scale_param { bias_term: true }', [x])
    assert [bb.shape for bb in layer.blobs] == [(3,), (3,)]
    layer.forward(b, t)
    np.testing.assert_allclose(t[0].data, x)


def test_scale_in_place_and_accumulation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    p = text_format.Merge('name: "s" type: "Scale" scale_param { bias_term: true }', caffe_pb2.LayerParameter())
    layer = create_layer(p, TEST)
    blob = Blob(x.shape)
    blob.data[...] = x
    layer.setup([blob], [blob])
    layer.blobs[0].data[...] = [1.0, 2.0, 3.0]
    layer.forward([blob], [blob])
    np.testing.assert_allclose(blob.data, x * np.array([1, 2, 3])[None, :, None], rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for _ in range(2):
        blob.diff[...] = dy
        layer.backward([blob], [True], [blob])
    # scale diff uses the saved input (not the overwritten top) and accumulates over two calls
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * (dy * x).sum(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * dy.sum(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(blob.diff, dy * np.array([1, 2, 3])[None, :, None], rtol=1e-6)


def test_scale_shape_mismatch_is_an_error():
    with pytest.raises(CrfGradError, match='scale_bad'):
        make('type: "Scale"', [np.zeros((2, 3, 4)), np.zeros((4,))], name='scale_bad')


# ---------------------------------------------------------------- LRN

def _lrn_reference(x, n, alpha, beta, k, within):
    x = x.astype(np.float64)
    N, C, H, W = x.shape
    half = (n - 1) // 2
    if not within:
        sq = np.pad(x ** 2, ((0, 0), (half, half), (0, 0), (0, 0)))
        s = sum(sq[:, j:j + C] for j in range(n))
        return x * (k + alpha / n * s) ** (-beta)
    sq = np.pad(x ** 2, ((0, 0), (0, 0), (half, half), (half, half)))
    s = sum(sq[:, :, u:u + H, v:v + W] for u in range(n) for v in range(n))
    return x * (1 + alpha * s / (n * n)) ** (-beta)


@pytest.mark.parametrize('within', [False, True])
def test_lrn_forward_and_gradients(within):
    region = 'WITHIN_CHANNEL' if within else 'ACROSS_CHANNELS'
    text = 'type: "LRN" lrn_param { local_size: 3 alpha: 0.7 beta: 0.6 k: 1.5 norm_region: %s }' % region
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    layer, b, t = make(text, [x])
    layer.forward(b, t)
    np.testing.assert_allclose(t[0].data, _lrn_reference(x, 3, 0.7, 0.6, 1.5, within), rtol=1e-5, atol=1e-6)
    check_layer_gradients(text, [(2, 5, 4, 3)])
    check_layer_gradients(text.replace('local_size: 3', 'local_size: 5'), [(1, 3, 3, 4)])


def test_lrn_even_size_refused():
    with pytest.raises(CrfGradError, match='local_size'):
        make('type: "LRN" lrn_param { local_size: 4 }', [np.zeros((1, 2, 3, 3))], name='lrn_bad')
