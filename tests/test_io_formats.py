"""Prototxt parsing (every real model file), caffemodel / HDF5 weights I/O, BlobProto, errors, CLI."""
import glob
import os
import re

import h5py
import numpy as np
import pytest

from oracle_util import DATA, ORACLE

from crfgrad_cupy.cli import main as cli_main
from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.io import blobproto, caffemodel, hdf5_weights, prototxt
from crfgrad_cupy.proto import caffe_pb2

MODELS = os.path.join(DATA, 'caffe_models')
WHOLE = os.path.join(ORACLE, 'whole_net')
LEGACY = os.path.join(ORACLE, 'legacy_upgrade')


def _prototxts():
    files = glob.glob(os.path.join(MODELS, '**', '*.prototxt'), recursive=True)
    files += glob.glob(os.path.join(ORACLE, '**', '*.prototxt'), recursive=True)
    return sorted(files)


def _weight_files():
    return sorted(glob.glob(os.path.join(MODELS, '**', '*.caffemodel'), recursive=True)
                  + glob.glob(os.path.join(ORACLE, '**', '*.caffemodel'), recursive=True))


def _h5_files():
    return sorted(glob.glob(os.path.join(MODELS, '**', '*.caffemodel.h5'), recursive=True)
                  + glob.glob(os.path.join(ORACLE, '**', '*.caffemodel.h5'), recursive=True))


def _fill_template(text):
    """DeepLab templates: ${VAR} -> a dummy string inside quotes, a number outside."""
    text = re.sub(r'"[^"\n]*"', lambda m: re.sub(r'\$\{\w+\}', 'dummy', m.group(0)), text)
    return re.sub(r'\$\{\w+\}', '2', text)


def _rel(path):
    return os.path.relpath(path, os.path.dirname(MODELS))


# ------------------------------------------------------------ schema coverage

@pytest.mark.parametrize('path', _prototxts(), ids=_rel)
def test_every_prototxt_parses(path):
    with open(path) as f:
        text = f.read()
    templated = '${' in text
    if templated:
        text = _fill_template(text)
    if 'solver' in os.path.basename(path):
        sp = prototxt.load_solver_param(text if templated else path)
        assert sp.ListFields()
        return
    net = prototxt.load_net_param(text if templated else path)
    assert len(net.layer) > 0 and not len(net.layers) and not len(net.input)
    for layer in net.layer:
        assert layer.type, layer.name
        if layer.HasField('convolution_param'):
            assert not layer.convolution_param.HasField('hole')


def test_prototxt_list_is_complete():
    files = _prototxts()
    if not files:
        pytest.skip('shared data absent')
    names = {os.path.basename(f) for f in files}
    for expected in ('deploy21.prototxt', 'TVG_CRFRNN_COCO_VOC.prototxt', 'v0.prototxt',
                     'solver.prototxt'):
        assert expected in names


@pytest.mark.skipif(not os.path.isdir(os.path.join(MODELS, 'deeplab_largefov')),
                    reason='DeepLab files absent')
def test_deeplab_extensions_kept():
    with open(os.path.join(MODELS, 'deeplab_largefov', 'test.prototxt')) as f:
        net = prototxt.load_net_param(_fill_template(f.read()))
    by_name = {l.name: l for l in net.layer}
    assert by_name['data'].type == 'ImageSegData'
    crf = by_name['crf']
    assert crf.type == 'DenseCRF' and crf.dense_crf_param.max_iter == 10
    assert list(crf.dense_crf_param.bi_rgb_std) == [10]
    assert by_name['fc8_mat'].type == 'MatWrite'
    assert by_name['fc8_interp'].interp_param.zoom_factor == 8
    assert list(by_name['fc6'].convolution_param.dilation) == [12]
    with open(os.path.join(MODELS, 'deeplab_largefov', 'train.prototxt')) as f:
        net = prototxt.load_net_param(_fill_template(f.read()))
    by_name = {l.name: l for l in net.layer}
    assert by_name['data'].image_data_param.label_type == caffe_pb2.ImageDataParameter.PIXEL
    assert by_name['accuracy'].type == 'SegAccuracy'
    assert list(by_name['accuracy'].seg_accuracy_param.ignore_label) == [255]


@pytest.mark.skipif(not os.path.isdir(os.path.join(MODELS, 'crfasrnn')), reason='absent')
def test_crfasrnn_v1_net():
    net = prototxt.load_net_param(os.path.join(MODELS, 'crfasrnn', 'TVG_CRFRNN_COCO_VOC.prototxt'))
    types = {l.name: l.type for l in net.layer}
    assert types['crop'] == 'Crop'
    msmf = [l for l in net.layer if l.type == 'MultiStageMeanfield']
    assert len(msmf) == 1
    assert msmf[0].multi_stage_meanfield_param.num_iterations == 10
    assert [p.lr_mult for p in msmf[0].param] == [10000, 10000, 1000]


# ------------------------------------------------------------- prototxt I/O

def test_to_text_round_trip(tmp_path):
    net = prototxt.load_net_param('name: "n" layer { name: "c" type: "Convolution" bottom: "a" '
                                  'top: "b" param { lr_mult: 0.1 } convolution_param { '
                                  'num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: '
                                  '"gaussian" std: 0.01 } } }')
    path = tmp_path / 'n.prototxt'
    prototxt.write_prototxt(net, str(path))
    assert prototxt.load_net_param(str(path)) == net
    assert 'std: 0.01' in prototxt.to_text(net)
    assert [p.name for p in tmp_path.iterdir()] == ['n.prototxt']


def test_text_source_detection(tmp_path):
    path = tmp_path / 'x.prototxt'
    path.write_text('name: "from_file"')
    assert prototxt.load_net_param(str(path)).name == 'from_file'
    assert prototxt.load_net_param('name: "from_text"').name == 'from_text'
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param(str(tmp_path / 'missing.prototxt'))
    assert 'missing.prototxt' in str(e.value)


def test_syntax_error_names_file_line_field(tmp_path):
    path = tmp_path / 'bad.prototxt'
    path.write_text('name: "n"\nlayer {\n  name: "c"\n  type: "Convolution"\n'
                    '  convolution_param { num_output: three }\n}\n')
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param(str(path))
    err = e.value
    assert err.line == 5 and err.field == 'num_output' and err.file == str(path)
    assert str(path) + ':5' in str(err) and 'num_output' in str(err)


def test_unknown_field_names_line_and_field(tmp_path):
    path = tmp_path / 'bad.prototxt'
    path.write_text('layer {\n  name: "c"\n  type: "ReLU"\n'
                    '  relu_param { negative_slop: 0.1 }\n}\n')
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param(str(path))
    assert e.value.line == 4 and e.value.field == 'negative_slop'
    assert 'bad.prototxt:4' in str(e.value)


def test_bad_enum_and_unclosed_brace():
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param('layer {\n name: "p"\n pooling_param { pool: MEDIAN }\n}')
    assert e.value.line == 3 and e.value.field == 'pool' and 'MEDIAN' in str(e.value)
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param('layer {\n name: "p"\n')
    assert e.value.line is not None


def test_solver_syntax_error(tmp_path):
    path = tmp_path / 'solver.prototxt'
    path.write_text('base_lr: 0.1\nlr_policy: "fixed"\nmax_iter: ten\n')
    with pytest.raises(CrfGradError) as e:
        prototxt.load_solver_param(str(path))
    assert e.value.line == 3 and e.value.field == 'max_iter'


def test_binary_file_as_prototxt(tmp_path):
    path = tmp_path / 'net.prototxt'
    path.write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\xff\xfe')
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param(str(path))
    assert str(path) in str(e.value)


# ----------------------------------------------------------------- BlobProto

def test_blob_shape_and_legacy_dims():
    b = caffe_pb2.BlobProto(num=1, channels=1, height=5, width=4)
    b.data.extend(np.arange(20, dtype=np.float32))
    a = blobproto.blob_to_array(b)
    assert a.shape == (1, 1, 5, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a.ravel(), np.arange(20))
    assert blobproto.legacy_shape_matches(b, (5, 4))
    assert not blobproto.legacy_shape_matches(b, (4, 5))
    assert not blobproto.legacy_shape_matches(b, (1, 1, 1, 5, 4))
    assert caffemodel.fit_blob(a, (5, 4), legacy=True).shape == (5, 4)
    with pytest.raises(CrfGradError) as e:
        caffemodel.fit_blob(a, (5, 4), legacy=False, source='f.caffemodel', layer='fc', index=0)
    assert e.value.layer == 'fc' and 'f.caffemodel' in str(e.value)
    # shape.dim wins only when no legacy field is present
    b2 = caffe_pb2.BlobProto()
    b2.shape.dim.extend([2, 3])
    b2.data.extend(range(6))
    assert blobproto.blob_to_array(b2).shape == (2, 3)
    assert not blobproto.legacy_shape_matches(b2, (1, 2, 3))
    # a legacy blob with only some fields present: the absent ones are 0
    b3 = caffe_pb2.BlobProto(width=3)
    b3.data.extend([1, 2, 3])
    with pytest.raises(CrfGradError):
        blobproto.blob_to_array(b3)


def test_blob_double_data_and_diff():
    b = caffe_pb2.BlobProto()
    b.shape.dim.extend([3])
    vals = [1.0 + 1e-12, 2.5, -3.0]
    b.double_data.extend(vals)
    b.double_diff.extend([0.5, 0.25, 0.125])
    a = blobproto.blob_to_array(b, dtype=np.float64)
    assert a.dtype == np.float64 and a[0] == vals[0]
    assert blobproto.blob_to_array(b).dtype == np.float32
    np.testing.assert_array_equal(blobproto.blob_to_array(b, diff=True), [0.5, 0.25, 0.125])
    assert blobproto.blob_has_diff(b)


def test_blob_count_mismatch():
    b = caffe_pb2.BlobProto()
    b.shape.dim.extend([2, 2])
    b.data.extend([1, 2, 3])
    with pytest.raises(CrfGradError) as e:
        blobproto.blob_to_array(b, source='w.caffemodel', layer='conv1')
    assert e.value.layer == 'conv1' and e.value.field == 'data' and 'w.caffemodel' in str(e.value)


def test_array_to_blob_round_trip():
    rng = np.random.RandomState(0)
    a = rng.randn(2, 3, 4).astype(np.float32)
    d = rng.randn(2, 3, 4).astype(np.float32)
    b = blobproto.array_to_blob(a, diff=d)
    assert list(b.shape.dim) == [2, 3, 4] and not blobproto.uses_legacy_shape(b)
    b = caffe_pb2.BlobProto.FromString(b.SerializeToString())
    np.testing.assert_array_equal(blobproto.blob_to_array(b), a)
    np.testing.assert_array_equal(blobproto.blob_to_array(b, diff=True), d)
    a64 = rng.randn(5)
    b = blobproto.array_to_blob(a64, double=True)
    assert len(b.double_data) == 5 and len(b.data) == 0
    np.testing.assert_array_equal(blobproto.blob_to_array(b, dtype=np.float64), a64)
    with pytest.raises(CrfGradError):
        blobproto.array_to_blob(a, diff=d[:1])
    assert blobproto.array_to_blob(np.float32(3.0)).shape.dim == []


# ---------------------------------------------------------------- caffemodel

@pytest.mark.parametrize('path', _weight_files(), ids=_rel)
def test_caffemodel_round_trip(path, tmp_path):
    net = caffemodel.load_caffemodel(path)
    assert len(net.layer) > 0
    out = tmp_path / 'copy.caffemodel'
    caffemodel.save_caffemodel(net, str(out))
    again = caffemodel.load_caffemodel(str(out))
    assert again == net
    w1 = caffemodel.weights_from_net_param(net)
    w2 = hdf5_weights.load_weights(str(out))
    assert list(w1) == list(w2) and w1.legacy == w2.legacy
    for k in w1:
        for a, b in zip(w1[k], w2[k]):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['copy.caffemodel']


@pytest.mark.skipif(not os.path.isdir(WHOLE), reason='oracle absent')
def test_caffemodel_and_h5_hold_the_same_weights():
    pb = hdf5_weights.load_weights(os.path.join(WHOLE, 'whole_net.caffemodel'))
    h5 = hdf5_weights.load_weights(os.path.join(WHOLE, 'whole_net.caffemodel.h5'))
    assert set(pb) == set(h5)
    assert list(h5) == sorted(h5)  # Caffe's files have no creation order: name order
    for k in pb:
        assert len(pb[k]) == len(h5[k])
        for a, b in zip(pb[k], h5[k]):
            np.testing.assert_array_equal(a, b)
    z = np.load(os.path.join(WHOLE, 'whole_net.npz'))
    for key in z.files:
        if key.startswith('param/'):
            _, layer, i = key.split('/')
            np.testing.assert_array_equal(pb[layer][int(i)], z[key])


def test_truncated_caffemodel(tmp_path):
    net = caffe_pb2.NetParameter(name='t')
    layer = net.layer.add(name='conv', type='Convolution')
    layer.blobs.add().CopyFrom(blobproto.array_to_blob(np.arange(100, dtype=np.float32)))
    data = net.SerializeToString()
    path = tmp_path / 'trunc.caffemodel'
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CrfGradError) as e:
        caffemodel.load_caffemodel(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(CrfGradError):
        hdf5_weights.load_weights(str(path))


def test_non_protobuf_files(tmp_path):
    png = tmp_path / 'image.caffemodel'
    png.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4)
    with pytest.raises(CrfGradError) as e:
        caffemodel.load_caffemodel(str(png))
    assert 'image.caffemodel' in str(e.value)
    # bytes that protobuf accepts silently but that hold no layers
    junk = tmp_path / 'junk.caffemodel'
    junk.write_bytes(b'\x0a\x03abc')
    with pytest.raises(CrfGradError) as e:
        caffemodel.load_caffemodel(str(junk))
    assert 'no layers' in str(e.value)
    empty = tmp_path / 'empty.caffemodel'
    empty.write_bytes(b'')
    with pytest.raises(CrfGradError):
        caffemodel.load_caffemodel(str(empty))
    text = tmp_path / 'text.caffemodel'
    text.write_text('name: "not binary"\nlayer { name: "x" }\n')
    with pytest.raises(CrfGradError):
        caffemodel.load_caffemodel(str(text))


@pytest.mark.skipif(not os.path.isdir(os.path.join(MODELS, 'crfasrnn')), reason='absent')
def test_real_png_is_rejected():
    path = os.path.join(MODELS, 'crfasrnn', 'output.png')
    with pytest.raises(CrfGradError) as e:
        hdf5_weights.load_weights(path)
    assert 'output.png' in str(e.value)


def test_save_caffemodel_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'w.caffemodel'
    first = caffe_pb2.NetParameter(name='first')
    first.layer.add(name='a', type='ReLU')
    caffemodel.save_caffemodel(first, str(path))

    def broken_replace(src, dst):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'replace', broken_replace)
    second = caffe_pb2.NetParameter(name='second')
    second.layer.add(name='b', type='ReLU')
    with pytest.raises(OSError):
        caffemodel.save_caffemodel(second, str(path))
    monkeypatch.undo()
    assert caffemodel.load_caffemodel(str(path)).name == 'first'
    assert [p.name for p in tmp_path.iterdir()] == ['w.caffemodel']


def test_v0_caffemodel_blobs_survive_upgrade(tmp_path):
    net = caffe_pb2.NetParameter(name='v0')
    entry = net.layers.add()
    entry.bottom.append('data')
    entry.top.append('ip')
    entry.layer.name = 'ip'
    entry.layer.type = 'innerproduct'
    entry.layer.num_output = 2
    b = entry.layer.blobs.add(num=1, channels=1, height=2, width=3)
    b.data.extend(range(6))
    path = tmp_path / 'v0.caffemodel'
    path.write_bytes(net.SerializeToString())
    w = hdf5_weights.load_weights(str(path))
    assert list(w) == ['ip'] and w['ip'][0].shape == (1, 1, 2, 3) and ('ip', 0) in w.legacy
    up = caffemodel.load_caffemodel(str(path))
    assert up.layer[0].type == 'InnerProduct' and up.layer[0].inner_product_param.num_output == 2


# ---------------------------------------------------------------------- HDF5

@pytest.mark.parametrize('path', _h5_files(), ids=_rel)
def test_hdf5_round_trip(path, tmp_path):
    w = hdf5_weights.load_hdf5_weights(path)
    with h5py.File(path, 'r') as f:
        assert list(w) == list(f['data'].keys())
        empty = [k for k in f['data'] if len(f['data'][k]) == 0]
    assert empty and all(w[k] == [] for k in empty)
    out = tmp_path / 'copy.caffemodel.h5'
    hdf5_weights.save_hdf5_weights(w, str(out))
    again = hdf5_weights.load_hdf5_weights(str(out))
    assert list(again) == list(w)
    for k in w:
        assert len(again[k]) == len(w[k])
        for a, b in zip(w[k], again[k]):
            assert b.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    with h5py.File(str(out), 'r') as f:
        for k in w:
            assert sorted(f['data'][k].keys()) == sorted(str(i) for i in range(len(w[k])))
    assert hdf5_weights.is_hdf5(str(out)) and not hdf5_weights.is_hdf5(__file__)


def test_hdf5_numeric_blob_order_and_diffs(tmp_path):
    rng = np.random.RandomState(1)
    arrays = [rng.randn(i + 1).astype(np.float32) for i in range(12)]
    path = tmp_path / 'w.h5'
    with h5py.File(str(path), 'w') as f:
        g = f.create_group('data').create_group('many')
        for i in (10, 2, 0, 11, 1, 3, 4, 5, 6, 7, 8, 9):  # "10" sorts before "2" as text
            g.create_dataset(str(i), data=arrays[i])
        f['data'].create_group('relu')
    w = hdf5_weights.load_hdf5_weights(str(path))
    assert [a.shape[0] for a in w['many']] == list(range(1, 13))
    assert w['relu'] == []
    out = tmp_path / 'd.h5'
    diffs = {'many': [a * 2 for a in arrays], 'relu': []}
    hdf5_weights.save_hdf5_weights(w, str(out), diffs=diffs)
    data, d = hdf5_weights.load_hdf5_weights(str(out), diffs=True)
    np.testing.assert_array_equal(d['many'][11], arrays[11] * 2)
    _, none = hdf5_weights.load_hdf5_weights(str(path), diffs=True)
    assert none is None


def test_hdf5_bad_files(tmp_path):
    path = tmp_path / 'nodata.h5'
    with h5py.File(str(path), 'w') as f:
        f.create_dataset('x', data=np.zeros(3))
    with pytest.raises(CrfGradError) as e:
        hdf5_weights.load_hdf5_weights(str(path))
    assert e.value.field == 'data' and 'nodata.h5' in str(e.value)
    path = tmp_path / 'gap.h5'
    with h5py.File(str(path), 'w') as f:
        g = f.create_group('data').create_group('conv')
        g.create_dataset('0', data=np.zeros(3))
        g.create_dataset('2', data=np.zeros(3))
    with pytest.raises(CrfGradError) as e:
        hdf5_weights.load_hdf5_weights(str(path))
    assert e.value.layer == 'conv'
    trunc = tmp_path / 'trunc.caffemodel.h5'
    src = tmp_path / 'ok.h5'
    hdf5_weights.save_hdf5_weights({'conv': [np.ones((64, 64), np.float32)]}, str(src))
    trunc.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(CrfGradError) as e:
        hdf5_weights.load_weights(str(trunc))
    assert 'trunc.caffemodel.h5' in str(e.value)
    with pytest.raises(CrfGradError):
        caffemodel.load_caffemodel(str(src))  # HDF5 given to the protobuf reader


def test_save_hdf5_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'w.h5'
    hdf5_weights.save_hdf5_weights({'a': [np.ones(2, np.float32)]}, str(path))
    monkeypatch.setattr(os, 'replace', lambda s, d: (_ for _ in ()).throw(OSError('full')))
    with pytest.raises(OSError):
        hdf5_weights.save_hdf5_weights({'b': []}, str(path))
    monkeypatch.undo()
    assert list(hdf5_weights.load_hdf5_weights(str(path))) == ['a']
    assert [p.name for p in tmp_path.iterdir()] == ['w.h5']


def test_load_weights_dispatch_by_content(tmp_path):
    w = {'conv': [np.arange(6, dtype=np.float32).reshape(2, 3)], 'relu': []}
    h5 = tmp_path / 'weights.caffemodel'  # HDF5 content, protobuf-like name
    hdf5_weights.save_hdf5_weights(w, str(h5))
    got = hdf5_weights.load_weights(str(h5))
    assert list(got) == ['conv', 'relu']
    net = caffe_pb2.NetParameter()
    layer = net.layer.add(name='conv')
    layer.blobs.add().CopyFrom(blobproto.array_to_blob(w['conv'][0]))
    pb = tmp_path / 'weights.h5'  # protobuf content, HDF5-like name
    caffemodel.save_caffemodel(net, str(pb))
    got = hdf5_weights.load_weights(str(pb))
    np.testing.assert_array_equal(got['conv'][0], w['conv'][0])
    with pytest.raises(CrfGradError):
        hdf5_weights.load_weights(str(tmp_path / 'missing'))


# ----------------------------------------------------------------------- CLI

@pytest.mark.skipif(not os.path.isdir(LEGACY), reason='oracle absent')
@pytest.mark.parametrize('old,ref,kind', [
    ('v1.prototxt', 'v1_upgraded.prototxt', 'net'),
    ('v0.prototxt', 'v0_upgraded.prototxt', 'net'),
    ('solver_v1.prototxt', 'solver_v1_upgraded.prototxt', 'solver'),
    ('v1_weights.caffemodel', 'v1_weights_upgraded.caffemodel', 'caffemodel')])
def test_cli_upgrade(old, ref, kind, tmp_path, capsys):
    new = tmp_path / ('new_' + old)
    assert cli_main(['upgrade', os.path.join(LEGACY, old), str(new)]) == 0
    ref = os.path.join(LEGACY, ref)
    if kind == 'net':
        assert prototxt.load_net_param(str(new), upgrade_legacy=False) == \
            prototxt.load_net_param(ref)
    elif kind == 'solver':
        assert prototxt.load_solver_param(str(new)) == prototxt.load_solver_param(ref)
        assert 'solver_type' not in new.read_text()
    else:
        assert caffemodel.load_caffemodel(str(new), upgrade_legacy=False) == \
            caffemodel.load_caffemodel(ref, upgrade_legacy=False)
    assert kind in capsys.readouterr().out


def test_cli_upgrade_errors(tmp_path, capsys):
    bad = tmp_path / 'bad.prototxt'
    bad.write_text('layer {\n  name: "a"\n  typo: 1\n}\n')
    assert cli_main(['upgrade', str(bad), str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'bad.prototxt:3' in err and 'typo' in err
    trunc = tmp_path / 'trunc.caffemodel'
    trunc.write_bytes(b'\x0a\x05le')
    assert cli_main(['upgrade', str(trunc), str(tmp_path / 'out')]) == 2
    assert 'trunc.caffemodel' in capsys.readouterr().err
    assert cli_main(['upgrade', str(tmp_path / 'missing'), str(tmp_path / 'out')]) == 2
    assert not (tmp_path / 'out').exists()


def test_atomic_writes_leave_usual_permissions_and_no_temp_files(tmp_path):
    import stat
    from crfgrad_cupy.io.atomic import write_bytes_atomic, atomic_path
    target = tmp_path / 'w.bin'
    write_bytes_atomic(b'abc', str(target))
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & 0o044, oct(mode)          # group/others may read, as files Caffe writes
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, 'wb').write(b'half')
            raise RuntimeError('disk full')
    assert target.read_bytes() == b'abc'
    assert sorted(os.listdir(tmp_path)) == ['w.bin']
