"""Element-wise layers: ReLU, PReLU, Sigmoid, TanH, Power, AbsVal, Dropout, Eltwise.

Checked against the oracle (relu_*, dropout_*, eltwise_*), float64 finite differences
and closed-form / invariant checks (in-place use, Caffe's tie and corner-case rules)."""
import numpy as np
import pytest

import oracle_util
from gradcheck import check_layer_gradients
from layer_util import make_layer
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.blob import Blob
from crfgrad_cupy.layers.base import create_layer
from crfgrad_cupy.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


make = make_layer


def run(text, arrays, top_diff=None, phase=TEST, inplace=False):
    """Forward (and backward with ``top_diff``); returns (top data, [bottom diffs], layer)."""
    layer, bottoms, tops = make(text, arrays, phase=phase, inplace=inplace)
    layer.forward(bottoms, tops)
    y = tops[0].data.copy()
    diffs = None
    if top_diff is not None:
        tops[0].diff[...] = top_diff
        layer.backward(tops, [True] * len(bottoms), bottoms)
        diffs = [b.diff.copy() for b in bottoms]
    return y, diffs, layer


def away_from_zero(rng, shape):
    return rng.uniform(0.2, 1.5, shape) * rng.choice([-1.0, 1.0], shape)


def positive(rng, shape):
    return rng.uniform(0.3, 2.0, shape)


# --------------------------------------------------------------------------- oracle

@pytest.mark.parametrize('name', oracle_util.case_names('relu') + oracle_util.case_names('dropout')
                         + oracle_util.case_names('eltwise'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name)
    assert errors, 'nothing compared'


# --------------------------------------------------------------------------- ReLU

@pytest.mark.parametrize('slope', [0.0, 0.1, -0.3])
def test_relu_gradient(slope):
    check_layer_gradients('type: "ReLU" relu_param { negative_slope: %g }' % slope, [(2, 3, 2, 2)],
                          bottom_init=away_from_zero)


def test_relu_zero_takes_slope_and_inplace():
    x = np.array([[-2.0, 0.0, 3.0, -0.5]], np.float32)
    dy = np.array([[1.0, 1.0, 1.0, 2.0]], np.float32)
    y, (dx,), _ = run('type: "ReLU" relu_param { negative_slope: 0.25 }', [x], dy)
    np.testing.assert_array_equal(y, [[-0.5, 0.0, 3.0, -0.125]])
    np.testing.assert_array_equal(dx, [[0.25, 0.25, 1.0, 0.5]])   # x == 0 -> slope
    y2, (dx2,), _ = run('type: "ReLU" relu_param { negative_slope: 0.25 }', [x], dy, inplace=True)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(dx2, dx)


# --------------------------------------------------------------------------- PReLU

@pytest.mark.parametrize('shared', [False, True])
def test_prelu_gradient(shared):
    check_layer_gradients('type: "PReLU" prelu_param { channel_shared: %s }' % str(shared).lower(),
                          [(2, 3, 2, 2)], bottom_init=away_from_zero)


def test_prelu_default_filler_shapes_and_accumulation():
    rng = np.random.default_rng(1)
    x = away_from_zero(rng, (2, 3, 4)).astype(np.float32)
    layer, b, t = make('type: "PReLU"', [x])
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].data, np.full(3, 0.25, np.float32))
    layer2, _, _ = make('type: "PReLU" prelu_param { channel_shared: true }', [x])
    assert layer2.blobs[0].shape == ()
    layer.blobs[0].data = np.array([0.1, -0.2, 0.3], np.float32)
    layer.forward(b, t)
    a = np.array([0.1, -0.2, 0.3], np.float32)[None, :, None]
    np.testing.assert_allclose(t[0].data, np.where(x > 0, x, a * x), rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    t[0].diff[...] = dy
    layer.backward(t, [True], b)
    expect = (dy * x * (x <= 0)).sum(axis=(0, 2))
    np.testing.assert_allclose(layer.blobs[0].diff, expect, rtol=1e-5)
    layer.backward(t, [True], b)                       # param diffs accumulate
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * expect, rtol=1e-5)
    np.testing.assert_allclose(b[0].diff, dy * np.where(x > 0, 1, a), rtol=1e-6)


def test_prelu_inplace_matches():
    rng = np.random.default_rng(2)
    x = away_from_zero(rng, (2, 3, 2, 2)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y1, (dx1,), l1 = run('type: "PReLU"', [x], dy)
    y2, (dx2,), l2 = run('type: "PReLU"', [x], dy, inplace=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_allclose(l1.blobs[0].diff, l2.blobs[0].diff, rtol=1e-6)


def test_prelu_bad_blob_count():
    lp = caffe_pb2.LayerParameter(name='p', type='PReLU')
    layer = create_layer(lp, TEST)
    layer.blobs = [Blob((4,))]
    with pytest.raises(CrfGradError, match='prelu_param'):
        layer.setup([Blob((2, 3, 2))], [Blob(())])


# --------------------------------------------------------------------------- Sigmoid, TanH, AbsVal

@pytest.mark.parametrize('kind', ['Sigmoid', 'TanH'])
def test_sigmoid_tanh(kind):
    check_layer_gradients('type: "%s"' % kind, [(2, 3, 2, 2)])
    x = np.array([-800.0, -3.0, 0.0, 2.0, 800.0], np.float32)
    y, _, _ = run('type: "%s"' % kind, [x])
    with np.errstate(over='ignore'):
        ref = 1 / (1 + np.exp(-x.astype(np.float64))) if kind == 'Sigmoid' else np.tanh(x.astype(np.float64))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(y))


def test_absval():
    check_layer_gradients('type: "AbsVal"', [(2, 3, 2, 2)], bottom_init=away_from_zero)
    x = np.array([-2.0, 0.0, 3.0], np.float32)
    y, (dx,), _ = run('type: "AbsVal"', [x], np.ones(3, np.float32))
    np.testing.assert_array_equal(y, [2, 0, 3])
    np.testing.assert_array_equal(dx, [-1, 0, 1])
    with pytest.raises(CrfGradError, match='in-place'):
        make('type: "AbsVal"', [x], inplace=True)


# --------------------------------------------------------------------------- Power

@pytest.mark.parametrize('param,init', [
    ('power: 2 scale: 0.5 shift: 1', None),
    ('power: 2', None),
    ('power: 3 scale: -1.5', away_from_zero),       # shift 0: dx = power * y / x
    ('power: 0.5 scale: 2 shift: 3', positive),     # general branch
    ('power: -1.5 scale: 0.7 shift: 0.2', positive),
    ('power: 1 scale: -2 shift: 4', None),
])
def test_power_gradient(param, init):
    check_layer_gradients('type: "Power" power_param { %s }' % param, [(2, 3, 2, 2)], bottom_init=init)


def test_power_values_and_corner_cases():
    x = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
    dy = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    y, (dx,), _ = run('type: "Power" power_param { power: 2 scale: 3 shift: 1 }', [x], dy)
    np.testing.assert_allclose(y, (1 + 3 * x) ** 2, rtol=1e-6)
    np.testing.assert_allclose(dx, dy * 6 * (1 + 3 * x), rtol=1e-6)
    # scale * power == 0: constant output, zero gradient
    y, (dx,), _ = run('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', [x], dy)
    np.testing.assert_array_equal(y, np.ones(4))
    np.testing.assert_array_equal(dx, np.zeros(4))
    y, (dx,), _ = run('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', [x], dy)
    np.testing.assert_array_equal(y, np.full(4, 8.0))
    np.testing.assert_array_equal(dx, np.zeros(4))
    # power 1: dx = scale * dy, whatever x
    y, (dx,), _ = run('type: "Power" power_param { scale: -2 shift: 1 }', [x], dy)
    np.testing.assert_array_equal(y, 1 - 2 * x)
    np.testing.assert_array_equal(dx, -2 * dy)
    # shift 0: Caffe divides y by x, so x == 0 gives a non-finite gradient
    y, (dx,), _ = run('type: "Power" power_param { power: 3 }', [x], dy)
    assert not np.isfinite(dx[1])
    np.testing.assert_allclose(dx[[0, 2, 3]], (dy * 3 * x ** 2)[[0, 2, 3]], rtol=1e-6)


def test_power_inplace_matches():
    rng = np.random.default_rng(3)
    x = positive(rng, (2, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    text = 'type: "Power" power_param { power: 1.5 scale: 2 shift: 0.5 }'
    y1, (dx1,), _ = run(text, [x], dy)
    y2, (dx2,), _ = run(text, [x], dy, inplace=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-6)


# --------------------------------------------------------------------------- Dropout

def test_dropout_test_phase_is_identity():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    dy = np.ones_like(x) * 2
    y, (dx,), _ = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [x], dy, phase=TEST)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)


def test_dropout_train_mask_scale_and_backward():
    from crfgrad_cupy.layers import fillers
    rng = np.random.default_rng(4)
    x = positive(rng, (4, 5, 10, 10)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    fillers.set_random_seed(7)
    y, (dx,), layer = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [x], dy, phase=TRAIN)
    scale = np.float32(1) / (np.float32(1) - np.float32(0.3))
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] * scale, rtol=1e-6)
    assert abs(kept.mean() - 0.7) < 0.03               # 2000 draws: ~0.01 std
    np.testing.assert_allclose(dx, dy * kept * scale, rtol=1e-6)   # backward reuses the mask
    # the same seed gives the same mask; another forward draws a new one
    fillers.set_random_seed(7)
    y2, _, _ = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [x], None, phase=TRAIN)
    np.testing.assert_array_equal(y, y2)
    b = [Blob(x.shape)]
    b[0].data = x
    t = [Blob(())]
    layer.reshape(b, t)
    layer.forward(b, t)
    assert not np.array_equal(t[0].data != 0, kept)


def test_dropout_train_inplace():
    from crfgrad_cupy.layers import fillers
    rng = np.random.default_rng(5)
    x = positive(rng, (3, 8)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    fillers.set_random_seed(11)
    y1, (dx1,), _ = run('type: "Dropout"', [x], dy, phase=TRAIN)
    fillers.set_random_seed(11)
    y2, (dx2,), _ = run('type: "Dropout"', [x], dy, phase=TRAIN, inplace=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_array_equal(dx1, dy * (y1 != 0) * 2)


def test_dropout_bad_ratio():
    with pytest.raises(CrfGradError, match='dropout_ratio'):
        make('type: "Dropout" dropout_param { dropout_ratio: 1.0 }', [np.ones(3, np.float32)])


# --------------------------------------------------------------------------- Eltwise

@pytest.mark.parametrize('param', [
    'operation: SUM',
    'operation: SUM coeff: 0.5 coeff: -2 coeff: 1.5',
    'operation: PROD',
    'operation: PROD stable_prod_grad: false',
    'operation: MAX',
])
def test_eltwise_gradient(param):
    # distinct values keep MAX away from ties; away from 0 keeps the unstable PROD finite
    check_layer_gradients('type: "Eltwise" eltwise_param { %s }' % param, [(2, 2, 2, 3)] * 3,
                          bottom_init=away_from_zero)


def test_eltwise_max_ties():
    a = np.array([1.0, 2.0, 5.0, 0.0], np.float32)
    b = np.array([1.0, 3.0, 5.0, 0.0], np.float32)
    c = np.array([1.0, 3.0, 4.0, 0.5], np.float32)
    dy = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    y, (da, db, dc), _ = run('type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c], dy)
    np.testing.assert_array_equal(y, [1, 3, 5, 0.5])
    # ties between bottom 0 and 1 go to bottom 1; bottom 2 needs to be strictly greater
    np.testing.assert_array_equal(da, [0, 0, 0, 0])
    np.testing.assert_array_equal(db, [1, 2, 3, 0])
    np.testing.assert_array_equal(dc, [0, 0, 0, 4])


def test_eltwise_prod_zero_input():
    a = np.array([0.0, 2.0], np.float32)
    b = np.array([3.0, 4.0], np.float32)
    dy = np.ones(2, np.float32)
    _, (da, db), _ = run('type: "Eltwise" eltwise_param { operation: PROD }', [a, b], dy)
    np.testing.assert_array_equal(da, [3, 4])
    np.testing.assert_array_equal(db, [0, 2])


@pytest.mark.parametrize('op', ['SUM coeff: 2 coeff: -1', 'PROD', 'MAX'])
def test_eltwise_inplace_matches(op):
    rng = np.random.default_rng(6)
    xs = [away_from_zero(rng, (2, 3)).astype(np.float32) for _ in range(2)]
    dy = rng.standard_normal((2, 3)).astype(np.float32)
    text = 'type: "Eltwise" eltwise_param { operation: %s }' % op
    y1, d1, _ = run(text, xs, dy)
    y2, d2, _ = run(text, xs, dy, inplace=True)
    np.testing.assert_array_equal(y1, y2)
    for a, b in zip(d1, d2):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_eltwise_errors():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(CrfGradError, match='coeff'):
        make('type: "Eltwise" eltwise_param { coeff: 1 }', [x, x])
    with pytest.raises(CrfGradError, match='coeff'):
        make('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [x, x])
    with pytest.raises(CrfGradError, match='shape'):
        make('type: "Eltwise"', [x, np.ones((3, 2), np.float32)])
    with pytest.raises(CrfGradError, match='bottom'):
        make('type: "Eltwise"', [x])
