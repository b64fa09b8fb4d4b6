"""CrfUnary, CrfGradStep, SimplexProjection; the unrolled prototxt equals the monolithic CrfGrad."""
import os

import numpy as np
import pytest
from google.protobuf import text_format

from crfgrad_cupy import backend
from crfgrad_cupy.blob import Blob
from crfgrad_cupy.core.projection import project_simplex
from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.layers.base import create_layer, layer_class
from crfgrad_cupy.proto import caffe_pb2
from gradcheck import check_layer_gradients

HERE = os.path.dirname(os.path.abspath(__file__))
UNROLLED = os.path.join(HERE, os.pardir, 'prototxt', 'crf_grad_unrolled.prototxt')


def _lp(text):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    return lp


def _positive(rng, shape):
    return rng.uniform(0.05, 1.0, shape)


# ------------------------------------------------------------------------------------ finite differences
def test_crf_unary_gradients():
    report = check_layer_gradients('type: "CrfUnary" crf_unary_param { log_eps: 0.05 weight_init: 0.3 }',
                                   [(2, 3, 4, 5)], bottom_init=_positive)
    assert set(report) == {'bottom0', 'param0'}


def test_crf_grad_step_gradients():
    report = check_layer_gradients('type: "CrfGradStep" crf_grad_step_param { step_size: 0.37 }',
                                   [(2, 3, 4, 5)] * 4)
    assert set(report) == {'bottom0', 'bottom1', 'bottom2', 'bottom3'}
    check_layer_gradients('type: "CrfGradStep"', [(1, 2, 3, 3)])


def test_simplex_projection_gradients():
    report = check_layer_gradients('type: "SimplexProjection" simplex_projection_param { leak_factor: 0.3 }',
                                   [(2, 4, 3, 5)])
    assert set(report) == {'bottom0'}


# ------------------------------------------------------------------------------------ forward values
def _run(text, arrays, n_top=1, in_place=False):
    layer = create_layer(_lp(text), caffe_pb2.TEST)
    bottoms = []
    for a in arrays:
        b = Blob(a.shape)
        b.data = a.copy()
        bottoms.append(b)
    tops = [bottoms[0]] if in_place else [Blob(()) for _ in range(n_top)]
    layer.setup(bottoms, tops)
    layer.forward(bottoms, tops)
    return layer, bottoms, tops


def test_forward_values_and_defaults():
    rng = np.random.default_rng(0)
    z = rng.uniform(0.01, 1, (2, 3, 4, 5)).astype(np.float32)
    layer, _, tops = _run('type: "CrfUnary"', [z])
    assert layer.blobs[0].shape == (1, 1, 1, 1) and layer.blobs[0].data.reshape(()) == np.float32(0.1)
    np.testing.assert_allclose(tops[0].data, -0.1 * np.log(z + 0.1), rtol=1e-6)
    a, b, c = (rng.standard_normal((2, 3, 4, 5)).astype(np.float32) for _ in range(3))
    _, _, tops = _run('type: "CrfGradStep" crf_grad_step_param { step_size: 0.5 }', [a, b, c])
    np.testing.assert_allclose(tops[0].data, a - 0.5 * (b + c), rtol=1e-6)
    _, _, tops = _run('type: "SimplexProjection"', [a])
    np.testing.assert_array_equal(tops[0].data, project_simplex(a, 0.5, axis=1)[0])
    with pytest.raises(CrfGradError):
        _run('name: "s" type: "CrfGradStep"', [a, b[:, :2]])


def test_in_place_variants():
    rng = np.random.default_rng(1)
    z = rng.uniform(0.05, 1, (1, 3, 4, 4))
    g = rng.standard_normal(z.shape)
    for text, extra in (('type: "CrfUnary"', []), ('type: "SimplexProjection"', []),
                        ('type: "CrfGradStep"', [rng.standard_normal(z.shape)])):
        ref_layer, rb, rt = _run(text, [z] + extra)
        rt[0].diff[...] = g
        ref_layer.backward(rt, [True] * len(rb), rb)
        layer, bb, tt = _run(text, [z] + extra, in_place=True)
        np.testing.assert_array_equal(tt[0].data, rt[0].data)
        tt[0].diff[...] = g
        layer.backward(tt, [True] * len(bb), bb)
        for x, y in zip(bb, rb):
            np.testing.assert_allclose(x.diff, y.diff, rtol=1e-6, err_msg=text)


# ------------------------------------------------------------------------------------ unrolled == monolithic
def _unrolled_net_param(L, k, T, shape, step, leak, eps, bilateral=True):
    net = caffe_pb2.NetParameter()
    text_format.Merge(open(UNROLLED).read(), net)
    net.force_backward = True
    keep = []
    last = max(int(lp.name[4:]) for lp in net.layer if lp.name.startswith('proj'))
    for lp in net.layer:
        if lp.name == 'prob':
            del lp.input_param.shape[0].dim[:]
            lp.input_param.shape[0].dim.extend(shape)
        elif lp.name == 'feat':
            del lp.input_param.shape[0].dim[:]
            lp.input_param.shape[0].dim.extend([shape[0], 5, shape[2], shape[3]])
        elif lp.type == 'CrfUnary':
            lp.crf_unary_param.log_eps = eps
        elif lp.type == 'Convolution':
            lp.convolution_param.num_output = L
            lp.convolution_param.kernel_size[:] = [k]
            lp.convolution_param.pad[:] = [k // 2]
        elif lp.type == 'Permutohedral':
            lp.permutohedral_param.num_output = L
            if not bilateral:
                continue
        elif lp.type == 'CrfGradStep':
            lp.crf_grad_step_param.step_size = step
            if not bilateral:
                names = [b for b in lp.bottom if not b.startswith('bilateral')]
                del lp.bottom[:]
                lp.bottom.extend(names)
        elif lp.type == 'SimplexProjection':
            lp.simplex_projection_param.leak_factor = leak
        step_no = ''.join(ch for ch in lp.name if ch.isdigit())
        if step_no and int(step_no) > T:
            continue
        if lp.type == 'SimplexProjection' and int(step_no) == T:
            lp.top[:] = ['crf']
        keep.append(lp)
    del net.layer[:]
    net.layer.extend(keep)
    assert last == 5
    return net


@pytest.mark.parametrize('bilateral', [False, True])
def test_unrolled_prototxt_equals_crfgrad(bilateral):
    if bilateral and layer_class('Permutohedral') is None:
        pytest.skip('Permutohedral layer not there yet')
    import crfgrad_cupy as cc
    L, k, T, shape = 3, 3, 5, (2, 3, 5, 6)
    step, leak, eps = 0.3, 0.4, 0.1
    with backend.dtype_scope(np.float64):
        rng = np.random.default_rng(4)
        prob = rng.uniform(0.05, 1, shape)
        prob /= prob.sum(axis=1, keepdims=True)
        feat = rng.standard_normal((shape[0], 5) + shape[2:]) * 1.5
        w = np.full((1, 1, 1, 1), 0.8)
        Ws = rng.standard_normal((L, L, k, k)) * 0.4
        taps = rng.standard_normal((L, L, 1, 63)) * 0.3 if bilateral else np.zeros((L, L, 1, 63))
        R = rng.standard_normal(shape)

        net = cc.Net(text_format.MessageToString(_unrolled_net_param(L, k, T, shape, step, leak, eps, bilateral)),
                     cc.TEST)
        net.blobs['prob'].data[...] = prob
        net.blobs['feat'].data[...] = feat
        net.params['unary'][0].data[...] = w
        net.params['spatial1'][0].data[...] = Ws
        if bilateral:
            net.params['bilateral1'][0].data[...] = taps
            assert net.params['bilateral5'][0] is net.params['bilateral1'][0]
        assert net.params['spatial5'][0] is net.params['spatial1'][0]
        net.forward()
        net.clear_param_diffs()
        net.backward(crf=R)
        taps_plain = net.params['bilateral1'][0].diff.copy() if bilateral else None
        # layer by layer too: the shared diff accumulates over the 5 Permutohedral steps
        names = net.layer_names
        net.clear_param_diffs()
        net.blobs['crf'].diff[...] = R
        for name in reversed(names):
            net.backward(start=name, end=name)
        taps_sum = net.params['bilateral1'][0].diff.copy() if bilateral else None

        lp = _lp('name: "crf" type: "CrfGrad" crfgrad_param { num_classes: %d num_iterations: %d kernel_size: %d '
                 'step_size: %g leak_factor: %g log_eps: %g }' % (L, T, k, step, leak, eps))
        layer = create_layer(lp, caffe_pb2.TEST)
        for a in (w, Ws, taps):
            b = Blob(a.shape)
            b.data = a
            layer.blobs.append(b)
        pb, fb, top = Blob(shape), Blob(feat.shape), Blob(())
        pb.data, fb.data = prob, feat
        layer.setup([pb, fb], [top])
        layer.forward([pb, fb], [top])
        top.diff[...] = R
        layer.backward([top], [True, False], [pb, fb])

        def close(a, b, what):
            err = np.abs(a - b).max()
            assert err <= 1e-6 * max(1.0, np.abs(b).max()), '%s: %g' % (what, err)

        close(net.blobs['crf'].data, top.data, 'output')
        close(net.blobs['prob'].diff, pb.diff, 'prob diff')
        close(net.params['unary'][0].diff, layer.blobs[0].diff, 'unary weight diff')
        close(net.params['spatial1'][0].diff, layer.blobs[1].diff, 'spatial diff')
        if bilateral:
            close(taps_plain, layer.blobs[2].diff, 'taps diff of the plain backward')
            close(taps_sum, layer.blobs[2].diff, 'taps diff, layer by layer')


def test_permutohedral_resets_filter_diff_unless_asked_to_accumulate():
    import crfgrad_cupy as cc
    if layer_class('Permutohedral') is None:
        pytest.skip('Permutohedral layer not there yet')
    rng = np.random.default_rng(2)
    diffs = []
    for flag in ('false', 'true'):
        net = cc.Net('''
        force_backward: true
        layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 5 } } }
        layer { name: "f" type: "Input" top: "f" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 5 } } }
        layer { name: "p" type: "Permutohedral" bottom: "x" bottom: "f" bottom: "f" top: "y"
                permutohedral_param { num_output: 2 neighborhood_size: 1 offset_type: NONE
                                      accumulate_param_diff: %s filter_filler { type: "gaussian" } } }
        ''' % flag, cc.TEST)
        net.blobs['x'].data[...] = rng.normal(size=(1, 2, 4, 5))
        net.blobs['f'].data[...] = rng.normal(size=(1, 2, 4, 5))
        net.forward()
        net.blobs['y'].diff[...] = 1.0
        net.backward()
        once = net.params['p'][0].diff.copy()
        net.backward()
        diffs.append((once, net.params['p'][0].diff.copy()))
    (reset_once, reset_twice), (acc_once, acc_twice) = diffs
    np.testing.assert_allclose(reset_twice, reset_once)           # Caffe: reset, then set
    np.testing.assert_allclose(acc_twice, 2 * acc_once, rtol=1e-5)  # extension: accumulate
    assert np.abs(acc_once).max() > 0
