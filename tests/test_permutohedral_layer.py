"""Permutohedral layer: oracle cases (perm_*), float64 finite differences, Caffe's
reset-then-set parameter diffs, offsets, repeated_init, lattice sharing, errors."""
import numpy as np
import pytest
from google.protobuf import text_format

import oracle_util
from gradcheck import check_layer_gradients
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.blob import Blob
from crfgrad_cupy.core import lattice as L
from crfgrad_cupy.layers.base import create_layer
from crfgrad_cupy.proto import caffe_pb2

TEST = caffe_pb2.TEST


@pytest.mark.parametrize('name', oracle_util.case_names('perm'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name)
    assert errors['output/perm'] < 1e-5          # float32-identical lattice: ~1e-7 here
    assert all(v == 0 for k, v in errors.items() if k in ('diff/feat', 'diff/feat_out',
                                                            'bottom_diff/img', 'bottom_diff/img_out'))


def make(param, data, fin, fout=None, blobs=None, tops=1, lattice_bottom=None):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge('name: "perm" type: "Permutohedral" permutohedral_param { %s }' % param, lp)
    layer = create_layer(lp, TEST)
    bd, bf = Blob(data.shape), Blob(fin.shape)
    bd.data, bf.data = data, fin
    if fout is None:
        bo = bf
    else:
        bo = Blob(fout.shape)
        bo.data = fout
    bottom = [bd, bf, bo] + ([lattice_bottom] if lattice_bottom is not None else [])
    top = [Blob(()) for _ in range(tops)]
    if blobs is not None:
        for a in blobs:
            b = Blob(a.shape)
            b.data = a
            layer.blobs.append(b)
    layer.setup(bottom, top)
    return layer, bottom, top


def _features(rng, n, d, h, w, spread=2.0):
    return (rng.random((n, d, h, w)) * spread).astype(np.float32)


def test_blob_shapes_and_default_fill():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    f = _features(rng, 2, 5, 5, 6)
    layer, bottom, top = make('num_output: 3 neighborhood_size: 1 bias_term: true', x, f)
    assert [b.shape for b in layer.blobs] == [(3, 4, 1, 63), (1, 1, 1, 3)]
    assert np.all(layer.blobs[0].data == 0) and np.all(layer.blobs[1].data == 0)
    assert top[0].shape == (2, 3, 5, 6)
    layer, bottom, top = make('num_output: 4 neighborhood_size: 2 group: 2', x, f[:, :3],
                              _features(rng, 2, 3, 3, 4))
    assert layer.blobs[0].shape == (4, 2, 1, 65) and top[0].shape == (2, 4, 3, 4)


def test_zero_filter_full_offset_is_gaussian_of_channel_sum():
    """FULL offset with a zero blob: every output is the normalised Gaussian filter of the
    sum of all input channels."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 6, 7)).astype(np.float32)
    f = _features(rng, 1, 5, 6, 7, 3.0)
    layer, bottom, top = make('num_output: 2 neighborhood_size: 1 norm_type: AFTER', x, f)
    layer.forward(bottom, top)
    bf = L.BilateralFilter(L.build_lattice(f[0].reshape(5, -1)), 'after')
    ref = bf.gaussian(x[0].reshape(3, -1)).sum(axis=0).reshape(6, 7)
    np.testing.assert_allclose(top[0].data[0, 0], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(top[0].data[0, 1], ref, rtol=1e-5, atol=1e-6)


def test_diag_offset_and_none():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    f = _features(rng, 1, 3, 5, 5)
    w = (rng.standard_normal((2, 2, 1, 15)) * 0.1).astype(np.float32)
    diag, b1, t1 = make('num_output: 2 neighborhood_size: 1 offset_type: DIAG', x, f, blobs=[w])
    none, b2, t2 = make('num_output: 2 neighborhood_size: 1 offset_type: NONE', x, f,
                        blobs=[w + np.eye(2, dtype=np.float32)[:, :, None, None] * L.gaussian_taps(3, 1)])
    diag.forward(b1, t1)
    none.forward(b2, t2)
    np.testing.assert_allclose(t1[0].data, t2[0].data, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(diag.blobs[0].data, w)        # the offset is never stored


def test_gradients_float64():
    rng = np.random.default_rng(3)
    f = rng.random((2, 3, 4, 5)) * 2
    check_layer_gradients('type: "Permutohedral" permutohedral_param { num_output: 3 neighborhood_size: 1 '
                          'bias_term: true norm_type: SYMMETRIC offset_type: FULL }',
                          [(2, 2, 4, 5), f, f], propagate_down=[True, False, False])


def test_gradients_float64_groups_inout_after():
    rng = np.random.default_rng(4)
    fin = rng.random((1, 2, 4, 4)) * 2
    fout = rng.random((1, 2, 3, 3)) * 2
    check_layer_gradients('type: "Permutohedral" permutohedral_param { num_output: 2 neighborhood_size: 2 '
                          'group: 2 norm_type: AFTER offset_type: DIAG }',
                          [(1, 4, 4, 4), fin, fout], propagate_down=[True, False, False])


def test_param_diff_reset_not_accumulated_and_features_untouched():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    f = _features(rng, 2, 5, 4, 5)
    layer, bottom, top = make('num_output: 2 neighborhood_size: 1 bias_term: true', x, f)
    layer.forward(bottom, top)
    top[0].diff[...] = rng.standard_normal(top[0].shape)
    layer.backward(top, [True, True, True], bottom)
    first = [b.diff.copy() for b in layer.blobs]
    bottom[1].diff[...] = 7
    layer.backward(top, [True, True, True], bottom)
    for a, b in zip(first, layer.blobs):
        np.testing.assert_array_equal(a, b.diff)           # reset then set, as Caffe
    np.testing.assert_allclose(layer.blobs[1].diff.ravel(), top[0].diff.sum(axis=(0, 2, 3)), rtol=1e-5)
    assert np.all(bottom[1].diff == 7)                     # features never get a diff
    assert np.any(first[0] != 0)


def test_repeated_init_false_keeps_first_lattice():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    f = _features(rng, 1, 3, 5, 5)
    layer, bottom, top = make('num_output: 2 neighborhood_size: 1 repeated_init: false', x, f)
    layer.forward(bottom, top)
    first = top[0].data.copy()
    bottom[1].data = f[:, ::-1].copy()
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, first)
    again, b2, t2 = make('num_output: 2 neighborhood_size: 1', x, f)
    again.forward(b2, t2)
    b2[1].data = f[:, ::-1].copy()
    again.forward(b2, t2)
    assert np.abs(t2[0].data - first).max() > 1e-3         # repeated_init (default) rebuilds


def test_lattice_sharing_through_second_top():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 2, 5, 6)).astype(np.float32)
    f = _features(rng, 2, 5, 5, 6)
    w = (rng.standard_normal((2, 2, 1, 63)) * 0.1).astype(np.float32)
    producer, bp, tp = make('num_output: 2 neighborhood_size: 1', x, f, blobs=[w], tops=2)
    producer.forward(bp, tp)
    assert tp[1].shape == (2, 3, 1, 8)
    other = _features(rng, 2, 5, 5, 6)          # ignored: the shared lattice is used
    consumer, bc, tc = make('num_output: 2 neighborhood_size: 1', x, other, blobs=[w], lattice_bottom=tp[1])
    consumer.forward(bc, tc)
    np.testing.assert_array_equal(tc[0].data, tp[0].data)
    with pytest.raises(CrfGradError):
        bad, bb, tb = make('num_output: 2 neighborhood_size: 1', x, f, blobs=[w], lattice_bottom=Blob((2, 3, 1, 8)))
        bad.forward(bb, tb)


def test_skip_blur():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    f = _features(rng, 1, 2, 4, 4)
    layer, bottom, top = make('num_output: 2 neighborhood_size: 1 do_skip_blur: true norm_type: AFTER', x, f)
    layer.forward(bottom, top)
    lat = L.build_lattice(f[0].reshape(2, -1))
    bf = L.BilateralFilter(lat, 'after')
    ref = lat.slice(lat.splat(x[0].reshape(2, -1))) * bf.norm_back
    np.testing.assert_allclose(top[0].data[0].reshape(2, -1), ref, rtol=1e-5, atol=1e-6)
    top[0].diff[...] = 1
    layer.backward(top, [True, False, False], bottom)
    assert np.all(layer.blobs[0].diff == 0)


@pytest.mark.parametrize('param,fshape,err_field', [
    ('num_output: 3 neighborhood_size: 1 offset_type: DIAG', (1, 2, 4, 4), 'offset_type'),
    ('num_output: 3 neighborhood_size: 1 do_skip_blur: true', (1, 2, 4, 4), 'do_skip_blur'),
    ('num_output: 2 neighborhood_size: 1 group: 3', (1, 2, 4, 4), 'group'),
    ('neighborhood_size: 1', (1, 2, 4, 4), 'num_output'),
    ('num_output: 2 neighborhood_size: 1', (1, 2, 3, 4), 'bottom'),
    ('num_output: 2 neighborhood_size: 1', (2, 2, 4, 4), 'bottom'),
])
def test_errors(param, fshape, err_field):
    x = np.zeros((1, 2, 4, 4), np.float32)
    with pytest.raises(CrfGradError) as e:
        make(param, x, np.zeros(fshape, np.float32))
    assert err_field in str(e.value) and 'perm' in str(e.value)


def test_non_finite_features_are_an_error():
    f = np.zeros((1, 2, 4, 4), np.float32)
    f[0, 1, 2, 3] = np.nan
    layer, bottom, top = make('num_output: 2 neighborhood_size: 1', np.zeros((1, 2, 4, 4), np.float32), f)
    with pytest.raises(CrfGradError) as e:
        layer.forward(bottom, top)
    assert 'NaN' in str(e.value) and 'perm' in str(e.value)
