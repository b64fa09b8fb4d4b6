"""Convolution / Deconvolution: oracle cases, a direct-sum reference, finite differences."""
import itertools

import numpy as np
import pytest

import oracle_util
from gradcheck import check_layer_gradients
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.core import conv as C


@pytest.mark.parametrize('name', oracle_util.case_names('conv_') + oracle_util.case_names('deconv_'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name, rtol=1e-5, atol=1e-6)
    assert errors


def naive_conv(x, w, b, stride, pad, dil, group):
    """Direct sum of Caffe's definition (loops over output pixels; tiny shapes only)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    y = np.zeros((n, o, ho, wo))
    og = o // group
    for oo, i, j in itertools.product(range(o), range(ho), range(wo)):
        g = oo // og
        acc = np.zeros(n) if b is None else np.full(n, b[oo])
        for cc, u, v in itertools.product(range(cg), range(kh), range(kw)):
            r = i * stride[0] - pad[0] + u * dil[0]
            s = j * stride[1] - pad[1] + v * dil[1]
            if 0 <= r < h and 0 <= s < wd:
                acc = acc + w[oo, cc, u, v] * x[:, g * cg + cc, r, s]
        y[:, oo, i, j] = acc
    return y


GEOMETRIES = [
    # (N, C, H, W), O, (kh, kw), stride, pad, dilation, group
    ((2, 3, 7, 8), 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 9, 7), 6, (3, 2), (2, 3), (2, 0), (1, 2), 2),
    ((2, 6, 6, 6), 3, (1, 1), (1, 1), (0, 0), (1, 1), 3),
    ((1, 2, 5, 9), 2, (5, 3), (3, 2), (1, 2), (1, 1), 1),
    ((1, 2, 4, 4), 4, (4, 4), (1, 1), (0, 0), (1, 1), 2),
]


@pytest.mark.parametrize('geo', GEOMETRIES)
def test_conv2d_matches_direct_sum_and_adjoints(geo):
    xshape, o, k, s, p, d, g = geo
    rng = np.random.default_rng(1)
    x = rng.standard_normal(xshape)
    w = rng.standard_normal((o, xshape[1] // g) + k)
    b = rng.standard_normal(o)
    y = C.conv2d(x, w, b, s, p, d, g)
    np.testing.assert_allclose(y, naive_conv(x, w, b, s, p, d, g), rtol=1e-12, atol=1e-12)
    # adjoint identities <conv(x), dy> = <x, conv^T(dy)> = <W, dW(dy, x)>
    dy = rng.standard_normal(y.shape)
    y0 = C.conv2d(x, w, None, s, p, d, g)
    lhs = np.sum(y0 * dy)
    dx = C.conv2d_backward_data(dy, w, x.shape, s, p, d, g)
    dw = C.conv2d_backward_weight(dy, x, w.shape, s, p, d, g)
    assert dx.shape == x.shape and dw.shape == w.shape
    np.testing.assert_allclose(np.sum(x * dx), lhs, rtol=1e-12)
    np.testing.assert_allclose(np.sum(w * dw), lhs, rtol=1e-12)
    np.testing.assert_allclose(C.conv2d_backward_bias(dy), dy.sum(axis=(0, 2, 3)))
    # transposed convolution is the data adjoint: deconv(dy) has x's size when it fits exactly
    z = C.deconv2d(dy, w, None, s, p, d, g, out_size=xshape[2:])
    np.testing.assert_allclose(z, dx, rtol=1e-12, atol=1e-12)


def test_output_size_formulas():
    assert C.conv_output_size(9, 3, 2, 1, 1) == 5
    assert C.conv_output_size(10, 3, 1, 2, 2) == 10
    assert C.conv_output_size(10, 3, 3, 0, 1) == 3        # floor, no ceil
    assert C.deconv_output_size(5, 4, 2, 0, 1) == 12
    assert C.deconv_output_size(4, 3, 2, 1, 1) == 7


CONV_CASES = [
    'convolution_param { num_output: 3 kernel_size: 3 pad: 1 stride: 2 '
    'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
    'convolution_param { num_output: 4 kernel_h: 2 kernel_w: 3 pad_h: 1 stride_w: 2 stride_h: 1 '
    'dilation: 2 group: 2 bias_term: false }',
]


@pytest.mark.parametrize('text', CONV_CASES)
def test_convolution_gradients(text):
    check_layer_gradients('type: "Convolution" ' + text, [(2, 4, 6, 7)])


@pytest.mark.parametrize('text', [
    'convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 }',
    'convolution_param { num_output: 2 kernel_size: 4 stride: 2 group: 2 bias_term: false }',
    'convolution_param { num_output: 2 kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 dilation: 2 }',
])
def test_deconvolution_gradients(text):
    check_layer_gradients('type: "Deconvolution" ' + text, [(2, 2, 3, 4)])


def test_two_bottoms_share_weights():
    from crfgrad_cupy.blob import Blob
    from crfgrad_cupy.layers.base import create_layer
    from crfgrad_cupy.proto import caffe_pb2
    from google.protobuf import text_format
    p = text_format.Merge('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 '
                          'weight_filler { type: "gaussian" } }', caffe_pb2.LayerParameter())
    layer = create_layer(p, caffe_pb2.TEST)
    rng = np.random.default_rng(0)
    bots = [Blob((1, 2, 5, 5)), Blob((1, 2, 5, 5))]
    for b in bots:
        b.data[...] = rng.standard_normal(b.shape)
    tops = [Blob(()), Blob(())]
    layer.setup(bots, tops)
    layer.forward(bots, tops)
    for b, t in zip(bots, tops):
        ref = C.conv2d(b.data.astype(np.float64), layer.blobs[0].data.astype(np.float64),
                       layer.blobs[1].data.astype(np.float64))
        np.testing.assert_allclose(t.data, ref, rtol=1e-5, atol=1e-5)
    for t in tops:
        t.diff[...] = 1
    layer.backward(tops, [True, True], bots)
    # bias diff accumulates over both tops: 2 * (number of output pixels)
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * 9)


@pytest.mark.parametrize('text, field', [
    ('convolution_param { num_output: 2 }', 'kernel_size'),
    ('convolution_param { num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3 }', 'kernel_size'),
    ('convolution_param { num_output: 2 kernel_h: 3 }', 'kernel_h'),
    ('convolution_param { num_output: 3 kernel_size: 1 group: 2 }', 'group'),
    ('convolution_param { num_output: 2 kernel_size: 3 axis: 2 }', 'axis'),
    ('convolution_param { kernel_size: 3 }', 'num_output'),
    ('convolution_param { num_output: 2 kernel_size: 3 stride_h: 2 }', 'stride'),
    ('convolution_param { num_output: 2 kernel_size: 9 }', 'convolution_param'),
])
def test_bad_parameters(text, field):
    from crfgrad_cupy.blob import Blob
    from crfgrad_cupy.layers.base import create_layer
    from crfgrad_cupy.proto import caffe_pb2
    from google.protobuf import text_format
    p = text_format.Merge('name: "badconv" type: "Convolution" ' + text, caffe_pb2.LayerParameter())
    layer = create_layer(p, caffe_pb2.TEST)
    with pytest.raises(CrfGradError) as info:
        layer.setup([Blob((1, 4, 5, 5))], [Blob(())])
    assert 'badconv' in str(info.value) and field in str(info.value)
