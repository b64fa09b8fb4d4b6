"""DeepLab's Interp layer: oracle (interp_*), a per-pixel reference written from the
fork's description, finite differences, adjointness, output-size rules and errors."""
import numpy as np
import pytest

import oracle_util
from gradcheck import check_layer_gradients
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.proto import caffe_pb2
from layer_util import make_layer

TEST = caffe_pb2.TEST


def make(param, x):
    return make_layer('name: "i" type: "Interp" interp_param { %s }' % param, [x])


def reference_interp(x, h_out, w_out, pad_beg=0, pad_end=0):
    """Per-pixel loops: output (i, j) samples the cropped input at (i*rh, j*rw), float32 ratios."""
    n, c, h, w = x.shape
    he, we = h + pad_beg + pad_end, w + pad_beg + pad_end
    o = -pad_beg
    crop = x[:, :, o:o + he, o:o + we].astype(np.float64)
    if he == h_out and we == w_out:
        return crop
    rh = np.float32(he - 1) / np.float32(h_out - 1) if h_out > 1 else np.float32(0)
    rw = np.float32(we - 1) / np.float32(w_out - 1) if w_out > 1 else np.float32(0)
    y = np.zeros((n, c, h_out, w_out))
    for i in range(h_out):
        r = np.float32(rh * np.float32(i))
        i0 = int(r)
        i1 = i0 + (1 if i0 < he - 1 else 0)
        a = float(np.float32(r - np.float32(i0)))
        for j in range(w_out):
            s = np.float32(rw * np.float32(j))
            j0 = int(s)
            j1 = j0 + (1 if j0 < we - 1 else 0)
            b = float(np.float32(s - np.float32(j0)))
            y[:, :, i, j] = ((1 - a) * ((1 - b) * crop[:, :, i0, j0] + b * crop[:, :, i0, j1])
                             + a * ((1 - b) * crop[:, :, i1, j0] + b * crop[:, :, i1, j1]))
    return y


# --------------------------------------------------------------------------- oracle

@pytest.mark.parametrize('name', oracle_util.case_names('interp'))
def test_oracle(name, shared_dir):
    errors = oracle_util.check_case(name)
    assert errors, 'nothing compared'


# --------------------------------------------------------------------------- values

CONFIGS = [
    # param, input (H, W), expected output (H, W), pad_beg, pad_end
    ('zoom_factor: 3', (4, 5), (10, 13), 0, 0),
    ('shrink_factor: 2', (7, 6), (4, 3), 0, 0),
    ('shrink_factor: 3 zoom_factor: 2', (8, 10), (5, 7), 0, 0),
    ('height: 6 width: 2', (3, 5), (6, 2), 0, 0),
    ('height: 1 width: 3', (4, 4), (1, 3), 0, 0),
    ('height: 5 width: 4', (5, 4), (5, 4), 0, 0),               # same size: copy
    ('height: 5 width: 7', (5, 4), (5, 7), 0, 0),               # one axis unchanged
    ('zoom_factor: 2 pad_beg: -1 pad_end: -2', (6, 7), (5, 7), -1, -2),
    ('shrink_factor: 1 pad_beg: -1 pad_end: -1', (6, 7), (4, 5), -1, -1),   # crop only (copy)
    ('zoom_factor: 4 height: 3 width: 3', (3, 4), (9, 13), 0, 0),          # zoom beats height/width
    ('zoom_factor: 2 shrink_factor: 2 height: 3 width: 3', (5, 5), (3, 3), 0, 0),  # h/w before both
    ('height: 4 width: 4', (1, 1), (4, 4), 0, 0),
]


@pytest.mark.parametrize('param,hw,out_hw,pb,pe', CONFIGS)
def test_forward_matches_reference(param, hw, out_hw, pb, pe):
    x = np.random.default_rng(0).standard_normal((2, 3) + hw).astype(np.float32)
    layer, b, t = make(param, x)
    assert t[0].shape == (2, 3) + out_hw
    layer.forward(b, t)
    ref = reference_interp(x, out_hw[0], out_hw[1], pb, pe)
    np.testing.assert_allclose(t[0].data, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('param,hw,out_hw,pb,pe', CONFIGS)
def test_backward_is_adjoint(param, hw, out_hw, pb, pe):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2) + hw)
    dy = rng.standard_normal((1, 2) + out_hw)
    layer, b, t = make(param, x.astype(np.float32))
    layer.forward(b, t)
    t[0].diff[...] = dy
    b[0].diff[...] = np.nan                     # must be overwritten, outside the crop too
    layer.backward(t, [True], b)
    dx = b[0].diff.astype(np.float64)
    assert np.all(np.isfinite(dx))
    lhs = np.sum(reference_interp(x, out_hw[0], out_hw[1], pb, pe) * dy)
    np.testing.assert_allclose(np.sum(x * dx), lhs, rtol=1e-5)
    if pb or pe:
        assert np.all(dx[:, :, :-pb, :] == 0) and np.all(dx[:, :, :, :-pb] == 0)
        assert np.all(dx[:, :, hw[0] + pe:, :] == 0) and np.all(dx[:, :, :, hw[1] + pe:] == 0)


@pytest.mark.parametrize('param,shape', [
    ('zoom_factor: 2', (1, 2, 3, 3)),
    ('shrink_factor: 2', (1, 2, 5, 4)),
    ('height: 4 width: 2', (2, 1, 3, 5)),
    ('zoom_factor: 3 pad_beg: -1 pad_end: -1', (1, 1, 4, 5)),
    ('height: 3 width: 4', (1, 2, 3, 4)),
])
def test_gradient(param, shape):
    check_layer_gradients('type: "Interp" interp_param { %s }' % param, [shape])


def test_float64_weights_follow_float32_ratio():
    """The sampling positions are float32 even in float64 mode (as the fork computes them)."""
    from crfgrad_cupy import backend
    x = np.random.default_rng(2).standard_normal((1, 1, 7, 7))
    with backend.dtype_scope(np.float64):
        layer, b, t = make('height: 11 width: 13', x)
        layer.forward(b, t)
        y = t[0].data
    np.testing.assert_allclose(y, reference_interp(x, 11, 13), rtol=1e-12, atol=1e-12)


def test_linear_ramp_reproduced_and_constant_kept():
    h, w = 5, 4
    ramp = (np.arange(h)[:, None] * 2.0 + np.arange(w)[None, :] * -1.0).astype(np.float32)[None, None]
    layer, b, t = make('zoom_factor: 4', ramp)
    layer.forward(b, t)
    ii = np.arange(17)[:, None] / 4.0
    jj = np.arange(13)[None, :] / 4.0
    np.testing.assert_allclose(t[0].data[0, 0], ii * 2.0 - jj, atol=1e-5)
    const = np.full((1, 2, 3, 6), 1.5, np.float32)
    layer, b, t = make('height: 7 width: 2', const)
    layer.forward(b, t)
    np.testing.assert_allclose(t[0].data, 1.5, rtol=1e-6)


def test_reshape_follows_input_size():
    layer, b, t = make('zoom_factor: 2', np.zeros((1, 1, 3, 3), np.float32))
    b[0].reshape(2, 3, 4, 6)
    layer.reshape(b, t)
    assert t[0].shape == (2, 3, 7, 11)


def test_errors():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(CrfGradError, match='pad_beg'):
        make('zoom_factor: 2 pad_beg: 1', x)
    with pytest.raises(CrfGradError, match='pad_end'):
        make('zoom_factor: 2 pad_end: 1', x)
    with pytest.raises(CrfGradError, match='interp_param'):
        make('height: 4', x)
    with pytest.raises(CrfGradError, match='shrink'):
        make('shrink_factor: 0', x)
    with pytest.raises(CrfGradError, match='zoom'):
        make('zoom_factor: 0', x)
    with pytest.raises(CrfGradError, match='positive'):
        make('zoom_factor: 2 pad_beg: -2 pad_end: -2', x)
