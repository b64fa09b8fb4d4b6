"""Legacy net / solver upgrade (V0, V1, net inputs, BatchNorm, DeepLab hole) against Caffe's output."""
import logging
import os

import numpy as np
import pytest

from oracle_util import ORACLE

from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.io import caffemodel, prototxt, upgrade
from crfgrad_cupy.proto import caffe_pb2

LEGACY = os.path.join(ORACLE, 'legacy_upgrade')
needs_oracle = pytest.mark.skipif(not os.path.isdir(LEGACY), reason='oracle legacy_upgrade absent')


def _raw(text):
    """NetParameter parsed without upgrade."""
    return prototxt.load_net_param(text, upgrade_legacy=False)


# --------------------------------------------------------------- oracle case

@needs_oracle
@pytest.mark.parametrize('old,new', [('v1', 'v1_upgraded'), ('v0', 'v0_upgraded')])
def test_oracle_net_upgrade(old, new, caplog):
    with caplog.at_level(logging.WARNING, logger='crfgrad_cupy'):
        got = prototxt.load_net_param(os.path.join(LEGACY, old + '.prototxt'))
    want = prototxt.load_net_param(os.path.join(LEGACY, new + '.prototxt'))
    assert not upgrade.needs_upgrade(want)
    assert got == want, prototxt.to_text(got)
    assert any('V1' in r.getMessage() for r in caplog.records)
    assert any(old + '.prototxt' in r.getMessage() for r in caplog.records)


@needs_oracle
def test_oracle_solver_upgrade(caplog):
    with caplog.at_level(logging.WARNING, logger='crfgrad_cupy'):
        got = prototxt.load_solver_param(os.path.join(LEGACY, 'solver_v1.prototxt'))
    want = prototxt.load_solver_param(os.path.join(LEGACY, 'solver_v1_upgraded.prototxt'))
    assert got == want
    assert got.type == 'Nesterov' and not got.HasField('solver_type')
    assert any('solver_type' in r.getMessage() for r in caplog.records)


@needs_oracle
def test_oracle_caffemodel_upgrade():
    old = caffemodel.load_caffemodel(os.path.join(LEGACY, 'v1_weights.caffemodel'))
    new = caffemodel.load_caffemodel(os.path.join(LEGACY, 'v1_weights_upgraded.caffemodel'),
                                     upgrade_legacy=False)
    assert len(old.layers) == 0 and len(new.layers) == 0
    assert old == new  # same layers, types, params and blobs as Caffe's upgrade_net_proto_binary
    wo = caffemodel.weights_from_net_param(old)
    wn = caffemodel.weights_from_net_param(new)
    assert list(wo) == list(wn) == ['conv1', 'relu1', 'pool1', 'drop1', 'fc', 'prob']
    for name in wo:
        assert [a.shape for a in wo[name]] == [a.shape for a in wn[name]]
        for a, b in zip(wo[name], wn[name]):
            np.testing.assert_array_equal(a, b)
    assert wo['fc'][0].shape == (1, 1, 5, 80)  # legacy 4-D dims kept as stored
    assert ('fc', 0) in wo.legacy


@needs_oracle
def test_oracle_weights_fit_forward_params():
    """The legacy blobs reshape (Caffe's ShapeEquals) to the shapes Caffe used in forward.npz."""
    w = caffemodel.load_caffemodel_weights(os.path.join(LEGACY, 'v1_weights.caffemodel'))
    z = np.load(os.path.join(LEGACY, 'forward.npz'))
    for key in z.files:
        if not key.startswith('param/'):
            continue
        _, layer, i = key.split('/')
        ref = z[key]
        got = caffemodel.fit_blob(w[layer][int(i)], ref.shape, legacy=(layer, int(i)) in w.legacy,
                                  source='v1_weights', layer=layer, index=int(i))
        np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------- V1 rules

V1_NET = '''
name: "n"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5
layers { name: "c" type: CONVOLUTION bottom: "data" top: "c"
  blobs_lr: 1 blobs_lr: 2 blobs_lr: 3 weight_decay: 0.5
  param: "w_shared" blob_share_mode: PERMISSIVE
  convolution_param { num_output: 2 kernel_size: 1 } }
layers { name: "d" type: DECONVOLUTION bottom: "c" top: "d"
  convolution_param { num_output: 2 kernel_size: 2 stride: 2 } }
layers { name: "a" type: ABSVAL bottom: "d" top: "a" loss_weight: 0.5
  include { phase: TRAIN } }
'''


def test_v1_params_types_and_inputs():
    net, warnings = upgrade.upgrade_net_param(_raw(V1_NET), 'x.prototxt')
    assert warnings
    assert [l.type for l in net.layer] == ['Input', 'Convolution', 'Deconvolution', 'AbsVal']
    inp = net.layer[0]
    assert inp.name == 'input' and list(inp.top) == ['data']
    assert list(inp.input_param.shape[0].dim) == [2, 3, 4, 5]
    assert not len(net.input) and not len(net.input_dim)
    c = net.layer[1]
    assert len(c.param) == 3
    assert c.param[0].name == 'w_shared'
    assert c.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert [p.lr_mult for p in c.param] == [1, 2, 3]
    assert c.param[0].decay_mult == 0.5
    assert not c.param[1].HasField('decay_mult')
    a = net.layer[3]
    assert list(a.loss_weight) == [0.5] and a.include[0].phase == caffe_pb2.TRAIN


def test_v1_full_type_table():
    """Every V1 enum name maps to its Caffe type string (or is refused)."""
    expect = {'CONVOLUTION': 'Convolution', 'DECONVOLUTION': 'Deconvolution', 'CROP': 'Crop',
              'INTERP': 'Interp', 'ABSVAL': 'AbsVal', 'SOFTMAX_LOSS': 'SoftmaxWithLoss',
              'HDF5_DATA': 'HDF5Data', 'IM2COL': 'Im2col', 'TANH': 'TanH', 'BNLL': 'BNLL',
              'SIGMOID_CROSS_ENTROPY_LOSS': 'SigmoidCrossEntropyLoss', 'SPLIT': 'Split',
              'MULTI_STAGE_MEANFIELD': 'MultiStageMeanfield', 'DENSE_CRF': 'DenseCRF',
              'IMAGE_SEG_DATA': 'ImageSegData', 'SEG_ACCURACY': 'SegAccuracy',
              'MAT_WRITE': 'MatWrite', 'THRESHOLD': 'Threshold', 'ARGMAX': 'ArgMax'}
    for name in caffe_pb2.V1LayerParameter.LayerType.keys():
        assert name in upgrade.V1_TYPE_NAMES, name
    for enum_name, type_name in expect.items():
        entry = caffe_pb2.V1LayerParameter(name='l', type=getattr(caffe_pb2.V1LayerParameter,
                                                                   enum_name))
        assert upgrade.v1_type_string(entry) == type_name


def test_v1_unsupported_enum_names_layer_and_field():
    text = 'layers { name: "pad1" type: PADDING bottom: "x" top: "y" padding_param { pad_beg: 1 } }'
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param(text)
    msg = str(e.value)
    assert e.value.layer == 'pad1' and e.value.field == 'type'
    assert 'pad1' in msg and 'PADDING' in msg and "'type'" in msg


def test_layer_and_layers_both_refused():
    text = 'layer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }'
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param(text)
    assert e.value.field == 'layers'


def test_input_shape_form_and_shapeless_inputs():
    net = prototxt.load_net_param('input: "a" input: "b" input_shape { dim: 1 dim: 2 } '
                                  'input_shape { dim: 3 } layer { name: "r" type: "ReLU" '
                                  'bottom: "a" top: "r" }')
    assert [l.name for l in net.layer] == ['input', 'r']
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2], [3]]
    # inputs without shapes (old caffemodels): just dropped
    net = prototxt.load_net_param('input: "a" layer { name: "r" type: "ReLU" }')
    assert [l.name for l in net.layer] == ['r'] and not len(net.input)


def test_input_dim_count_mismatch():
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param('input: "a" input_dim: 1 input_dim: 2')
    assert e.value.field == 'input_dim'


def test_data_transform_upgrade():
    net = prototxt.load_net_param(
        'layers { name: "d" type: DATA top: "x" data_param { source: "db" scale: 0.5 '
        'mean_file: "m.binaryproto" crop_size: 7 mirror: true batch_size: 3 } }')
    d = net.layer[0]
    assert d.type == 'Data'
    assert d.transform_param.scale == 0.5 and d.transform_param.mean_file == 'm.binaryproto'
    assert d.transform_param.crop_size == 7 and d.transform_param.mirror
    for f in ('scale', 'mean_file', 'crop_size', 'mirror'):
        assert not d.data_param.HasField(f)
    assert d.data_param.source == 'db' and d.data_param.batch_size == 3


def test_batchnorm_upgrade():
    net = prototxt.load_net_param('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } '
                                  'param { lr_mult: 1 } param { lr_mult: 1 } }')
    assert [(p.lr_mult, p.decay_mult) for p in net.layer[0].param] == [(0, 0)] * 3
    # two ParamSpecs: untouched (Caffe only rewrites exactly three)
    net = prototxt.load_net_param('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } '
                                  'param { lr_mult: 1 } }')
    assert [p.lr_mult for p in net.layer[0].param] == [1, 1]


def test_deeplab_hole_to_dilation():
    net = prototxt.load_net_param(
        'layers { name: "c" type: CONVOLUTION strict_dim: false '
        'convolution_param { num_output: 1 kernel_size: 3 pad: 2 hole: 2 } }')
    c = net.layer[0]
    assert list(c.convolution_param.dilation) == [2] and not c.convolution_param.HasField('hole')
    assert c.strict_dim is False and c.HasField('strict_dim')
    net = prototxt.load_net_param(
        'layer { name: "e" type: "Convolution" convolution_param { kernel_size: 3 hole_h: 2 '
        'hole_w: 3 } }\n'
        'layer { name: "f" type: "Convolution" convolution_param { kernel_size: 3 hole: 1 } }')
    e, f = net.layer
    assert list(e.convolution_param.dilation) == [2, 3]
    assert list(f.convolution_param.dilation) == [] and not f.convolution_param.HasField('hole')
    with pytest.raises(CrfGradError) as err:
        prototxt.load_net_param('layer { name: "g" type: "Convolution" convolution_param { '
                                'hole: 2 dilation: 2 } }')
    assert err.value.layer == 'g' and err.value.field == 'hole'


def test_deeplab_softmaxloss_ignore_label():
    net = prototxt.load_net_param('layers { name: "loss" type: SOFTMAX_LOSS bottom: "a" '
                                  'bottom: "b" softmaxloss_param { ignore_label: 255 } }')
    assert net.layer[0].type == 'SoftmaxWithLoss'
    assert net.layer[0].loss_param.ignore_label == 255


# ----------------------------------------------------------------- V0 rules

V0_PADDED = '''
name: "v0pad"
input: "data" input_dim: 1 input_dim: 1 input_dim: 5 input_dim: 5
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 3 kernelsize: 3 group: 1 biasterm: false }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.25 } bottom: "conv1" top: "conv1" }
layers { layer { name: "lrn" type: "lrn" local_size: 3 alpha: 0.5 beta: 0.25 k: 2 }
         bottom: "conv1" top: "lrn" }
layers { layer { name: "pool" type: "pool" pool: AVE kernelsize: 2 stride: 2 }
         bottom: "lrn" top: "pool" }
layers { layer { name: "d" type: "data" source: "db" batchsize: 4 cropsize: 3 mirror: true
                 scale: 0.5 meanfile: "m" } top: "x" }
'''


def test_v0_padding_layers_absorbed():
    net = prototxt.load_net_param(V0_PADDED)
    names = [l.name for l in net.layer]
    assert names == ['input', 'conv1', 'drop', 'lrn', 'pool', 'd']
    conv = net.layer[1]
    assert list(conv.bottom) == ['data']
    cp = conv.convolution_param
    assert list(cp.pad) == [2] and list(cp.kernel_size) == [3] and cp.num_output == 3
    assert cp.HasField('bias_term') and not cp.bias_term and cp.group == 1
    assert net.layer[2].dropout_param.dropout_ratio == 0.25
    lrn = net.layer[3].lrn_param
    assert (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (3, 0.5, 0.25, 2)
    pool = net.layer[4].pooling_param
    assert pool.pool == caffe_pb2.PoolingParameter.AVE and pool.kernel_size == 2
    d = net.layer[5]
    assert d.type == 'Data' and d.data_param.source == 'db' and d.data_param.batch_size == 4
    assert d.transform_param.crop_size == 3 and d.transform_param.mirror
    assert d.transform_param.scale == 0.5 and d.transform_param.mean_file == 'm'


def test_v0_unknown_type():
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param('layers { layer { name: "q" type: "quantum" } top: "x" }')
    assert e.value.layer == 'q' and e.value.field == 'type'


def test_v0_padding_into_non_conv_refused():
    text = ('input: "data" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "data" '
            'top: "p" } layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }')
    with pytest.raises(CrfGradError) as e:
        prototxt.load_net_param(text)
    assert e.value.layer == 'r'


# ------------------------------------------------------------------- solver

def test_solver_types_and_conflict(tmp_path):
    for value, name in [('SGD', 'SGD'), ('NESTEROV', 'Nesterov'), ('ADAGRAD', 'AdaGrad'),
                        ('RMSPROP', 'RMSProp'), ('ADADELTA', 'AdaDelta'), ('ADAM', 'Adam')]:
        sp = prototxt.load_solver_param('base_lr: 0.1 lr_policy: "fixed" solver_type: %s' % value)
        assert sp.type == name
    p = tmp_path / 'solver.prototxt'
    p.write_text('base_lr: 0.1\nsolver_type: ADAM\ntype: "Adam"\n')
    with pytest.raises(CrfGradError) as e:
        prototxt.load_solver_param(str(p))
    assert e.value.field == 'solver_type' and str(p) in str(e.value)


def test_current_net_untouched():
    text = 'name: "x" layer { name: "r" type: "ReLU" bottom: "a" top: "b" }'
    raw = _raw(text)
    assert not upgrade.needs_upgrade(raw)
    got, warnings = upgrade.upgrade_net_param(raw)
    assert got == raw and warnings == []
    got = prototxt.load_net_param(raw)
    assert got == raw and got is not raw
