"""Caffe weights between .caffemodel, Caffe HDF5, .npz and MATLAB .mat (both axis orders,
MAT v5/v7/v7.3), read back with SciPy and h5py directly; the MAT reader/writer itself."""
import collections
import os

import numpy as np
import pytest

from oracle_util import DATA

from crfgrad_cupy.convert.matfile import (StructArray, load_mat, mat_version, sanitize_names,
                                          save_mat)
from crfgrad_cupy.convert.matlab import (caffe_to_matlab_array, load_mat_weights,
                                         matlab_to_caffe_array, save_mat_weights)
from crfgrad_cupy.convert.weights import (convert_weights, load_any_weights, load_npz_weights,
                                          save_npz_weights)
from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.net import TEST, Net

LENET = os.path.join(DATA, 'caffe_models', 'lenet_mnist')


def _weights():
    r = np.random.default_rng(0)
    w = collections.OrderedDict()
    w['conv1/3x3'] = [r.standard_normal((4, 3, 2, 5)).astype(np.float32),
                      r.standard_normal(4).astype(np.float32)]
    w['relu1'] = []
    w['fc-7'] = [r.standard_normal((6, 7)).astype(np.float32)]
    w['1bad name'] = [np.float32(r.standard_normal((1, 1, 1, 1)))]
    w['up'] = [r.standard_normal((3, 2, 4, 1)).astype(np.float32)]
    return w


def _equal(a, b):
    """Same layers with blobs, in the same order, with identical arrays."""
    a = collections.OrderedDict((k, v) for k, v in a.items() if len(v))
    b = collections.OrderedDict((k, v) for k, v in b.items() if len(v))
    assert list(a) == list(b)
    for k in a:
        assert len(a[k]) == len(b[k]), k
        for x, y in zip(a[k], b[k]):
            assert x.shape == y.shape and np.array_equal(x, y), k


# ----------------------------------------------------------------------------- MAT I/O

@pytest.mark.parametrize('version', ['5', '7', '7.3'])
def test_mat_roundtrip_of_every_value_kind(version, tmp_path):
    values = collections.OrderedDict([
        ('a', np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
        ('d', np.array([[1.5, -2.0]])),
        ('i', np.array([[1, 2, 3]], dtype=np.int32)),
        ('s', 'conv'), ('empty_s', ''), ('empty', None), ('ecell', []),
        ('cell', ['x', np.eye(2), {'q': 1.0}]),
        ('st', {'name': 'n', 'nested': {'deep': np.ones((2, 1), np.float32)}}),
        ('fieldless', {}),
        ('arr', StructArray([{'n': 'a', 'v': np.ones((2, 1))}, {'n': 'bb', 'v': np.zeros((3, 1))}])),
    ])
    path = str(tmp_path / 'v.mat')
    save_mat(path, values, version=version)
    assert mat_version(path) == ('7.3' if version == '7.3' else '5')
    r = load_mat(path)
    assert sorted(r) == sorted(values)      # HDF5 lists top-level names alphabetically
    assert r['a'].dtype == np.float32 and np.array_equal(r['a'], values['a'])
    assert np.array_equal(r['d'], values['d']) and r['i'].dtype == np.int32
    assert r['s'] == 'conv' and r['empty_s'] == '' and r['empty'].shape == (0, 0) and r['ecell'] == []
    assert r['cell'][0] == 'x' and np.array_equal(r['cell'][1], np.eye(2))
    assert float(r['cell'][2]['q'][0, 0]) == 1.0
    assert r['st']['name'] == 'n' and r['st']['nested']['deep'].shape == (2, 1)
    assert r['fieldless'] == {}
    assert isinstance(r['arr'], StructArray) and r['arr'].shape == (1, 2)
    assert [e['n'] for e in r['arr']] == ['a', 'bb'] and r['arr'][1]['v'].shape == (3, 1)


def test_v73_file_follows_matlab_layout(tmp_path):
    import h5py
    from scipy.io.matlab import matfile_version
    path = str(tmp_path / 'v.mat')
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    save_mat(path, {'a': a, 'c': ['ab'], 's': {'f': 1.0}, 'b': np.array([[True]])}, version='7.3')
    head = open(path, 'rb').read(128)
    assert head.startswith(b'MATLAB 7.3 MAT-file') and head[124:126] == b'\x00\x02' and head[126:] == b'IM'
    assert matfile_version(path)[0] == 2
    with h5py.File(path, 'r') as f:
        assert f.userblock_size == 512
        ds = f['a']
        assert ds.attrs['MATLAB_class'] == b'single' and ds.shape == (4, 3, 2)   # reversed
        assert np.array_equal(ds[()].T, a)
        c = f['c']
        assert c.attrs['MATLAB_class'] == b'cell' and c.dtype == h5py.ref_dtype
        target = f[c[()].ravel()[0]]
        assert target.name.startswith('/#refs#/') and target.attrs['MATLAB_class'] == b'char'
        assert ''.join(map(chr, target[()].ravel())) == 'ab'
        assert f['s'].attrs['MATLAB_class'] == b'struct'
        assert [b''.join(x).decode() for x in f['s'].attrs['MATLAB_fields']] == ['f']
        assert f['b'].attrs['MATLAB_class'] == b'logical' and f['b'].dtype == np.uint8


def test_reads_matlab_written_v73_struct_arrays():
    path = os.path.join(DATA, 'matconvnet_models', 'dncnn', 'DnCNN-epoch-50.mat')
    if not os.path.exists(path):
        pytest.skip('DnCNN model not present')
    net = load_mat(path)['net']
    assert isinstance(net['layers'], StructArray) and len(net['layers']) == 50
    assert net['layers'][48]['type'] == 'dagnn.Sum' and net['layers'][48]['block'] == {}
    assert net['layers'][48]['inputs'] == ['conv48', 'input']
    assert net['params'][6]['name'] == 'bnorm4_m' and net['params'][6]['value'].shape == (64, 2)


def test_not_a_mat_file_is_an_error(tmp_path):
    p = tmp_path / 'x.mat'
    p.write_bytes(b'\x00' * 300)
    with pytest.raises(CrfGradError, match='not a MATLAB'):
        load_mat(str(p))
    with pytest.raises(CrfGradError, match='not found'):
        load_mat(str(tmp_path / 'missing.mat'))


def test_sanitize_names():
    names = sanitize_names(['conv1/3x3', 'conv1_3x3', '1x', 'a' * 80, 'ok'])
    assert names[0] == 'conv1_3x3' and names[1] == 'conv1_3x3_1' and names[2] == 'x1x'
    assert len(names[3]) == 63 and names[4] == 'ok'


# ----------------------------------------------------------------------------- Caffe -> MATLAB

@pytest.mark.parametrize('order', ['matcaffe', 'matconvnet'])
def test_axis_orders(order):
    x = np.arange(4 * 3 * 2 * 5, dtype=np.float32).reshape(4, 3, 2, 5)   # (Cout, Cin, kh, kw)
    m = caffe_to_matlab_array(x, order)
    if order == 'matcaffe':
        assert m.shape == (5, 2, 3, 4) and m[4, 1, 2, 3] == x[3, 2, 1, 4]
    else:
        assert m.shape == (2, 5, 3, 4) and m[1, 4, 2, 3] == x[3, 2, 1, 4]
    assert caffe_to_matlab_array(np.ones(7), order).shape == (7, 1)
    assert caffe_to_matlab_array(np.ones((6, 7)), order).shape == (7, 6)
    back = matlab_to_caffe_array(m, x.shape, order)
    assert np.array_equal(back, x)
    # MATLAB dropped a trailing singleton (Cout = 1)
    y = x[:1]
    assert np.array_equal(matlab_to_caffe_array(caffe_to_matlab_array(y, order)[..., 0], y.shape, order), y)


@pytest.mark.parametrize('order', ['matcaffe', 'matconvnet'])
@pytest.mark.parametrize('version', ['5', '7', '7.3'])
def test_caffe_to_mat_read_back_raw(order, version, tmp_path):
    """Read the exported file with SciPy / h5py themselves, not through our reader."""
    w = _weights()
    path = str(tmp_path / 'w.mat')
    save_mat_weights(w, path, order=order, version=version)
    fields = {'conv1/3x3': 'conv1_3x3', 'fc-7': 'fc_7', '1bad name': 'layer_1bad_name', 'up': 'up'}
    if version == '7.3':
        import h5py
        with h5py.File(path, 'r') as f:
            assert f['axis_order'].attrs['MATLAB_class'] == b'char'
            names = [''.join(map(chr, f[r][()].ravel())) for r in f['caffe_names'][()].ravel()]
            assert names == ['conv1/3x3', 'fc-7', '1bad name', 'up']
            for cname, fname in fields.items():
                refs = f['weights'][fname][()].ravel()
                for blob, ref in zip(w[cname], refs):
                    raw = f[ref][()]                            # h5py: MATLAB dims reversed
                    want = caffe_to_matlab_array(blob, order)
                    assert np.array_equal(raw.T, want), cname
                    if order == 'matcaffe':
                        # matcaffe's fully reversed order reads through h5py as Caffe's shape
                        assert np.array_equal(raw.reshape(blob.shape), blob)
    else:
        import scipy.io
        d = scipy.io.loadmat(path)
        assert str(d['axis_order'][0]) == order
        names = [str(c[0]) for c in d['caffe_names'].ravel()]
        assert names == ['conv1/3x3', 'fc-7', '1bad name', 'up']
        st = d['weights'][0, 0]
        for cname, fname in fields.items():
            cell = st[fname]
            for i, blob in enumerate(w[cname]):
                m = cell[0, i]
                assert m.dtype == np.float32
                want = caffe_to_matlab_array(blob, order)
                assert m.shape == want.shape and np.array_equal(m, want), cname
        if order == 'matconvnet':
            m = st['conv1_3x3'][0, 0]
            assert m.shape == (2, 5, 3, 4)      # kh x kw x Cin x Cout
    back = load_mat_weights(path)
    _equal(back, w)


def test_lenet_caffemodel_through_every_format(tmp_path):
    model = os.path.join(LENET, 'lenet_iter_10000.caffemodel')
    if not os.path.exists(model):
        pytest.skip('lenet not present')
    ref = load_any_weights(model)
    chain = ['a.npz', 'b.caffemodel.h5', 'c.mat', 'd.caffemodel', 'e.npz']
    src = model
    for name in chain:
        dst = str(tmp_path / name)
        convert_weights(src, dst, proto=os.path.join(LENET, 'lenet.prototxt'))
        _equal(load_any_weights(dst), ref)
        src = dst
    # the final caffemodel (with the prototxt's layers) runs like the original
    x = np.random.default_rng(0).uniform(0, 1, (2, 1, 28, 28)).astype(np.float32)
    a = Net(os.path.join(LENET, 'lenet.prototxt'), model, TEST).forward(data=x)
    b = Net(os.path.join(LENET, 'lenet.prototxt'), str(tmp_path / 'd.caffemodel'), TEST).forward(data=x)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_npz_layout_and_no_pickle(tmp_path):
    w = _weights()
    path = str(tmp_path / 'w.npz')
    save_npz_weights(w, path)
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {'conv1/3x3/0', 'conv1/3x3/1', 'fc-7/0', '1bad name/0', 'up/0'}
    _equal(load_npz_weights(path), w)
    np.savez(str(tmp_path / 'obj.npz'), **{'a/0': np.array([{'x': 1}], dtype=object)})
    with pytest.raises(CrfGradError, match='pickle'):
        load_npz_weights(str(tmp_path / 'obj.npz'))
    np.savez(str(tmp_path / 'badkey.npz'), weights=np.ones(3))
    with pytest.raises(CrfGradError, match='layer/index'):
        load_npz_weights(str(tmp_path / 'badkey.npz'))
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    with pytest.raises(CrfGradError, match='npz'):
        load_npz_weights(str(tmp_path / 'junk.npz'))


def test_load_mat_weights_rejects_other_mat_files(tmp_path):
    path = str(tmp_path / 'other.mat')
    save_mat(path, {'x': np.ones((2, 2))}, version='5')
    with pytest.raises(CrfGradError, match='not a Caffe weights .mat'):
        load_mat_weights(path)


@pytest.mark.parametrize('version', ['5', '7.3'])
def test_invalid_matlab_names_are_refused(version, tmp_path):
    with pytest.raises(CrfGradError, match='valid MATLAB variable'):
        save_mat(str(tmp_path / 'a.mat'), {'1x': np.ones((1, 1))}, version=version)
    with pytest.raises(CrfGradError, match='valid MATLAB struct field'):
        save_mat(str(tmp_path / 'b.mat'), {'s': {'conv1/3x3': np.ones((1, 1))}}, version=version)
    assert not any(p.name.endswith('.mat') for p in tmp_path.iterdir())   # nothing half-written
