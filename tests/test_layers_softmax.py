"""Softmax, SoftmaxWithLoss, ArgMax and Accuracy.

Checked against the oracle (softmax_*, swl_*), float64 finite differences, and direct
NumPy formulas for Caffe's rules (normalisers, ignore_label, FLT_MIN clamp, top-k ties)."""
import numpy as np
import pytest

import oracle_util
from gradcheck import check_layer_gradients
from layer_util import make_layer
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.blob import Blob
from crfgrad_cupy.layers.base import create_layer
from crfgrad_cupy.proto import caffe_pb2

TEST = caffe_pb2.TEST


make = make_layer


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def labels_with_ignore(rng, shape, classes=4, ignore=255, frac=0.25):
    lab = rng.integers(0, classes, shape).astype(np.float64)
    lab[rng.random(shape) < frac] = ignore
    return lab


# --------------------------------------------------------------------------- oracle

@pytest.mark.parametrize('name', oracle_util.case_names('softmax') + oracle_util.case_names('swl'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name)
    assert errors, 'nothing compared'


# --------------------------------------------------------------------------- Softmax

@pytest.mark.parametrize('axis', [1, 0, -1, 2])
def test_softmax(axis):
    check_layer_gradients('type: "Softmax" softmax_param { axis: %d }' % axis, [(2, 3, 2, 2)])
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32) * 30
    layer, b, t = make('type: "Softmax" softmax_param { axis: %d }' % axis, [x])
    layer.forward(b, t)
    np.testing.assert_allclose(t[0].data, np_softmax(x.astype(np.float64), axis), rtol=1e-5, atol=1e-7)


def test_softmax_inplace():
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    out = []
    for inplace in (False, True):
        lp = caffe_pb2.LayerParameter(name='s', type='Softmax')
        layer = create_layer(lp, TEST)
        b = Blob(x.shape)
        b.data = x.copy()
        t = [b] if inplace else [Blob(())]
        layer.setup([b], t)
        layer.forward([b], t)
        y = t[0].data.copy()
        t[0].diff[...] = dy
        layer.backward(t, [True], [b])
        out.append((y, b.diff.copy()))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- SoftmaxWithLoss

@pytest.mark.parametrize('loss_param', [
    'normalization: VALID ignore_label: 255',
    'normalization: FULL ignore_label: 255',
    'normalization: BATCH_SIZE ignore_label: 255',
    'normalization: NONE ignore_label: 255',
    'normalize: true',
])
def test_swl_gradient(loss_param):
    def lab(rng, shape):
        return labels_with_ignore(rng, shape) if 'ignore' in loss_param else rng.integers(0, 4, shape)
    check_layer_gradients('type: "SoftmaxWithLoss" loss_param { %s }' % loss_param,
                          [(2, 4, 2, 3), (2, 1, 2, 3)], bottom_init=[None, lab],
                          propagate_down=[True, False])


def test_swl_gradient_other_axis():
    check_layer_gradients('type: "SoftmaxWithLoss" softmax_param { axis: 2 }', [(2, 3, 4), (2, 3)],
                          bottom_init=[None, lambda rng, s: rng.integers(0, 4, s)],
                          propagate_down=[True, False])


@pytest.mark.parametrize('loss_param,norm', [
    ('ignore_label: 255', 'valid'),
    ('ignore_label: 255 normalization: FULL', 'full'),
    ('ignore_label: 255 normalization: BATCH_SIZE', 'batch'),
    ('ignore_label: 255 normalization: NONE', 'none'),
    ('ignore_label: 255 normalize: false', 'batch'),
    ('ignore_label: 255 normalize: false normalization: FULL', 'full'),   # normalization wins
    ('ignore_label: 255 normalize: true', 'valid'),
])
def test_swl_values(loss_param, norm):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 2, 4)).astype(np.float32)
    lab = labels_with_ignore(rng, (3, 1, 2, 4), classes=5).astype(np.float32)
    layer, b, t = make('type: "SoftmaxWithLoss" loss_param { %s }' % loss_param, [x, lab])
    assert t[0].shape == ()
    layer.forward(b, t)
    p = np_softmax(x.astype(np.float64), 1)
    li = lab[:, 0].astype(int)
    valid = li != 255
    safe = np.where(valid, li, 0)
    p_lab = np.take_along_axis(p, safe[:, None], axis=1)[:, 0]
    n = {'valid': valid.sum(), 'full': 3 * 8, 'batch': 3, 'none': 1}[norm]
    loss = -np.log(p_lab)[valid].sum() / max(1, n)
    np.testing.assert_allclose(float(t[0].data), loss, rtol=1e-5)
    t[0].diff[...] = 0.5                                 # loss weight
    b[1].diff[...] = 9
    layer.backward(t, [True, False], b)
    g = p.copy()
    onehot = np.arange(5)[None, :, None, None] == safe[:, None]
    g = (g - onehot) * valid[:, None] * 0.5 / max(1, n)
    np.testing.assert_allclose(b[0].diff, g, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(b[1].diff, 9)          # labels get no diff


def test_swl_all_ignored_and_flt_min():
    x = np.zeros((1, 3, 1, 2), np.float32)
    lab = np.full((1, 1, 1, 2), 255, np.float32)
    layer, b, t = make('type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }', [x, lab])
    layer.forward(b, t)
    assert float(t[0].data) == 0.0                      # max(1, 0) normaliser: no NaN
    t[0].diff[...] = 1
    layer.backward(t, [True, False], b)
    np.testing.assert_array_equal(b[0].diff, 0)
    # a probability that underflows to 0 is clamped to FLT_MIN
    x = np.array([[[0.0]], [[-200.0]]], np.float32)[None]     # (1, 2, 1, 1)
    lab = np.ones((1, 1, 1, 1), np.float32)
    layer, b, t = make('type: "SoftmaxWithLoss"', [x, lab])
    layer.forward(b, t)
    np.testing.assert_allclose(float(t[0].data), -np.log(np.finfo(np.float32).tiny), rtol=1e-6)


def test_swl_prob_top_and_label_truncation():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 2)).astype(np.float32)
    lab = np.array([[0.9, 2.7], [1.2, 0.0]], np.float32)  # cast to int by truncation
    layer, b, t = make('type: "SoftmaxWithLoss" loss_weight: 1 loss_weight: 0', [x, lab], n_top=2)
    layer.forward(b, t)
    p = np_softmax(x.astype(np.float64), 1)
    np.testing.assert_allclose(t[1].data, p, rtol=1e-6)
    li = np.array([[0, 2], [1, 0]])
    ref = -np.log(np.take_along_axis(p, li[:, None], axis=1)).sum() / 4
    np.testing.assert_allclose(float(t[0].data), ref, rtol=1e-6)
    assert layer.is_loss and layer.loss_weights == [1.0, 0.0]
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


def test_swl_default_loss_weight():
    x = np.zeros((1, 2, 1, 1), np.float32)
    layer, b, t = make('type: "SoftmaxWithLoss"', [x, np.zeros((1, 1, 1, 1), np.float32)])
    assert layer.loss_weights == [1.0]


def test_swl_errors():
    x = np.zeros((2, 3, 2, 2), np.float32)
    with pytest.raises(CrfGradError, match='labels'):
        make('type: "SoftmaxWithLoss"', [x, np.zeros((2, 1, 2, 3), np.float32)])
    layer, b, t = make('type: "SoftmaxWithLoss" loss_param { ignore_label: -1 }',
                       [x, np.full((2, 1, 2, 2), 3, np.float32)])
    with pytest.raises(CrfGradError, match=r"bottom\[1\]"):
        layer.forward(b, t)


# --------------------------------------------------------------------------- ArgMax

def test_argmax_axis_topk_and_ties():
    x = np.array([[[3.0, 1.0], [5.0, 1.0], [5.0, 2.0], [0.0, 2.0]]], np.float32)   # (1, 4, 2)
    layer, b, t = make('type: "ArgMax" argmax_param { axis: 1 top_k: 2 }', [x])
    layer.forward(b, t)
    assert t[0].shape == (1, 2, 2)
    # ties: the larger index comes first (partial_sort with greater<pair<value, index>>)
    np.testing.assert_array_equal(t[0].data[0], [[2, 3], [1, 2]])
    layer, b, t = make('type: "ArgMax" argmax_param { axis: -2 top_k: 2 out_max_val: true }', [x])
    layer.forward(b, t)
    np.testing.assert_array_equal(t[0].data[0], [[5, 2], [5, 2]])


def test_argmax_no_axis():
    rng = np.random.default_rng(5)
    x = rng.permutation(2 * 3 * 2 * 2).astype(np.float32).reshape(2, 3, 2, 2)
    layer, b, t = make('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [x])
    layer.forward(b, t)
    assert t[0].shape == (2, 2, 3, 1)
    flat = x.reshape(2, -1)
    idx = np.argsort(-flat, axis=1)[:, :3]
    np.testing.assert_array_equal(t[0].data[:, 0, :, 0], idx)
    np.testing.assert_array_equal(t[0].data[:, 1, :, 0], np.take_along_axis(flat, idx, axis=1))
    layer, b, t = make('type: "ArgMax"', [x[:, :, 0, 0]])
    layer.forward(b, t)
    assert t[0].shape == (2, 1, 1)
    np.testing.assert_array_equal(t[0].data[:, 0, 0], x[:, :, 0, 0].argmax(axis=1))
    with pytest.raises(CrfGradError, match='top_k'):
        make('type: "ArgMax" argmax_param { axis: 1 top_k: 4 }', [x])


# --------------------------------------------------------------------------- Accuracy

def test_accuracy_topk_ignore_and_per_class():
    # (N=1, C=3, 5 pixels)
    x = np.array([[[0.5, 0.1, 0.25, 0.3, 0.3],
                   [0.2, 0.6, 0.2, 0.3, 0.1],
                   [0.3, 0.3, 0.6, 0.3, 0.6]]], np.float32)
    lab = np.array([[0, 1, 0, 1, 2]], np.float32)
    layer, b, t = make('type: "Accuracy"', [x, lab], n_top=2)
    layer.forward(b, t)
    # pixel 3: three-way tie at 0.3 -> not counted correct (ties count as better)
    np.testing.assert_allclose(float(t[0].data), 3 / 5)
    np.testing.assert_allclose(t[1].data, [1 / 2, 1 / 2, 1.0])
    layer, b, t = make('type: "Accuracy" accuracy_param { top_k: 2 }', [x, lab])
    layer.forward(b, t)
    np.testing.assert_allclose(float(t[0].data), 4 / 5)     # pixel 2 now right, pixel 3 (3 scores >= 0.3) still wrong
    layer, b, t = make('type: "Accuracy" accuracy_param { ignore_label: 1 }', [x, lab], n_top=2)
    layer.forward(b, t)
    np.testing.assert_allclose(float(t[0].data), 2 / 3)
    np.testing.assert_allclose(t[1].data, [1 / 2, 0.0, 1.0])   # class 1 never counted -> 0
    layer, b, t = make('type: "Accuracy" accuracy_param { ignore_label: 0 }',
                       [x[:, :, :1], lab[:, :1]])
    layer.forward(b, t)
    assert float(t[0].data) == 0.0                           # nothing counted


def test_accuracy_random_vs_numpy_axis():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # classes on axis 2
    lab = rng.integers(0, 4, (2, 3, 5)).astype(np.float32)
    layer, b, t = make('type: "Accuracy" accuracy_param { axis: 2 top_k: 2 }', [x, lab])
    layer.forward(b, t)
    top2 = np.argsort(-x, axis=2)[:, :, :2]
    hit = (top2 == lab[:, :, None].astype(int)).any(axis=2)
    np.testing.assert_allclose(float(t[0].data), hit.mean(), rtol=1e-6)
    with pytest.raises(CrfGradError, match='top_k'):
        make('type: "Accuracy" accuracy_param { axis: 2 top_k: 5 }', [x, lab])
