"""The Net executor: filtering, splits, in-place layers, sharing, backward rules, weights I/O."""
import numpy as np
import pytest

import crfgrad_cupy as cc
from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.layers.base import Layer, register
from crfgrad_cupy.net import insert_splits
from crfgrad_cupy.proto import caffe_pb2
from google.protobuf import text_format


@register('TestTimesTwo')
class _TimesTwo(Layer):
    """y = 2x (test-only layer; supports in-place)."""
    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * top[0].diff


@register('TestSumLoss')
class _SumLoss(Layer):
    """loss = sum(x) (test-only loss layer)."""
    exact_num_bottom = 1
    exact_num_top = 1
    is_loss = True

    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data.sum()

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff

    def allow_force_backward(self, i):
        return True


IP_NET = '''
name: "t"
%s
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        param { name: "shared_w" } param { name: "shared_b" }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"
        param { name: "shared_w" } param { name: "shared_b" }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "double" type: "TestTimesTwo" bottom: "ip3" top: "ip3" }
layer { name: "a" type: "TestTimesTwo" bottom: "ip3" top: "a" }
layer { name: "b" type: "TestTimesTwo" bottom: "ip3" top: "b" }
layer { name: "loss_a" type: "TestSumLoss" bottom: "a" top: "loss_a" }
layer { name: "loss_b" type: "TestSumLoss" bottom: "b" top: "loss_b" loss_weight: 0.5 }
layer { name: "train_only" type: "TestTimesTwo" bottom: "data" top: "t" include { phase: TRAIN } }
layer { name: "not_stage_x" type: "TestTimesTwo" bottom: "data" top: "s" exclude { stage: "x" } }
'''


def make_net(extra='', phase=cc.TEST, **kw):
    return cc.Net(IP_NET % extra, phase, **kw)


def test_structure_phase_and_stage_filtering():
    net = make_net()
    assert 'train_only' not in net.layer_dict and 't' not in net.blobs
    assert 'not_stage_x' in net.layer_dict
    net_x = make_net(stages=['x'])
    assert 'not_stage_x' not in net_x.layer_dict
    assert 'train_only' in make_net(phase=cc.TRAIN).layer_dict
    assert net.inputs == ['data']
    assert set(net.outputs) == {'loss_a', 'loss_b', 's'}
    # Caffe's split naming: blob ip3 (last written in place by "double") feeds two layers
    assert 'ip3_double_0_split' in net.layer_dict
    assert net.bottom_names['a'] == ['ip3_double_0_split_0']
    assert net.bottom_names['b'] == ['ip3_double_0_split_1']
    assert list(net.params) == ['ip1', 'ip2', 'ip3']


def test_param_sharing_uses_one_blob_and_accumulates():
    net = make_net()
    assert net.params['ip2'][0] is net.params['ip3'][0]
    assert net.params['ip2'][1] is net.params['ip3'][1]
    assert len(net.learnable_params) == 4


def test_forward_backward_matches_closed_form():
    net = make_net()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    out = net.forward(data=x)
    W1, b1 = net.params['ip1'][0].data, net.params['ip1'][1].data
    W, b = net.params['ip2'][0].data, net.params['ip2'][1].data
    h1 = x @ W1.T + b1
    h2 = h1 @ W.T + b
    h3 = 2 * (h2 @ W.T + b)
    np.testing.assert_allclose(out['loss_a'], (2 * h3).sum(), rtol=1e-5)
    np.testing.assert_allclose(out['loss_b'], (2 * h3).sum(), rtol=1e-5)
    grads = net.backward()
    # d(loss_a + 0.5 loss_b)/dh3 = 2 + 0.5*2 = 3; h3 = 2(h2 W^T + b)
    g3 = np.full_like(h3, 3.0)
    g2 = (2 * g3) @ W
    g1 = g2 @ W
    gx = g1 @ W1
    np.testing.assert_allclose(grads['data'], 0 * gx, atol=0)  # Input blobs need no backward ...
    net2 = make_net('force_backward: true')
    for name in net.params:
        for i, b_ in enumerate(net.params[name]):
            net2.params[name][i].data[...] = b_.data
    net2.forward(data=x)
    grads2 = net2.backward()
    np.testing.assert_allclose(grads2['data'], gx, rtol=1e-4)  # ... unless force_backward
    # shared weight: diff = contributions of ip2 and ip3 together
    dW = (2 * g3).T @ h2 + g2.T @ h1
    np.testing.assert_allclose(net2.params['ip2'][0].diff, dW, rtol=1e-4)
    np.testing.assert_allclose(net2.params['ip1'][0].diff, g1.T @ x, rtol=1e-4)
    # the split sums both branches (2 + 0.5*2 = 3 per element); 'ip3' is then written in place by
    # "double", so after backward the blob holds the diff before the doubling: 2*3
    np.testing.assert_allclose(net2.blobs['ip3_double_0_split_0'].diff, 2.0, rtol=1e-6)
    np.testing.assert_allclose(net2.blobs['ip3'].diff, 2 * g3, rtol=1e-5)


def test_backward_rule_skips_lr_mult_zero_branch():
    proto = '''
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
    layer { name: "fixed" type: "InnerProduct" bottom: "data" top: "f" param { lr_mult: 0 }
            inner_product_param { num_output: 2 bias_term: false } }
    layer { name: "loss" type: "TestSumLoss" bottom: "f" top: "loss" }
    layer { name: "dangling" type: "InnerProduct" bottom: "data" top: "d"
            inner_product_param { num_output: 2 bias_term: false } }
    '''
    net = cc.Net(proto, cc.TEST)
    assert not net.layer_need_backward('fixed')        # lr_mult 0 and no bottom needs it
    assert not net.layer_need_backward('dangling')     # does not reach a loss
    assert not net.layer_need_backward('loss')


def test_reshape_on_new_input_shape():
    net = make_net()
    out = net.forward(data=np.ones((5, 3), np.float32))
    assert net.blobs['ip1'].shape == (5, 4)
    assert np.isfinite(out['loss_a'])


def test_save_and_copy_from_roundtrip(tmp_path):
    net = make_net()
    net.save(str(tmp_path / 'w.caffemodel'))
    net.save_hdf5(str(tmp_path / 'w.caffemodel.h5'))
    for f in ('w.caffemodel', 'w.caffemodel.h5'):
        other = make_net()
        unmatched = other.copy_from(str(tmp_path / f))
        assert unmatched == []
        for name in net.params:
            for a, b in zip(net.params[name], other.params[name]):
                np.testing.assert_array_equal(a.data, b.data)
    # saved file holds every layer of the instantiated net, Split included
    from crfgrad_cupy.io.caffemodel import load_caffemodel
    saved = load_caffemodel(str(tmp_path / 'w.caffemodel'))
    assert [l.name for l in saved.layer] == net.layer_names


def test_copy_from_shape_mismatch_names_layer_and_shapes(tmp_path):
    net = make_net()
    path = str(tmp_path / 'w.caffemodel')
    net.save(path)
    proto = IP_NET.replace('dim: 2 dim: 3', 'dim: 2 dim: 6', 1) % ''
    other = cc.Net(proto, cc.TEST)
    with pytest.raises(CrfGradError) as err:
        other.copy_from(path)
    msg = str(err.value)
    assert 'ip1' in msg and '(4, 3)' in msg and '(4, 6)' in msg, msg


def test_unknown_bottom_and_unknown_type_are_clear_errors():
    with pytest.raises(CrfGradError) as err:
        cc.Net('layer { name: "x" type: "TestTimesTwo" bottom: "nope" top: "y" }', cc.TEST)
    assert "'x'" in str(err.value) and 'bottom' in str(err.value)
    with pytest.raises(CrfGradError) as err:
        cc.Net('layer { name: "x" type: "NoSuchLayer" top: "y" }', cc.TEST)
    assert 'NoSuchLayer' in str(err.value) and "'x'" in str(err.value)


def test_insert_splits_keeps_single_consumers_untouched():
    p = caffe_pb2.NetParameter()
    text_format.Merge('layer { name: "a" type: "Input" top: "x" } '
                      'layer { name: "b" type: "TestTimesTwo" bottom: "x" top: "y" }', p)
    assert insert_splits(p) == p


def test_float64_mode_builds_float64_blobs():
    with cc.backend.dtype_scope(np.float64):
        net = make_net()
        assert net.blobs['ip1'].data.dtype == np.float64
        assert net.params['ip1'][0].data.dtype == np.float64


def test_gpu_mode_without_cupy_is_a_clear_error():
    if cc.backend.cupy_available():
        pytest.skip('a GPU is present')
    with pytest.raises(CrfGradError) as err:
        cc.set_mode_gpu()
    assert 'CuPy' in str(err.value) or 'CUDA' in str(err.value) or 'cupy' in str(err.value)


@register('TestAutoSumLoss')
class _AutoSumLoss(_SumLoss):
    auto_top_blobs = True


def test_auto_top_blobs_give_a_loss_layer_an_anonymous_output():
    proto = '''
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "loss" type: "TestAutoSumLoss" bottom: "data" }
    '''
    net = cc.Net(proto, cc.TEST)
    assert net.outputs == ['(automatic)']
    out = net.forward(data=np.ones((2, 3), np.float32))
    assert float(out['(automatic)']) == 6.0
    assert net.forward_loss() == 6.0
