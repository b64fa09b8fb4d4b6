"""MatConvNet -> Caffe: Octave fixtures layer by layer, real DnCNN / LapSRN models, synthetic
SimpleNN/DagNN nets (every supported layer, asymmetric pads, dilation, groups) against a
plain-loop implementation of MatConvNet's documented semantics, and bad input."""
import os

import numpy as np
import pytest

from oracle_util import DATA, assert_close

from crfgrad_cupy.convert.matconvnet import (convert_matconvnet, matconvnet_to_caffe,
                                             mcn_to_caffe_data, read_matconvnet)
from crfgrad_cupy.convert.matfile import StructArray, load_mat, save_mat
from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.net import TEST, Net

FIXTURES = os.path.join(DATA, 'matconvnet')
MODELS = os.path.join(DATA, 'matconvnet_models')


def _need(path):
    if not os.path.exists(path):
        pytest.skip('%s is not present' % path)
    return path


def _load_converted(conv, tmp_path, name='net'):
    proto, model = conv.save(str(tmp_path / name))
    return Net(proto, model, TEST)


# ============================================================================ fixtures

@pytest.mark.parametrize('fixture', ['01_simplenn_basic', '04_dagnn_branches', '06_dagnn_crf_unary'])
def test_octave_fixture_every_layer(fixture, tmp_path):
    folder = _need(os.path.join(FIXTURES, fixture))
    conv = convert_matconvnet(os.path.join(folder, 'net.mat'), str(tmp_path / 'net'))
    net = Net(str(tmp_path / 'net.prototxt'), str(tmp_path / 'net.caffemodel'), TEST)
    x = load_mat(os.path.join(folder, 'input.mat'))['x']
    expected = load_mat(os.path.join(folder, 'expected.mat'))
    out = net.forward(**{conv.inputs[0]: mcn_to_caffe_data(x)})
    if conv.kind == 'simplenn':
        names = expected['layer_names']
        assert list(conv.layer_outputs) == names
        checks = [(name, conv.layer_outputs[name], expected['layer_%d' % (i + 1)])
                  for i, name in enumerate(names)]
    else:
        assert conv.inputs[0] == expected['input_name']
        assert conv.outputs[-1] == expected['output_name']
        checks = [(v, conv.blob_of_var[v], expected[v]) for v in expected['var_names']
                  if v != expected['input_name']]
    assert len(checks) >= 6
    for what, blob, ref in checks:
        assert_close(net.blobs[blob].data, mcn_to_caffe_data(ref), rtol=1e-4, atol=1e-6, what=what)
    assert_close(out[conv.outputs[-1]], mcn_to_caffe_data(expected['y']), rtol=1e-4, atol=1e-6,
                 what='y')


def test_fixture_01_uses_floor_sizes_and_inside_pixel_average(tmp_path):
    """The converted graph must reproduce what Caffe alone gets wrong: floor output sizes
    and average pooling over in-image pixels only."""
    folder = _need(os.path.join(FIXTURES, '01_simplenn_basic'))
    conv = matconvnet_to_caffe(os.path.join(folder, 'net.mat'))
    types = [lp.type for lp in conv.net_param.layer]
    assert types.count('Crop') == 2            # pool1 (ceil 10 -> 9) and pool2
    assert 'Eltwise' in types                  # the avg-pool divisor correction
    assert types[-1] == 'Softmax'
    # conv2's pad [0 1 0 1] became a symmetric pad 1 with a zero-extended 4x4 filter
    w = conv.weights['conv2'][0]
    assert w.shape == (10, 8, 4, 4)
    assert np.all(w[:, :, 0, :] == 0) and np.all(w[:, :, :, 0] == 0)


# ============================================================================ real models

def _psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


def _set12_noisy():
    from PIL import Image
    path = _need(os.path.join(MODELS, 'dncnn', 'images', '01.png'))
    clean = np.asarray(Image.open(path), dtype=np.float32) / 255
    noise = np.random.default_rng(0).normal(0, 25 / 255, clean.shape).astype(np.float32)
    return clean, (clean + noise).astype(np.float32)


def test_dncnn_simplenn_v73_denoises_set12(tmp_path):
    model = _need(os.path.join(MODELS, 'dncnn', 'sigma=25.mat'))
    clean, noisy = _set12_noisy()
    conv = matconvnet_to_caffe(model)
    assert conv.kind == 'simplenn' and len(conv.layer_outputs) == 33
    net = _load_converted(conv, tmp_path)
    residual = net.forward(**{conv.inputs[0]: noisy[None, None]})[conv.outputs[-1]][0, 0]
    denoised = noisy - residual
    assert _psnr(noisy, clean) < 20.5
    assert _psnr(denoised, clean) >= 30.0          # reference 30.09 dB


def test_dncnn_dagnn_v73_batchnorm_converts_and_denoises(tmp_path):
    model = _need(os.path.join(MODELS, 'dncnn', 'DnCNN-epoch-50.mat'))
    clean, noisy = _set12_noisy()
    conv = matconvnet_to_caffe(model)
    assert conv.kind == 'dagnn'
    assert conv.dropped == ['loss'] and conv.inputs == ['input'] and conv.outputs == ['prediction']
    types = [lp.type for lp in conv.net_param.layer]
    assert types.count('BatchNorm') == 15 and types.count('Scale') == 15
    net = _load_converted(conv, tmp_path)
    # this checkpoint's Sum adds the input back: the output is the denoised image
    out = net.forward(input=noisy[None, None])['prediction'][0, 0]
    assert _psnr(out, clean) >= 30.0


def test_dncnn_dagnn_batchnorm_matches_matconvnet_formula(tmp_path):
    """One bnorm of the real model: Caffe BatchNorm+Scale == G (x - mu) / sigma + B."""
    model = read_matconvnet(_need(os.path.join(MODELS, 'dncnn', 'DnCNN-epoch-50.mat')))
    conv = matconvnet_to_caffe(model, input_shape=(1, 1, 9, 7))
    net = _load_converted(conv, tmp_path)
    x = np.random.default_rng(1).uniform(0, 1, (2, 1, 9, 7)).astype(np.float32)
    net.forward(input=x)
    bn = next(L for L in model.layers if L.name == 'bnorm4')
    G, B, M = (np.asarray(p, np.float64) for p in bn.params)
    xin = net.blobs['conv3'].data.astype(np.float64)
    ref = G.reshape(1, -1, 1, 1) * (xin - M[:, 0].reshape(1, -1, 1, 1)) / M[:, 1].reshape(1, -1, 1, 1) \
        + B.reshape(1, -1, 1, 1)
    assert_close(net.blobs['bnorm4'].data, ref, rtol=1e-5, atol=1e-6, what='bnorm4')


def test_lapsrn_v7_dagnn_beats_bicubic(tmp_path):
    from PIL import Image
    model = _need(os.path.join(MODELS, 'lapsrn', 'LapSRN_x2.mat'))
    rgb = np.asarray(Image.open(_need(os.path.join(MODELS, 'lapsrn', 'emma.jpg'))).convert('RGB'),
                     dtype=np.float64) / 255
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    rgb = rgb[:h, :w]
    y = (16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255

    def resize(a, hh, ww):
        return np.asarray(Image.fromarray(a.astype(np.float32), 'F').resize((ww, hh), Image.BICUBIC))

    low = resize(y, h // 2, w // 2)
    bicubic = resize(low, h, w)
    conv = matconvnet_to_caffe(model)
    assert conv.inputs == ['LR'] and conv.outputs == ['level1_output']
    assert conv.dropped == ['level1_L1_loss']
    net = _load_converted(conv, tmp_path)
    sr = net.forward(LR=low[None, None])['level1_output'][0, 0]
    assert sr.shape == (h, w)

    def psnr(a):
        return _psnr(np.clip(a, 0, 1)[2:-2, 2:-2], y[2:-2, 2:-2])
    assert psnr(sr) > psnr(bicubic) + 1.0, (psnr(sr), psnr(bicubic))


# ============================================================================ MatConvNet reference

def _mcn_conv(x, F, b, pad, stride, dilate):
    """vl_nnconv on NCHW data; F is MatConvNet's FH x FW x FC x K."""
    F = F.reshape(F.shape + (1,) * (4 - F.ndim)).astype(np.float64)
    FH, FW, FC, K = F.shape
    N, C, H, W = x.shape
    g = C // FC
    T, B, L, R = pad
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (T, B), (L, R)))
    eh, ew = (FH - 1) * dilate[0] + 1, (FW - 1) * dilate[1] + 1
    Ho = (H + T + B - eh) // stride[0] + 1
    Wo = (W + L + R - ew) // stride[1] + 1
    y = np.zeros((N, K, Ho, Wo))
    kpg = K // g
    for k in range(K):
        gi = k // kpg
        for ky in range(FH):
            for kx in range(FW):
                oy, ox = ky * dilate[0], kx * dilate[1]
                patch = xp[:, gi * FC:(gi + 1) * FC, oy:oy + (Ho - 1) * stride[0] + 1:stride[0],
                           ox:ox + (Wo - 1) * stride[1] + 1:stride[1]]
                y[:, k] += np.einsum('nchw,c->nhw', patch, F[ky, kx, :, k])
        if b is not None:
            y[:, k] += np.asarray(b).ravel()[k]
    return y


def _mcn_pool(x, size, pad, stride, method):
    N, C, H, W = x.shape
    T, B, L, R = pad
    Ho = (H + T + B - size[0]) // stride[0] + 1
    Wo = (W + L + R - size[1]) // stride[1] + 1
    y = np.zeros((N, C, Ho, Wo))
    for i in range(Ho):
        y0, y1 = max(0, i * stride[0] - T), min(H, i * stride[0] - T + size[0])
        for j in range(Wo):
            x0, x1 = max(0, j * stride[1] - L), min(W, j * stride[1] - L + size[1])
            win = x[:, :, y0:y1, x0:x1].astype(np.float64)
            y[:, :, i, j] = win.max(axis=(2, 3)) if method == 'max' else win.mean(axis=(2, 3))
    return y


def _mcn_convt(x, F, b, upsample, crop, groups):
    F = F.reshape(F.shape + (1,) * (4 - F.ndim)).astype(np.float64)
    FH, FW, K, FD = F.shape
    N, C, H, W = x.shape
    full = np.zeros((N, K * groups, (H - 1) * upsample[0] + FH, (W - 1) * upsample[1] + FW))
    cpg = FD // groups
    for gi in range(groups):
        for ky in range(FH):
            for kx in range(FW):
                contrib = np.einsum('nchw,ck->nkhw', x[:, gi * cpg:(gi + 1) * cpg].astype(np.float64),
                                    F[ky, kx, :, gi * cpg:(gi + 1) * cpg].T)
                full[:, gi * K:(gi + 1) * K, ky:ky + (H - 1) * upsample[0] + 1:upsample[0],
                     kx:kx + (W - 1) * upsample[1] + 1:upsample[1]] += contrib
    T, B, L, R = crop
    y = full[:, :, T:full.shape[2] - B, L:full.shape[3] - R]
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return y


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _lrn(x, param):
    n, kappa, alpha, beta = param
    n = int(n)
    C = x.shape[1]
    sq = x.astype(np.float64) ** 2
    acc = np.zeros_like(sq)
    for c in range(C):
        lo, hi = max(0, c - (n - 1) // 2), min(C, c + n // 2 + 1)
        acc[:, c] = sq[:, lo:hi].sum(axis=1)
    return x * (kappa + alpha * acc) ** (-beta)


def _rng():
    return np.random.default_rng(7)


def _simplenn_layers():
    r = _rng()
    f = lambda *s: r.standard_normal(s).astype(np.float32) * 0.3   # noqa: E731
    layers = [
        {'type': 'conv', 'name': 'c1', 'weights': [f(3, 2, 2, 6), f(1, 6)],
         'pad': np.array([[0., 2, 1, 0]]), 'stride': np.array([[2., 1]]), 'dilate': 1.0},
        {'type': 'relu', 'name': 'r1', 'leak': 0.1},
        {'type': 'pool', 'name': 'p1', 'method': 'max', 'pool': np.array([[3., 2]]),
         'stride': np.array([[1., 2]]), 'pad': np.array([[0., 2, 1, 0]])},
        # dilation 2 with an odd pad difference: the crop fallback
        {'type': 'conv', 'name': 'c2', 'weights': [f(3, 3, 6, 4), f(4, 1)],
         'pad': np.array([[1., 2, 2, 1]]), 'stride': 1.0, 'dilate': np.array([[2., 2]])},
        {'type': 'bnorm', 'name': 'bn', 'weights': [f(4, 1) + 1, f(4, 1),
                                                    np.stack([f(4), np.abs(f(4)) + 0.5], 1)],
         'epsilon': 1e-4},
        {'type': 'pool', 'name': 'p2', 'method': 'avg', 'pool': 3.0, 'stride': 2.0,
         'pad': np.array([[1., 1, 0, 2]])},
        # old-style filters/biases fields
        {'type': 'convt', 'name': 'up', 'filters': f(4, 3, 5, 4), 'biases': f(1, 5),
         'upsample': np.array([[2., 3]]), 'crop': np.array([[0., 1, 2, 0]]), 'numGroups': 1.0},
        {'type': 'normalize', 'name': 'lrn', 'param': np.array([[3., 2, 0.1, 0.75]])},
        {'type': 'dropout', 'name': 'drop', 'rate': 0.3},
        {'type': 'pool', 'name': 'p3', 'method': 'max', 'pool': np.array([[2., 2]]),
         'stride': np.array([[1., 1]]), 'pad': np.array([[1., 0, 0, 1]])},
        {'type': 'softmax', 'name': 'prob'},
        {'type': 'softmaxloss', 'name': 'loss'},
    ]
    return layers


def _simplenn_reference(layers, x):
    y = x.astype(np.float64)
    outs = []
    for l in layers:
        t = l['type']
        if t == 'conv':
            w = l['weights']
            pad = np.asarray(l['pad']).ravel()
            pad = [int(v) for v in (pad.tolist() * 4 if pad.size == 1 else pad)]
            st = np.asarray(l['stride']).ravel()
            st = [int(v) for v in (st.tolist() * 2 if st.size == 1 else st)]
            dl = np.asarray(l['dilate']).ravel()
            dl = [int(v) for v in (dl.tolist() * 2 if dl.size == 1 else dl)]
            y = _mcn_conv(y, w[0], w[1], pad, st, dl)
        elif t == 'relu':
            y = np.where(y > 0, y, y * l['leak'])
        elif t == 'pool':
            sz = np.asarray(l['pool']).ravel()
            sz = [int(v) for v in (sz.tolist() * 2 if sz.size == 1 else sz)]
            st = np.asarray(l['stride']).ravel()
            st = [int(v) for v in (st.tolist() * 2 if st.size == 1 else st)]
            pad = [int(v) for v in np.asarray(l['pad']).ravel()]
            y = _mcn_pool(y, sz, pad, st, l['method'])
        elif t == 'bnorm':
            G, B, M = (np.asarray(p, np.float64) for p in l['weights'])
            y = G.reshape(1, -1, 1, 1) * (y - M[:, 0].reshape(1, -1, 1, 1)) / \
                M[:, 1].reshape(1, -1, 1, 1) + B.reshape(1, -1, 1, 1)
        elif t == 'convt':
            up = [int(v) for v in np.asarray(l['upsample']).ravel()]
            crop = [int(v) for v in np.asarray(l['crop']).ravel()]
            y = _mcn_convt(y, l['filters'], l['biases'], up, crop, 1)
        elif t == 'normalize':
            y = _lrn(y, np.asarray(l['param']).ravel())
        elif t == 'softmax':
            y = _softmax(y)
        elif t in ('dropout', 'softmaxloss'):
            pass
        outs.append(y)
    return outs


@pytest.mark.parametrize('version', ['5', '7.3'])
@pytest.mark.parametrize('toplevel', [False, True])
def test_synthetic_simplenn_all_layers(version, toplevel, tmp_path):
    layers = _simplenn_layers()
    path = str(tmp_path / 'simple.mat')
    net_struct = {'layers': layers, 'meta': {'inputSize': np.array([[13., 11, 2]])}}
    save_mat(path, net_struct if toplevel else {'net': net_struct}, version=version)
    conv = matconvnet_to_caffe(path)
    assert conv.dropped == ['loss']
    assert conv.net_param.layer[0].input_param.shape[0].dim == [1, 2, 13, 11]
    net = _load_converted(conv, tmp_path)
    x = _rng().standard_normal((2, 2, 13, 11)).astype(np.float32)
    net.forward(data=x)
    refs = _simplenn_reference(layers, x)
    for l, ref in zip(layers[:-1], refs):
        assert_close(net.blobs[conv.layer_outputs[l['name']]].data, ref, rtol=1e-4, atol=1e-6,
                     what=l['name'])


@pytest.mark.parametrize('hw', [(13, 11), (16, 9), (10, 14)])
def test_synthetic_simplenn_other_input_sizes(hw, tmp_path):
    """The converted net matches MatConvNet for input sizes other than the prototxt's."""
    layers = _simplenn_layers()
    path = str(tmp_path / 'simple.mat')
    save_mat(path, {'layers': layers}, version='5')
    conv = matconvnet_to_caffe(path, input_shape=(1, 2, 13, 11))
    net = _load_converted(conv, tmp_path)
    x = _rng().standard_normal((1, 2) + hw).astype(np.float32)
    out = net.forward(data=x)[conv.outputs[-1]]
    ref = _simplenn_reference(layers, x)[-2]
    assert_close(out, ref, rtol=1e-4, atol=1e-6, what='prob %s' % (hw,))


def _dagnn_struct():
    r = _rng()
    f = lambda *s: r.standard_normal(s).astype(np.float32) * 0.3   # noqa: E731
    values = {
        'g_f': f(3, 3, 2, 6), 'g_b': f(6, 1),          # 4 input channels, filter depth 2: 2 groups
        't_f': f(2, 3, 2, 6), 't_b': f(1, 4),          # convt 6 -> 2 x 2 groups
        's_f': f(1, 1, 10), 's_b': f(1, 1, 10),
        'e_f': f(1, 1, 4, 6),                          # no bias
    }
    params = StructArray([{'name': k, 'value': v, 'learningRate': 1.0, 'weightDecay': 1.0}
                          for k, v in values.items()])

    def layer(name, type, ins, outs, ps, block):
        return {'name': name, 'type': type, 'inputs': ins, 'outputs': outs, 'params': ps,
                'block': block}
    layers = StructArray([
        # stored out of execution order on purpose
        layer('cat', 'dagnn.Concat', ['sg', 'cr'], ['cat'], [], {'dim': 3.0}),
        layer('grp', 'dagnn.Conv', ['in'], ['g'], ['g_f', 'g_b'],
              {'size': np.array([[3., 3, 2, 6]]), 'hasBias': True, 'pad': np.array([[1., 1]]),
               'stride': 1.0, 'dilate': 1.0}),
        layer('sig', 'dagnn.Sigmoid', ['g'], ['sg'], [], {}),
        layer('edge', 'dagnn.Conv', ['in'], ['e'], ['e_f'],
              {'size': np.array([[1., 1, 4, 6]]), 'hasBias': False, 'pad': 0.0, 'stride': 1.0}),
        layer('sum', 'dagnn.Sum', ['g', 'e'], ['s'], [], {}),
        layer('up', 'dagnn.ConvTranspose', ['s'], ['t'], ['t_f', 't_b'],
              {'size': np.array([[2., 3, 2, 6]]), 'hasBias': True, 'upsample': np.array([[2., 2]]),
               'crop': np.array([[1., 0, 0, 2]]), 'numGroups': 2.0}),
        layer('crop', 'dagnn.Crop', ['t', 'sg'], ['cr'], [], {'crop': np.array([[1., 2]])}),
        layer('scale', 'dagnn.Scale', ['cat'], ['sc'], ['s_f', 's_b'],
              {'size': np.array([[1., 1, 10]]), 'hasBias': True}),
        layer('lrn', 'dagnn.LRN', ['sc'], ['n'], [], {'param': np.array([[5., 1, 0.2, 0.5]])}),
        layer('drop', 'dagnn.DropOut', ['n'], ['d'], [], {'rate': 0.5}),
        layer('pool', 'dagnn.Pooling', ['d'], ['p'], [],
              {'method': 'avg', 'poolSize': np.array([[2., 3]]), 'pad': np.array([[1., 0, 2, 1]]),
               'stride': np.array([[2., 2]])}),
        layer('relu', 'dagnn.ReLU', ['p'], ['out'], [], {'leak': 0.0}),
        layer('objective', 'dagnn.MyCustomLoss', ['out', 'label'], ['objective'], [], {}),
    ])
    names = ['in', 'g', 'sg', 'e', 's', 't', 'cr', 'cat', 'sc', 'n', 'd', 'p', 'out', 'label', 'objective']
    vars_ = StructArray([{'name': n, 'precious': False} for n in names])
    return {'vars': vars_, 'params': params, 'layers': layers,
            'meta': {'inputs': StructArray([{'name': 'in', 'size': np.array([[9., 8, 4, 1]])}])}}, values


def _dagnn_reference(values, x):
    v = {'in': x.astype(np.float64)}
    v['g'] = _mcn_conv(v['in'], values['g_f'], values['g_b'], [1, 1, 1, 1], [1, 1], [1, 1])
    v['sg'] = 1 / (1 + np.exp(-v['g']))
    v['e'] = _mcn_conv(v['in'], values['e_f'], None, [0, 0, 0, 0], [1, 1], [1, 1])
    v['s'] = v['g'] + v['e']
    v['t'] = _mcn_convt(v['s'], values['t_f'], values['t_b'], [2, 2], [1, 0, 0, 2], 2)
    hh, ww = v['sg'].shape[2:]
    v['cr'] = v['t'][:, :, 1:1 + hh, 2:2 + ww]
    v['cat'] = np.concatenate([v['sg'], v['cr']], axis=1)
    v['sc'] = v['cat'] * values['s_f'].reshape(1, -1, 1, 1) + values['s_b'].reshape(1, -1, 1, 1)
    v['n'] = _lrn(v['sc'], [5, 1, 0.2, 0.5])
    v['d'] = v['n']
    v['p'] = _mcn_pool(v['d'], [2, 3], [1, 0, 2, 1], [2, 2], 'avg')
    v['out'] = np.maximum(v['p'], 0)
    return v


@pytest.mark.parametrize('version', ['7', '7.3'])
def test_synthetic_dagnn_all_layers(version, tmp_path):
    struct, values = _dagnn_struct()
    path = str(tmp_path / 'dag.mat')
    save_mat(path, {'net': struct}, version=version)
    conv = matconvnet_to_caffe(path)
    assert conv.inputs == ['in'] and conv.outputs == ['out'] and conv.dropped == ['objective']
    grp = next(lp for lp in conv.net_param.layer if lp.name == 'grp')
    assert grp.convolution_param.group == 2
    net = _load_converted(conv, tmp_path)
    x = _rng().standard_normal((2, 4, 9, 8)).astype(np.float32)
    net.forward(**{'in': x})
    ref = _dagnn_reference(values, x)
    for name in ['g', 'sg', 'e', 's', 't', 'cr', 'cat', 'sc', 'n', 'd', 'p', 'out']:
        assert_close(net.blobs[conv.blob_of_var[name]].data, ref[name], rtol=1e-4, atol=1e-6, what=name)


# ============================================================================ bad input

def test_not_a_mat_file(tmp_path):
    bad = tmp_path / 'x.mat'
    bad.write_bytes(b'this is not a MAT file at all' * 10)
    with pytest.raises(CrfGradError, match='not a MATLAB .mat file') as exc:
        convert_matconvnet(str(bad), str(tmp_path / 'out'))
    assert exc.value.file == str(bad)


def test_unknown_layer_type_names_the_layer(tmp_path):
    layers = _simplenn_layers()[:2] + [{'type': 'spnorm', 'name': 'weird', 'param': np.ones((1, 4))}]
    path = str(tmp_path / 'bad.mat')
    save_mat(path, {'layers': layers}, version='5')
    with pytest.raises(CrfGradError, match="'spnorm'") as exc:
        matconvnet_to_caffe(path)
    assert exc.value.layer == 'weird' and exc.value.field == 'type'


def test_dagnn_filters_stored_flat_are_shaped_by_block_size(tmp_path):
    """A filter parameter saved as a flat vector gets its shape from the block's ``size`` (MATLAB's
    column-major order), for Conv and ConvTranspose blocks alike."""
    struct, values = _dagnn_struct()
    for p in struct['params']:
        if p['name'] in ('g_f', 't_f'):
            p['value'] = np.asarray(p['value']).ravel(order='F')
    path = str(tmp_path / 'flat.mat')
    save_mat(path, {'net': struct}, version='7')
    conv = matconvnet_to_caffe(path)
    net = _load_converted(conv, tmp_path)
    x = _rng().standard_normal((1, 4, 9, 8)).astype(np.float32)
    net.forward(**{'in': x})
    ref = _dagnn_reference(values, x)
    for name in ('g', 't', 'out'):
        assert_close(net.blobs[conv.blob_of_var[name]].data, ref[name], rtol=1e-4, atol=1e-6, what=name)


def test_unknown_dagnn_type_names_the_layer(tmp_path):
    struct, _ = _dagnn_struct()
    struct['layers'][2]['type'] = 'dagnn.BilinearSampler'
    path = str(tmp_path / 'bad.mat')
    save_mat(path, {'net': struct}, version='7.3')
    with pytest.raises(CrfGradError, match='BilinearSampler') as exc:
        matconvnet_to_caffe(path)
    assert exc.value.layer == 'sig'


def test_missing_params_names_the_layer(tmp_path):
    struct, _ = _dagnn_struct()
    struct['params'] = StructArray([p for p in struct['params'] if p['name'] != 't_b'])
    path = str(tmp_path / 'bad.mat')
    save_mat(path, {'net': struct}, version='5')
    with pytest.raises(CrfGradError, match="'t_b'") as exc:
        matconvnet_to_caffe(path)
    assert exc.value.layer == 'up' and exc.value.field == 'params'


def test_simplenn_conv_without_weights_names_the_layer(tmp_path):
    path = str(tmp_path / 'bad.mat')
    save_mat(path, {'layers': [{'type': 'conv', 'name': 'conv_x', 'pad': 0.0}]}, version='5')
    with pytest.raises(CrfGradError, match='no weights') as exc:
        matconvnet_to_caffe(path)
    assert exc.value.layer == 'conv_x'


def test_bnorm_without_moments_names_the_layer(tmp_path):
    layers = _simplenn_layers()
    layers[4]['weights'] = layers[4]['weights'][:2]
    path = str(tmp_path / 'bad.mat')
    save_mat(path, {'layers': layers}, version='5')
    with pytest.raises(CrfGradError, match='moments') as exc:
        matconvnet_to_caffe(path)
    assert exc.value.layer == 'bn'


def test_pool_pad_not_smaller_than_window_is_refused(tmp_path):
    layers = [{'type': 'pool', 'name': 'bigpad', 'method': 'max', 'pool': 2.0, 'stride': 1.0,
               'pad': np.array([[0., 2, 0, 0]])}]
    path = str(tmp_path / 'bad.mat')
    save_mat(path, {'layers': layers, 'meta': {'inputSize': np.array([[8., 8, 3]])}}, version='5')
    with pytest.raises(CrfGradError, match='smaller than the pool size') as exc:
        matconvnet_to_caffe(path)
    assert exc.value.layer == 'bigpad'


def test_file_without_network(tmp_path):
    path = str(tmp_path / 'nonet.mat')
    save_mat(path, {'x': np.ones((2, 2))}, version='5')
    with pytest.raises(CrfGradError, match='no MatConvNet network'):
        matconvnet_to_caffe(path)


def _pool_configs():
    out = []
    for k in (1, 2, 3, 4):
        for s in (1, 2, 3):
            for t in range(k):
                for b in range(k):
                    out.append((k, s, t, b))
    return out


@pytest.mark.parametrize('method', ['max', 'avg'])
def test_pool_equivalence_over_many_geometries(method, tmp_path):
    """Every pool size <= 4, stride <= 3 and pad pair (T, B) < size on one axis (the other
    axis takes a second geometry), at three input sizes each."""
    configs = _pool_configs()
    r = np.random.default_rng(3)
    order = r.permutation(len(configs))
    for n, i in enumerate(order):
        kh, sh, T, B = configs[i]
        kw, sw, L, R = configs[order[(n + 1) % len(order)]]
        layers = [{'type': 'pool', 'name': 'p', 'method': method, 'pool': np.array([[kh, kw]], float),
                   'stride': np.array([[sh, sw]], float), 'pad': np.array([[T, B, L, R]], float)}]
        path = str(tmp_path / ('p%d.mat' % n))
        save_mat(path, {'layers': layers}, version='5')
        conv = matconvnet_to_caffe(path, input_shape=(1, 2, 7, 6))
        net = _load_converted(conv, tmp_path, 'p%d' % n)
        for hw in ((7, 6), (8, 9), (5, 5)):
            x = r.standard_normal((1, 2) + hw).astype(np.float32) - 1.0   # mostly negative
            out = net.forward(data=x)['p']
            ref = _mcn_pool(x, [kh, kw], [T, B, L, R], [sh, sw], method)
            assert_close(out, ref, rtol=1e-5, atol=1e-6,
                         what='%s k=%s s=%s pad=%s size=%s' % (method, (kh, kw), (sh, sw), (T, B, L, R), hw))


def test_conv_equivalence_over_asymmetric_pads_strides_dilations(tmp_path):
    r = np.random.default_rng(4)
    cases = [((0, 1, 2, 0), (1, 2), (1, 1)), ((2, 0, 0, 3), (2, 1), (1, 2)), ((1, 2, 3, 0), (2, 3), (2, 2)),
             ((0, 3, 1, 1), (3, 2), (3, 1)), ((2, 1, 0, 1), (1, 1), (2, 3))]
    for n, (pad, stride, dil) in enumerate(cases):
        F = r.standard_normal((3, 2, 4, 5)).astype(np.float32)
        b = r.standard_normal((1, 5)).astype(np.float32)
        layers = [{'type': 'conv', 'name': 'c', 'weights': [F, b], 'pad': np.array([pad], float),
                   'stride': np.array([stride], float), 'dilate': np.array([dil], float)}]
        path = str(tmp_path / ('c%d.mat' % n))
        save_mat(path, {'layers': layers}, version='7.3')
        conv = matconvnet_to_caffe(path, input_shape=(1, 4, 11, 12))
        net = _load_converted(conv, tmp_path, 'c%d' % n)
        for hw in ((11, 12), (13, 10)):
            x = r.standard_normal((2, 4) + hw).astype(np.float32)
            out = net.forward(data=x)['c']
            ref = _mcn_conv(x, F, b, pad, stride, dil)
            assert_close(out, ref, rtol=1e-5, atol=1e-5, what='pad %s stride %s dilate %s' % (pad, stride, dil))


def test_helper_layers_never_take_the_models_names(tmp_path):
    """Layers named like the converter's helpers (and 'input') keep their names."""
    r = np.random.default_rng(9)
    layers = [
        {'type': 'conv', 'name': 'input', 'weights': [r.standard_normal((3, 3, 2, 3)).astype(np.float32),
                                                       np.zeros((1, 3), np.float32)], 'pad': 1.0},
        {'type': 'pool', 'name': 'p', 'method': 'avg', 'pool': 3.0, 'stride': 2.0, 'pad': 1.0},
        {'type': 'relu', 'name': 'p__crop'},
        {'type': 'relu', 'name': 'p__size_ref'},
    ]
    path = str(tmp_path / 'names.mat')
    save_mat(path, {'layers': layers}, version='5')
    conv = matconvnet_to_caffe(path, input_shape=(1, 2, 9, 8))
    names = [lp.name for lp in conv.net_param.layer]
    assert len(set(names)) == len(names)
    for want in ('input', 'p', 'p__crop', 'p__size_ref'):
        assert want in names
    by_name = {lp.name: lp for lp in conv.net_param.layer}
    assert by_name['input'].type == 'Convolution' and by_name['p__crop'].type == 'ReLU'
    net = _load_converted(conv, tmp_path)
    x = r.standard_normal((1, 2, 9, 8)).astype(np.float32)
    out = net.forward(data=x)[conv.outputs[-1]]
    ref = np.maximum(_mcn_pool(_mcn_conv(x, layers[0]['weights'][0], layers[0]['weights'][1],
                                         [1] * 4, [1, 1], [1, 1]), [3, 3], [1] * 4, [2, 2], 'avg'), 0)
    assert_close(out, ref, rtol=1e-5, atol=1e-6, what='out')
