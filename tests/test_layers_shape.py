"""Shape layers: Crop, Concat, Slice, Flatten, Reshape, Silence.

Checked against the oracle (crop_*, concat_*), float64 finite differences and NumPy
slicing / reshaping, plus Caffe's parameter rules and errors."""
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


def forward(text, arrays, n_top=1):
    layer, b, t = make(text, arrays, n_top)
    layer.forward(b, t)
    return [x.data.copy() for x in t], layer, b, t


def arange(*shape):
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


# --------------------------------------------------------------------------- oracle

@pytest.mark.parametrize('name', oracle_util.case_names('crop') + oracle_util.case_names('concat'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name)
    assert errors, 'nothing compared'


# --------------------------------------------------------------------------- Crop

@pytest.mark.parametrize('param,ref_shape,index', [
    ('', (2, 3, 2, 3), np.s_[:, :, 0:2, 0:3]),
    ('crop_param { axis: 2 offset: 1 }', (2, 3, 2, 3), np.s_[:, :, 1:3, 1:4]),
    ('crop_param { axis: 2 offset: 2 offset: 0 }', (2, 3, 2, 3), np.s_[:, :, 2:4, 0:3]),
    ('crop_param { axis: 1 offset: 1 }', (2, 2, 2, 3), np.s_[:, 1:3, 1:3, 1:4]),
    ('crop_param { axis: -1 offset: 2 }', (2, 3, 4, 3), np.s_[:, :, :, 2:5]),
    ('crop_param { axis: 0 offset: 1 offset: 0 offset: 1 offset: 2 }', (1, 3, 2, 2), np.s_[1:2, 0:3, 1:3, 2:4]),
])
def test_crop_forward_backward(param, ref_shape, index):
    x = arange(2, 3, 4, 5)
    ref = np.zeros(ref_shape, np.float32)
    (y,), layer, b, t = forward('type: "Crop" ' + param, [x, ref])
    np.testing.assert_array_equal(y, x[index])
    dy = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
    t[0].diff[...] = dy
    b[1].diff[...] = 7
    layer.backward(t, [True, False], b)
    expect = np.zeros_like(x)
    expect[index] = dy
    np.testing.assert_array_equal(b[0].diff, expect)
    np.testing.assert_array_equal(b[1].diff, 7)          # reference never touched
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


def test_crop_gradient():
    check_layer_gradients('type: "Crop" crop_param { axis: 2 offset: 1 offset: 2 }',
                          [(2, 2, 4, 5), (2, 2, 2, 3)], propagate_down=[True, False])


def test_crop_errors():
    x = arange(2, 3, 4, 5)
    with pytest.raises(CrfGradError, match='offset'):
        make('type: "Crop" crop_param { offset: 3 }', [x, np.zeros((2, 3, 2, 2), np.float32)])
    with pytest.raises(CrfGradError, match='offset'):
        make('type: "Crop" crop_param { axis: 1 offset: 0 offset: 1 }', [x, np.zeros((2, 3, 2, 2), np.float32)])
    with pytest.raises(CrfGradError, match='axes'):
        make('type: "Crop"', [x, np.zeros((2, 3, 2), np.float32)])


# --------------------------------------------------------------------------- Concat

@pytest.mark.parametrize('param,axis', [('', 1), ('concat_param { axis: 0 }', 0),
                                        ('concat_param { axis: -1 }', 3),
                                        ('concat_param { concat_dim: 2 }', 2)])
def test_concat_forward_backward(param, axis):
    rng = np.random.default_rng(1)
    shapes = []
    for n in (1, 3, 2):
        s = [2, 2, 3, 2]
        s[axis] = n
        shapes.append(tuple(s))
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    (y,), layer, b, t = forward('type: "Concat" ' + param, xs)
    np.testing.assert_array_equal(y, np.concatenate(xs, axis=axis))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    t[0].diff[...] = dy
    b[1].diff[...] = 5
    layer.backward(t, [True, False, True], b)
    parts = np.split(dy, [1, 4], axis=axis)
    np.testing.assert_array_equal(b[0].diff, parts[0])
    np.testing.assert_array_equal(b[1].diff, 5)
    np.testing.assert_array_equal(b[2].diff, parts[2])


def test_concat_gradient_and_single_bottom():
    check_layer_gradients('type: "Concat" concat_param { axis: 2 }', [(1, 2, 2, 3), (1, 2, 1, 3)])
    x = arange(2, 3)
    (y,), layer, b, t = forward('type: "Concat"', [x])
    np.testing.assert_array_equal(y, x)


def test_concat_errors():
    a, c = arange(2, 3, 4), arange(2, 2, 5)
    with pytest.raises(CrfGradError, match='shape'):
        make('type: "Concat"', [a, c])
    with pytest.raises(CrfGradError, match='not both'):
        make('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [a, a])
    with pytest.raises(CrfGradError, match='axis'):
        make('type: "Concat" concat_param { axis: 3 }', [a, a])


# --------------------------------------------------------------------------- Slice

@pytest.mark.parametrize('param,n_top,axis,points', [
    ('slice_param { slice_point: 1 slice_point: 4 }', 3, 1, [1, 4]),
    ('', 3, 1, [2, 4]),                                        # equal split of 6 channels
    ('slice_param { axis: -1 slice_point: 2 }', 2, 3, [2]),
    ('slice_param { slice_dim: 0 }', 2, 0, [2]),
])
def test_slice_forward_backward(param, n_top, axis, points):
    x = arange(4, 6, 2, 4)
    ys, layer, b, t = forward('type: "Slice" ' + param, [x], n_top)
    parts = np.split(x, points, axis=axis)
    assert len(ys) == len(parts)
    for y, p in zip(ys, parts):
        np.testing.assert_array_equal(y, p)
    rng = np.random.default_rng(2)
    dys = [rng.standard_normal(p.shape).astype(np.float32) for p in parts]
    for tt, d in zip(t, dys):
        tt.diff[...] = d
    layer.backward(t, [True], b)
    np.testing.assert_array_equal(b[0].diff, np.concatenate(dys, axis=axis))


def test_slice_gradient():
    check_layer_gradients('type: "Slice" slice_param { axis: 2 slice_point: 1 slice_point: 3 }',
                          [(1, 2, 4, 3)], num_top=3)


def test_slice_errors():
    x = arange(2, 5, 3)
    with pytest.raises(CrfGradError, match='equally'):
        make('type: "Slice"', [x], n_top=2)
    with pytest.raises(CrfGradError, match='slice point'):
        make('type: "Slice" slice_param { slice_point: 2 }', [x], n_top=3)
    with pytest.raises(CrfGradError, match='increasing'):
        make('type: "Slice" slice_param { slice_point: 3 slice_point: 2 }', [x], n_top=3)
    with pytest.raises(CrfGradError, match='beyond'):
        make('type: "Slice" slice_param { slice_point: 6 }', [x], n_top=2)


# --------------------------------------------------------------------------- Flatten

@pytest.mark.parametrize('param,shape', [
    ('', (2, 60)),
    ('flatten_param { axis: 2 }', (2, 3, 20)),
    ('flatten_param { axis: 1 end_axis: 2 }', (2, 12, 5)),
    ('flatten_param { axis: 0 end_axis: -2 }', (24, 5)),
    ('flatten_param { axis: -1 }', (2, 3, 4, 5)),
])
def test_flatten(param, shape):
    x = arange(2, 3, 4, 5)
    (y,), layer, b, t = forward('type: "Flatten" ' + param, [x])
    np.testing.assert_array_equal(y, x.reshape(shape))
    dy = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    t[0].diff[...] = dy
    layer.backward(t, [True], b)
    np.testing.assert_array_equal(b[0].diff, dy.reshape(x.shape))


def test_flatten_gradient_and_errors():
    check_layer_gradients('type: "Flatten"', [(2, 3, 2)])
    with pytest.raises(CrfGradError, match='end_axis'):
        make('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', [arange(2, 3, 4)])
    lp = caffe_pb2.LayerParameter(name='f', type='Flatten')
    layer = create_layer(lp, TEST)
    b = Blob((2, 3))
    with pytest.raises(CrfGradError, match='in-place'):
        layer.setup([b], [b])


# --------------------------------------------------------------------------- Reshape

@pytest.mark.parametrize('param,shape', [
    ('shape { dim: 6 dim: 20 }', (6, 20)),
    ('shape { dim: 0 dim: -1 }', (2, 60)),
    ('shape { dim: 0 dim: 0 dim: -1 dim: 1 }', (2, 3, 20, 1)),
    ('shape { dim: -1 dim: 10 }', (12, 10)),
    ('axis: 1 num_axes: 2 shape { dim: -1 }', (2, 12, 5)),
    ('axis: 2 shape { dim: 0 dim: 1 dim: 5 }', (2, 3, 4, 1, 5)),
    ('axis: -1 shape { dim: 1 }', (2, 3, 4, 5, 1)),            # append an axis at the end
    ('axis: 0 num_axes: 0 shape { dim: 1 }', (1, 2, 3, 4, 5)),  # insert a leading axis
    ('axis: 1 num_axes: 1 shape { dim: 3 dim: 1 }', (2, 3, 1, 4, 5)),
])
def test_reshape(param, shape):
    x = arange(2, 3, 4, 5)
    (y,), layer, b, t = forward('type: "Reshape" reshape_param { %s }' % param, [x])
    assert y.shape == shape
    np.testing.assert_array_equal(y.reshape(-1), x.reshape(-1))
    dy = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    t[0].diff[...] = dy
    layer.backward(t, [True], b)
    np.testing.assert_array_equal(b[0].diff, dy.reshape(x.shape))


def test_reshape_follows_new_bottom_shape():
    layer, b, t = make('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [arange(2, 3, 4)])
    b[0].reshape(5, 2, 3)
    layer.reshape(b, t)
    assert t[0].shape == (5, 6)


def test_reshape_errors():
    x = arange(2, 3, 4)
    with pytest.raises(CrfGradError, match='-1'):
        make('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [x])
    with pytest.raises(CrfGradError, match='count'):
        make('type: "Reshape" reshape_param { shape { dim: 5 dim: 5 } }', [x])
    with pytest.raises(CrfGradError, match='divisible'):
        make('type: "Reshape" reshape_param { shape { dim: 5 dim: -1 } }', [x])
    with pytest.raises(CrfGradError, match='no bottom axis'):
        make('type: "Reshape" reshape_param { axis: 2 shape { dim: 0 dim: 0 } }', [x])
    with pytest.raises(CrfGradError, match='num_axes'):
        make('type: "Reshape" reshape_param { axis: 1 num_axes: 3 shape { dim: -1 } }', [x])


# --------------------------------------------------------------------------- Silence

def test_silence():
    layer, b, t = make('type: "Silence"', [arange(2, 3), arange(4)], n_top=0)
    layer.forward(b, t)
    b[0].diff[...] = 3
    b[1].diff[...] = 3
    layer.backward(t, [True, False], b)
    np.testing.assert_array_equal(b[0].diff, 0)
    np.testing.assert_array_equal(b[1].diff, 3)


# --------------------------------------------------------------------------- in a net

NET = """
force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 dim: 3 dim: 2 } } }
layer { name: "s" type: "Slice" bottom: "x" top: "a" top: "b" slice_param { slice_point: 1 } }
layer { name: "f" type: "Flatten" bottom: "b" top: "bf" }
layer { name: "r" type: "Reshape" bottom: "a" top: "ar" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "c" type: "Concat" bottom: "ar" bottom: "bf" top: "y" }
layer { name: "k" type: "Silence" bottom: "x" }
"""


def test_slice_reshape_concat_net_roundtrip():
    import crfgrad_cupy as cc
    net = cc.Net(NET, cc.TEST)
    x = np.random.default_rng(5).standard_normal((2, 4, 3, 2)).astype(np.float32)
    net.blobs['x'].data[...] = x
    net.forward()
    np.testing.assert_array_equal(net.blobs['y'].data, x.reshape(2, -1))
    dy = np.random.default_rng(6).standard_normal((2, 24)).astype(np.float32)
    net.blobs['y'].diff[...] = dy
    net.backward()
    # x feeds Slice and Silence: the Silence branch adds zeros
    np.testing.assert_array_equal(net.blobs['x'].diff, dy.reshape(x.shape))
