"""Caffe -> MatConvNet DagNN .mat -> Caffe: the round trip gives the same outputs; the DagNN
struct has MatConvNet's layout; layers without an equivalent are refused by name."""
import os

import numpy as np
import pytest

from oracle_util import DATA, assert_close

from crfgrad_cupy.convert.matconvnet import matconvnet_to_caffe
from crfgrad_cupy.convert.matfile import StructArray, load_mat
from crfgrad_cupy.convert.to_dagnn import caffe_to_dagnn, convert_caffe_to_dagnn, save_dagnn
from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.net import TEST, Net

CAFFE = os.path.join(DATA, 'caffe_models')

# Every layer type the exporter maps, with Caffe's ceil-rounded pooling and in-place tops.
GRAPH = """
name: "roundtrip"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 13 dim: 11 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2 stride_h: 1 stride_w: 1
    group: 2 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "dil" type: "Convolution" bottom: "pool1" top: "dil"
  convolution_param { num_output: 5 kernel_size: 3 pad: 2 dilation: 2 bias_term: false
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "side" type: "Convolution" bottom: "pool1" top: "side"
  convolution_param { num_output: 5 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "dil" bottom: "side" top: "sum" }
layer { name: "sig" type: "Sigmoid" bottom: "sum" top: "sig" }
layer { name: "cat" type: "Concat" bottom: "sig" bottom: "pool1" top: "cat" }
layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "up" type: "Deconvolution" bottom: "lrn" top: "up"
  convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "scale" type: "Scale" bottom: "crop" top: "scale"
  scale_param { bias_term: true filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "drop" type: "Dropout" bottom: "scale" top: "scale" dropout_param { dropout_ratio: 0.4 } }
layer { name: "pool2" type: "Pooling" bottom: "scale" top: "pool2"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "pool3" type: "Pooling" bottom: "pool2" top: "pool3"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "prob" type: "Softmax" bottom: "pool3" top: "prob" }
"""

BN_IP = """
name: "bn_ip"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 3 dim: 8 dim: 7 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { eps: 0.001 } }
layer { name: "bn_scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "bn2" type: "BatchNorm" bottom: "conv" top: "bn2" }
layer { name: "fc" type: "InnerProduct" bottom: "bn2" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
"""


def _randomize_bn(net):
    r = np.random.default_rng(5)
    for name in ('bn', 'bn2'):
        b = net.params[name]
        C = b[0].data.shape[0]
        b[0].data[...] = r.standard_normal(C) * 2
        b[1].data[...] = r.uniform(0.5, 2, C) * 2
        b[2].data[...] = 2.0                       # scale factor: statistics stored times 2
    s = net.params['bn_scale']
    s[0].data[...] = r.standard_normal(s[0].data.shape)
    s[1].data[...] = r.standard_normal(s[1].data.shape)


def _roundtrip(net, tmp_path, version):
    dag = caffe_to_dagnn(net)
    path = str(tmp_path / ('dag%s.mat' % version))
    save_dagnn(dag, path, version=version)
    conv = matconvnet_to_caffe(path)
    proto, model = conv.save(str(tmp_path / ('back%s' % version)))
    return dag, conv, Net(proto, model, TEST)


@pytest.mark.parametrize('version', ['5', '7.3'])
def test_roundtrip_all_layers_identical(version, tmp_path):
    net = Net(GRAPH, TEST)
    dag, conv, back = _roundtrip(net, tmp_path, version)
    assert [l['type'] for l in dag['layers']] == [
        'dagnn.Conv', 'dagnn.ReLU', 'dagnn.Pooling', 'dagnn.Conv', 'dagnn.Conv', 'dagnn.Sum',
        'dagnn.Sigmoid', 'dagnn.Concat', 'dagnn.LRN', 'dagnn.ConvTranspose', 'dagnn.Crop',
        'dagnn.Scale', 'dagnn.DropOut', 'dagnn.Pooling', 'dagnn.Pooling', 'dagnn.SoftMax']
    # Caffe's ceil pooling becomes a bottom/right pad of p + s - 1: no Crop layer comes back
    assert 'Crop' not in [lp.type for lp in back.net_param.layer if lp.name != 'crop']
    r = np.random.default_rng(0)
    for shape in [(2, 4, 13, 11), (1, 4, 16, 10)]:
        x = r.standard_normal(shape).astype(np.float32)
        a = net.forward(data=x)['prob']
        b = back.forward(data=x)[conv.outputs[-1]]
        assert a.shape == b.shape
        assert np.array_equal(a, b), np.abs(a - b).max()
        # every intermediate blob too; a Caffe blob overwritten in place holds the value of
        # the last variable mapped to it
        names = dag['meta']['caffe']['varNames']
        last = dict(zip(names['caffe'], names['matconvnet']))
        assert last['conv1'] == 'relu1' and last['scale'] == 'drop'
        for caffe_blob, var in last.items():
            assert np.array_equal(net.blobs[caffe_blob].data, back.blobs[var].data), caffe_blob


def test_roundtrip_batchnorm_and_innerproduct(tmp_path):
    net = Net(BN_IP, TEST)
    _randomize_bn(net)
    dag, conv, back = _roundtrip(net, tmp_path, '7.3')
    types = [l['type'] for l in dag['layers']]
    assert types == ['dagnn.Conv', 'dagnn.BatchNorm', 'dagnn.ReLU', 'dagnn.BatchNorm', 'dagnn.Conv']
    bn = dag['layers'][1]
    assert bn['params'] == ['bn_g', 'bn_b', 'bn_m']
    moments = next(p['value'] for p in dag['params'] if p['name'] == 'bn_m')
    mean = net.params['bn'][0].data / 2
    sigma = np.sqrt(net.params['bn'][1].data / 2 + np.float32(0.001))
    assert moments.shape == (4, 2)
    assert np.allclose(moments[:, 0], mean) and np.allclose(moments[:, 1], sigma)
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 7)).astype(np.float32)
    a = net.forward(data=x)['fc']
    b = back.forward(data=x)[conv.outputs[-1]]
    assert b.shape == (3, 5, 1, 1)                 # InnerProduct became a full-size Conv
    assert_close(b.reshape(a.shape), a, rtol=1e-5, atol=1e-6, what='fc')


@pytest.mark.parametrize('model', [('cifar10_bxuan694', 'cifar10_quick.prototxt', 'cifar10_quick_iter_4000.caffemodel'),
                                   ('lenet_mnist', 'lenet.prototxt', 'lenet_iter_10000.caffemodel')])
def test_roundtrip_real_models(model, tmp_path):
    folder, proto, weights = model
    proto, weights = os.path.join(CAFFE, folder, proto), os.path.join(CAFFE, folder, weights)
    if not os.path.exists(weights):
        pytest.skip('model not present')
    out = str(tmp_path / 'dag.mat')
    convert_caffe_to_dagnn(proto, weights, out)
    conv = matconvnet_to_caffe(out)
    back = Net(*conv.save(str(tmp_path / 'back')), TEST)
    net = Net(proto, TEST, weights=weights)
    x = np.random.default_rng(2).uniform(0, 255, net.blobs[net.inputs[0]].shape).astype(np.float32)
    a = net.forward(**{net.inputs[0]: x})[net.outputs[-1]]
    b = back.forward(**{conv.inputs[0]: x})[conv.outputs[-1]]
    # InnerProduct layers come back as convolutions: same sums, possibly in another order
    assert_close(b.reshape(a.shape), a, rtol=1e-5, atol=1e-6, what=folder)
    assert np.array_equal(np.argmax(a, 1), np.argmax(b.reshape(a.shape), 1))


def test_dagnn_struct_layout(tmp_path):
    net = Net(GRAPH, TEST)
    path = str(tmp_path / 'dag.mat')
    save_dagnn(caffe_to_dagnn(net), path, version='7.3')
    d = load_mat(path)['net']
    assert set(d) == {'vars', 'params', 'layers', 'meta'}
    assert isinstance(d['layers'], StructArray)
    assert d['layers'].fields == ['name', 'type', 'inputs', 'outputs', 'params', 'block']
    conv1 = d['layers'][0]
    assert conv1['inputs'] == ['data'] and conv1['params'] == ['conv1_f', 'conv1_b']
    assert np.array_equal(conv1['block']['size'], [[3, 2, 2, 6]])          # FH FW FC K
    assert np.array_equal(conv1['block']['pad'], [[1, 1, 2, 2]])
    assert np.array_equal(conv1["block"]["stride"], [[1, 1]])
    # in-place ReLU: a new variable named after the layer
    assert d['layers'][1]['inputs'] == ['conv1'] and d['layers'][1]['outputs'] == ['relu1']
    pool1 = d['layers'][2]['block']
    assert pool1['method'] == 'max' and np.array_equal(pool1['pad'], [[1, 2, 1, 2]])
    f = next(p for p in d['params'] if p['name'] == 'conv1_f')['value']
    w = net.params['conv1'][0].data
    assert f.shape == (3, 2, 2, 6) and np.array_equal(f, w.transpose(2, 3, 1, 0))
    up = next(p for p in d['params'] if p['name'] == 'up_f')['value']
    assert up.shape == (4, 4, 4, 11)                                         # FH FW K FD
    assert d['vars'][-1]['name'] == 'prob' and bool(np.asarray(d['vars'][-1]['precious']).ravel()[0])
    assert np.array_equal(d['meta']['inputs']['size'], [[13, 11, 4, 2]])


@pytest.mark.parametrize('layer,text,match', [
    ('avg', 'layer { name: "avg" type: "Pooling" bottom: "data" top: "p" '
            'pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }', 'average pooling with padding'),
    ('prod', 'layer { name: "prod" type: "Eltwise" bottom: "data" bottom: "data" top: "p" '
             'eltwise_param { operation: PROD } }', 'Eltwise SUM'),
    ('tanh', 'layer { name: "tanh" type: "TanH" bottom: "data" top: "p" }', 'TanH'),
])
def test_unsupported_caffe_layers_are_named(layer, text, match):
    proto = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 '
             'dim: 6 dim: 6 } } }\n' + text)
    with pytest.raises(CrfGradError, match=match) as exc:
        caffe_to_dagnn(Net(proto, TEST))
    assert exc.value.layer == layer
