"""The CrfGrad layer: oracle cases (Caffe fork), quirk switch, default init, diff rules, finite differences."""
import numpy as np
import pytest
from google.protobuf import text_format

import oracle_util as ou
from crfgrad_cupy import backend
from crfgrad_cupy.blob import Blob
from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.layers.base import create_layer, layer_class
from crfgrad_cupy.proto import caffe_pb2

CASES = ou.case_names('crfgrad')
needs_oracle = pytest.mark.skipif(not CASES, reason='../shared/oracle is not present')


def _layer_param(text):
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    return lp


def _case_layer(name, quirks, set_params=True):
    """The case's CrfGrad layer driven directly (features taken from the stored PixelFeature output)."""
    c = ou.case(name)
    z = ou.load_npz(name)
    net = caffe_pb2.NetParameter()
    text_format.Merge(open(ou.path(c['files']['prototxt'])).read(), net)
    lp = [lyr for lyr in net.layer if lyr.type == 'CrfGrad'][0]
    lp.crfgrad_param.reproduce_caffe_quirks = quirks
    layer = create_layer(lp, caffe_pb2.TEST)
    prob, feat = Blob(z['input/prob'].shape), Blob(z['output/feat'].shape)
    prob.data, feat.data = z['input/prob'], z['output/feat']
    tops = [Blob(()) for _ in lp.top]
    if set_params:
        for i in range(3):
            b = Blob(z['param/crf/%d' % i].shape)
            b.data = z['param/crf/%d' % i]
            layer.blobs.append(b)
    layer.setup([prob, feat], tops)
    return layer, [prob, feat], tops, z, lp


def _run_case(name, quirks):
    layer, bottoms, tops, z, lp = _case_layer(name, quirks)
    layer.forward(bottoms, tops)
    got = {'output/crf': tops[0].data.copy()}
    if len(tops) > 1:
        got['output/energy'] = tops[1].data.copy()
    tops[0].diff[...] = backend.xp().asarray(z['top_diff/crf'])
    bottoms[1].diff[...] = 7.0                        # must stay untouched
    layer.backward(tops, [True, False], bottoms)
    got['bottom_diff/prob'] = bottoms[0].diff.copy()
    for i in range(3):
        got['param_diff/crf/%d' % i] = layer.blobs[i].diff.copy()
    assert np.all(backend.to_numpy(bottoms[1].diff) == 7.0)
    return got, z, lp


@needs_oracle
@pytest.mark.parametrize('name', CASES)
def test_oracle_direct_with_quirks(name):
    got, z, _ = _run_case(name, True)
    for key, a in got.items():
        ou.assert_close(a, z[key], what='%s %s' % (name, key))


@needs_oracle
@pytest.mark.parametrize('name', CASES)
def test_oracle_direct_true_gradient(name):
    """Default mode: everything matches Caffe except the documented quirks (taps diff for T > 1,
    the energy definition)."""
    got, z, lp = _run_case(name, False)
    T = int(lp.crfgrad_param.num_iterations)
    differing = {'output/energy'} | ({'param_diff/crf/2'} if T > 1 else set())
    for key, a in got.items():
        if key in differing:
            ref = z[key]
            assert np.abs(a - ref).max() > 1e-3 * np.abs(ref).max(), key
        else:
            ou.assert_close(a, z[key], what='%s %s' % (name, key))


@needs_oracle
def test_oracle_energy_definitions():
    """Caffe's energy is the batch sum of x·(u + Kx) in row 0 only; ours is ψ·x + ½xᵀKx per image."""
    name = 'crfgrad_L3_N2_9x12_it2_k3_energy_batch'
    layer, bottoms, tops, z, lp = _case_layer(name, False)
    layer.forward(bottoms, tops)
    ours = tops[1].data[:, 0, 0, :]
    ref = z['output/energy']
    assert np.all(ref[1:] == 0)
    # recompute both energies from the states with the layer's own operators
    from crfgrad_cupy.core import pgd
    cache = layer._cache
    T = ref.shape[-1]
    for t in range(T):
        x = pgd.state(cache, t)
        kq = pgd.pairwise_apply(cache.terms, x)
        np.testing.assert_allclose(ours[:, t], pgd.energy_eq6(x, cache.u, cache.terms), rtol=1e-6)
        assert abs(float(pgd.energy_caffe(x, cache.u, kq)) - ref[0, 0, 0, t]) <= 1e-4 * abs(ref[0, 0, 0, t])
        np.testing.assert_allclose(ours[:, t].sum(),
                                   float(np.sum(x * cache.u)) + 0.5 * sum(float(np.sum(x * k)) for k in kq),
                                   rtol=1e-5)


def _has_layers(*types):
    return all(layer_class(t) is not None for t in types)


@needs_oracle
@pytest.mark.skipif(not _has_layers('PixelFeature'), reason='PixelFeature layer not there yet')
@pytest.mark.parametrize('name', CASES)
def test_oracle_check_case(name):
    errors = ou.check_case(name, quirks=True)
    assert 'output/crf' in errors and 'param_diff/crf/2' in errors


@needs_oracle
@pytest.mark.skipif(not _has_layers('PixelFeature'), reason='PixelFeature layer not there yet')
@pytest.mark.parametrize('name', CASES)
def test_oracle_check_case_true_gradient(name):
    T = int(_case_layer(name, False)[4].crfgrad_param.num_iterations)
    skip = ('output/energy',) + (('param_diff/crf/2',) if T > 1 else ())
    ou.check_case(name, quirks=False, skip=skip)


@needs_oracle
@pytest.mark.skipif(not _has_layers('PixelFeature', 'Convolution', 'ReLU', 'Pooling', 'Dropout', 'Deconvolution',
                                    'Crop', 'Softmax'), reason='layers of whole_net not there yet')
@pytest.mark.parametrize('quirks', [True, False])
def test_oracle_whole_net(quirks):
    if 'whole_net' not in ou.case_names('whole_net'):
        pytest.skip('whole_net case missing')
    ou.check_case('whole_net', quirks=quirks, skip=() if quirks else ('param_diff/crf/2',))


# ------------------------------------------------------------------------------------ default init
@needs_oracle
def test_default_init_matches_caffe():
    name = 'crfgrad_L3_N1_9x12_it5_k9_default_init'
    layer, bottoms, tops, z, _ = _case_layer(name, True, set_params=False)
    for i in range(3):
        np.testing.assert_array_equal(layer.blobs[i].data, z['param/crf/%d' % i])
    got, _, _ = _run_case(name, True)
    for key in ('output/crf', 'bottom_diff/prob', 'param_diff/crf/0', 'param_diff/crf/1', 'param_diff/crf/2'):
        ou.assert_close(got[key], z[key], what=key)


def _setup(text, prob_shape=(1, 3, 4, 5), d=5, dtype=np.float32):
    layer = create_layer(_layer_param(text), caffe_pb2.TEST)
    prob, feat = Blob(prob_shape), Blob((prob_shape[0], d) + prob_shape[2:])
    rng = np.random.default_rng(0)
    prob.data = rng.uniform(0.05, 1, prob_shape).astype(dtype)
    feat.data = rng.standard_normal(feat.shape).astype(dtype)
    n_top = 2 if 'calculate_energy: true' in text else 1
    tops = [Blob(()) for _ in range(n_top)]
    layer.setup([prob, feat], tops)
    return layer, [prob, feat], tops


def test_default_init_fields_and_debug_mode():
    layer, _, _ = _setup('name: "c" type: "CrfGrad" crfgrad_param { num_classes: 3 kernel_size: 5 debug_mode: true '
                         'unary_weight_init: 0.25 pl_filter_init_scale: 0.5 }')
    assert layer.blobs[0].data.reshape(()) == np.float32(0.25)
    W = layer.blobs[1].data
    expect = np.zeros((3, 3, 5, 5), np.float32)
    for i in range(3):
        for j in range(3):
            if i != j:
                expect[i, j, 1, 2] = expect[i, j, 3, 2] = expect[i, j, 2, 1] = expect[i, j, 2, 3] = 1
    np.testing.assert_array_equal(W, expect)
    taps = layer.blobs[2].data
    m = np.array([bin(i).count('1') for i in range(63)])
    g = np.select([m == 0, (m == 1) | (m == 5), (m == 2) | (m == 4), m == 3], [1, 17 / 33, 10 / 33, 8 / 33])
    for c in range(3):
        np.testing.assert_allclose(taps[c, c, 0], -0.5 * g, rtol=1e-6)
    off = ~np.eye(3, dtype=bool)
    assert np.all(taps[off] == 0)


def test_default_init_low_dimensional_features_spill_like_caffe():
    """d = 2 (F = 7): the 63 d=5 values run on from [c, c, 0, 0] into the following pairs."""
    layer, _, _ = _setup('name: "c" type: "CrfGrad" crfgrad_param { num_classes: 3 kernel_size: 3 }', d=2)
    flat = layer.blobs[2].data.reshape(-1)
    assert layer.blobs[2].shape == (3, 3, 1, 7)
    from crfgrad_cupy.core.lattice import gaussian_taps
    g = -0.1 * gaussian_taps(5, 1)
    expect = np.zeros(63, np.float32)
    for c in range(3):
        s = (c * 3 + c) * 7
        e = min(s + 63, 63)
        expect[s:e] = g[:e - s]
    np.testing.assert_allclose(flat, expect, rtol=1e-6)


# ------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize('text, field', [
    ('crfgrad_param { num_classes: 3 kernel_size: 4 }', 'kernel_size'),
    ('crfgrad_param { num_classes: 2 kernel_size: 3 }', 'num_classes'),
    ('crfgrad_param { num_classes: 3 num_iterations: -1 }', 'num_iterations'),
    ('crfgrad_param { num_classes: 3 calculate_energy: true } top: "a"', 'calculate_energy'),
])
def test_parameter_errors(text, field):
    lp = _layer_param('name: "crf" type: "CrfGrad" ' + text)
    layer = create_layer(lp, caffe_pb2.TEST)
    prob, feat = Blob((1, 3, 4, 5)), Blob((1, 5, 4, 5))
    prob.data = np.full((1, 3, 4, 5), 1 / 3.0, np.float32)
    with pytest.raises(CrfGradError) as e:
        layer.setup([prob, feat], [Blob(())])
    assert field in str(e.value) and 'crf' in str(e.value)


def test_shape_errors_and_truncated_iterations():
    layer, bottoms, tops = _setup('name: "c" type: "CrfGrad" crfgrad_param { num_classes: 3 num_iterations: 2.9 '
                                  'kernel_size: 3 calculate_energy: true }')
    assert layer.num_iterations == 2 and tops[1].shape == (1, 1, 1, 2)
    bad = Blob((1, 5, 4, 6))
    with pytest.raises(CrfGradError):
        layer.reshape([bottoms[0], bad], tops)
    with pytest.raises(CrfGradError):
        layer.reshape([bottoms[0], Blob((1, 3, 4, 5))], tops)       # 3-D features: wrong tap count
    lp = _layer_param('name: "c" type: "CrfGrad" crfgrad_param { num_classes: 3 kernel_size: 3 }')
    layer2 = create_layer(lp, caffe_pb2.TEST)
    layer2.blobs = [Blob((1, 1, 1, 1)), Blob((3, 3, 5, 5)), Blob((3, 3, 1, 63))]
    with pytest.raises(CrfGradError):
        layer2.setup(bottoms, [Blob(())])


# ------------------------------------------------------------------------------------ diff rules
@pytest.mark.parametrize('quirks', [False, True])
def test_diff_rules(quirks):
    text = ('name: "c" type: "CrfGrad" crfgrad_param { num_classes: 3 num_iterations: 2 kernel_size: 3 '
            'reproduce_caffe_quirks: %s }' % ('true' if quirks else 'false'))
    layer, bottoms, tops = _setup(text)
    rng = np.random.default_rng(1)
    layer.blobs[1].data = rng.standard_normal(layer.blobs[1].shape).astype(np.float32) * 0.3
    layer.forward(bottoms, tops)
    tops[0].diff[...] = rng.standard_normal(tops[0].shape)
    bottoms[0].diff[...] = 100.0
    bottoms[1].diff[...] = 5.0
    layer.backward(tops, [True, False], bottoms)
    first = [b.diff.copy() for b in layer.blobs]
    d0 = bottoms[0].diff.copy()
    assert not np.any(d0 == 100.0)
    layer.backward(tops, [True, False], bottoms)
    np.testing.assert_array_equal(bottoms[0].diff, d0)             # overwritten
    if quirks:
        np.testing.assert_array_equal(layer.blobs[0].diff, first[0])   # overwritten, as the fork
    else:
        np.testing.assert_allclose(layer.blobs[0].diff, 2 * first[0], rtol=1e-6)   # accumulated
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * first[1], rtol=1e-6)   # accumulated
    np.testing.assert_allclose(layer.blobs[2].diff, 2 * first[2], rtol=1e-6)
    assert np.all(bottoms[1].diff == 5.0)
    # propagate_down[0] false: Caffe does nothing; the default still computes the parameter diffs
    for b in layer.blobs:
        b.diff[...] = 0
    bottoms[0].diff[...] = 3.0
    layer.backward(tops, [False, False], bottoms)
    assert np.all(bottoms[0].diff == 3.0)
    if quirks:
        assert all(np.all(b.diff == 0) for b in layer.blobs)
    else:
        np.testing.assert_allclose(layer.blobs[1].diff, first[1], rtol=1e-6)
        np.testing.assert_allclose(layer.blobs[0].diff, first[0], rtol=1e-6)


def test_energy_top_rows():
    text = 'name: "c" type: "CrfGrad" crfgrad_param { num_classes: 3 num_iterations: 3 kernel_size: 3 ' \
           'calculate_energy: true %s }'
    layer, bottoms, tops = _setup(text % '', prob_shape=(2, 3, 4, 5))
    layer.forward(bottoms, tops)
    ours = tops[1].data.copy()
    assert np.all(ours[:, 0, 0, :] != 0)
    layerq, bq, tq = _setup(text % 'reproduce_caffe_quirks: true', prob_shape=(2, 3, 4, 5))
    tq[1].data[...] = -1.0
    layerq.forward(bq, tq)
    assert np.all(tq[1].data[1] == -1.0)                           # rows n > 0 are not written
    # T = 0 edge case: the output is the input
    layer0, b0, t0 = _setup(text.replace('num_iterations: 3', 'num_iterations: 0') % '')
    layer0.forward(b0, t0)
    np.testing.assert_array_equal(t0[0].data, b0[0].data)
    assert t0[1].shape == (1, 1, 1, 0)


def test_in_place_forward_backward():
    text = 'name: "c" type: "CrfGrad" crfgrad_param { num_classes: 3 num_iterations: 2 kernel_size: 3 }'
    layer, bottoms, tops = _setup(text)
    layer.forward(bottoms, tops)
    out = tops[0].data.copy()
    rng = np.random.default_rng(2)
    g = rng.standard_normal(out.shape).astype(np.float32)
    tops[0].diff[...] = g
    layer.backward(tops, [True, False], bottoms)
    dp = bottoms[0].diff.copy()
    lp = _layer_param(text)
    layer2 = create_layer(lp, caffe_pb2.TEST)
    layer2.blobs = [Blob(b.shape) for b in layer.blobs]
    for a, b in zip(layer2.blobs, layer.blobs):
        a.data = b.data.copy()
    prob = Blob(bottoms[0].shape)
    prob.data = bottoms[0].data.copy()
    layer2.setup([prob, bottoms[1]], [prob])
    layer2.forward([prob, bottoms[1]], [prob])
    np.testing.assert_array_equal(prob.data, out)
    prob.diff[...] = g
    layer2.backward([prob], [True, False], [prob, bottoms[1]])
    np.testing.assert_allclose(prob.diff, dp, rtol=1e-6)


# ------------------------------------------------------------------------------------ finite differences
def test_crfgrad_finite_differences():
    """Whole layer, float64, leak 0.5: bottom 0, unary weight, spatial filters and taps (true gradient)."""
    from gradcheck import check_layer_gradients
    rng0 = np.random.default_rng(3)
    feats = rng0.standard_normal((1, 5, 3, 4)) * 2.0

    def small(scale):
        return lambda rng, shape: rng.standard_normal(shape) * scale

    report = check_layer_gradients(
        'name: "crf" type: "CrfGrad" crfgrad_param { num_classes: 2 num_iterations: 3 kernel_size: 3 '
        'leak_factor: 0.5 step_size: 0.3 }',
        [(1, 2, 3, 4), feats],
        bottom_init=[lambda rng, shape: rng.uniform(0.05, 1.0, shape), None],
        param_init=[lambda rng, shape: np.full(shape, 0.7), small(0.5), small(0.5)],
        propagate_down=[True, False], rtol=1e-5, atol=1e-7)
    assert set(report) == {'bottom0', 'param0', 'param1', 'param2'}
