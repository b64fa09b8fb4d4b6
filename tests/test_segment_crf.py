"""CRF-Grad nets through the segment library and CLI: energies, rounding, refine."""
import json

import numpy as np
import pytest
from PIL import Image

import crfgrad_cupy as cc
from crfgrad_cupy import segment as sg
from crfgrad_cupy.cli import main as cli_main
from crfgrad_cupy.errors import CrfGradError

# A small deploy net with a CrfGrad layer: 1x1 conv scores (class 1 = red), Softmax, PixelFeature, CrfGrad.
CRF_NET = '''name: "tiny_crf"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "softmax_pre" type: "Softmax" bottom: "score" top: "score_pre" }
layer { name: "features" type: "PixelFeature" bottom: "data" top: "features"
  pixel_feature_param { type: POSITION_AND_RGB pos_scale: 0.2 color_scale: 0.05 } }
layer { name: "crf" type: "CrfGrad" bottom: "score_pre" bottom: "features" top: "score_post"
  crfgrad_param { num_classes: 2 kernel_size: 3 num_iterations: 3 step_size: 0.2 leak_factor: %(leak)s
                  unary_weight_init: 1 } }
'''


def crf_net_files(tmp_path, leak=0.5):
    proto = tmp_path / ('crf_%g.prototxt' % leak)
    proto.write_text(CRF_NET % {'leak': leak})
    net = cc.Net(str(proto), cc.TEST)
    w = np.zeros((2, 3, 1, 1), np.float32)
    w[1, 2, 0, 0], w[1, 0, 0, 0] = 0.02, -0.02
    net.params['score'][0].data[...] = w
    net.params['score'][1].data[...] = [0.0, 0.37]
    spatial = np.zeros((2, 2, 3, 3), np.float32)
    spatial[0, 1] = spatial[1, 0] = 0.1
    spatial[:, :, 1, 1] = 0                           # no self-interaction in the spatial term
    net.params['crf'][1].data[...] = spatial
    weights = tmp_path / ('crf_%g.caffemodel' % leak)
    net.save(str(weights))
    return str(proto), str(weights)


def noisy_image(h=20, w=20, seed=0, noise=25.0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (190, 40, 40)
    img[:, w // 2:] = (40, 40, 190)
    img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
    return img


def test_energy_top_matches_the_reruns_and_the_cli(tmp_path, capsys):
    proto, weights = crf_net_files(tmp_path)
    img = noisy_image()
    Image.fromarray(img).save(tmp_path / 'a.png')
    seg = sg.Segmenter.from_files(proto, weights, energy=True)
    assert seg.output_blob == 'score_post'                     # the energy top is not the output
    res = seg(img)
    E_top = res.energy['crf']
    assert E_top.shape == (3,)
    E_all = sg.crf_energies(seg.net)[0]
    np.testing.assert_allclose(E_all[:3], E_top, rtol=1e-5)
    assert cli_main(['energy', proto, weights, str(tmp_path / 'a.png'), '--json', str(tmp_path / 'e.json'),
                     '--plot', str(tmp_path / 'e.png')]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / 'e.json').read_text())
    np.testing.assert_allclose(rep['energies'], E_all, rtol=1e-5)
    assert len(rep['energies']) == 4 and 'rounded_energy' in rep
    assert 'E(x) =' in out and (tmp_path / 'e.png').stat().st_size > 1000
    assert cli_main(['segment', proto, weights, str(tmp_path / 'a.png'), '--out', str(tmp_path / 'o'),
                     '--save-energy', '--save-rounded', '--no-progress']) == 0
    saved = json.loads((tmp_path / 'o' / 'a_energy.json').read_text())
    np.testing.assert_allclose(saved['crf'], E_top, rtol=1e-6)
    rounded = np.asarray(Image.open(tmp_path / 'o' / 'a_rounded.png'))
    assert rounded.shape == img.shape[:2] and set(np.unique(rounded)) <= {0, 1}


def test_rounding_guarantee_without_leak_and_bilateral(tmp_path):
    """Leak 0 (q on the simplex) and no bilateral taps (no self-interaction): E(x) <= E(q_T)."""
    proto, weights = crf_net_files(tmp_path, leak=0.0)
    net = sg.load_net(proto, weights)
    net.params['crf'][2].data[...] = 0
    seg = sg.Segmenter(net)
    res = seg(noisy_image(seed=3))
    r = sg.crf_round(net)
    assert r.guaranteed
    e_q = sg.crf_energies(net)[0, -1]
    assert float(r.energy_x[0]) <= e_q + 1e-4 * abs(e_q)
    lab = sg.labels_to_image_resolution(np.asarray(r.labels[0]), res.placement)
    assert lab.shape == res.labels.shape


def test_refine_potts_removes_noise_and_keeps_argmax_without_pairwise():
    rng = np.random.default_rng(1)
    img = noisy_image(24, 30, seed=2, noise=3.0)
    truth = np.zeros((24, 30), np.int64)
    truth[:, :15] = 1
    p1 = np.where(truth == 1, 0.75, 0.25)
    flip = rng.random(truth.shape) < 0.12
    p1 = np.where(flip, 1 - p1, p1)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    before = int((probs.argmax(0) != truth).sum())
    out, lab = sg.refine(img, probs)
    assert out.shape == probs.shape and lab.shape == truth.shape
    assert int((lab != truth).sum()) < before // 2
    np.testing.assert_allclose(out.sum(0), 1, atol=1e-5)         # leak 0: outputs are probabilities
    _, lab0 = sg.refine(img, probs, crf={'spatial_weight': 0, 'bilateral_weight': 0})
    np.testing.assert_array_equal(lab0, probs.argmax(0))
    with pytest.raises(CrfGradError):
        sg.refine(img, probs - 1)                                 # scores, not probabilities


def test_probs_layouts():
    a = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(sg.probs_layout(a, (5, 7)), a)
    np.testing.assert_array_equal(sg.probs_layout(np.moveaxis(a, 0, 2), (5, 7)), a)
    np.testing.assert_array_equal(sg.probs_layout(a[None], None), a)
    np.testing.assert_array_equal(sg.probs_layout(np.moveaxis(a, 0, 2), None, 'hwl'), a)
    with pytest.raises(CrfGradError):
        sg.probs_layout(a[0])


def test_cli_refine(tmp_path, capsys):
    img = noisy_image(16, 18)
    Image.fromarray(img).save(tmp_path / 'im.png')
    p1 = np.zeros((16, 18), np.float32) + 0.3
    p1[:, :9] = 0.7
    probs = np.stack([1 - p1, p1])
    np.save(tmp_path / 'p_lhw.npy', probs)
    np.save(tmp_path / 'p_hwl.npy', np.moveaxis(probs, 0, 2))
    assert cli_main(['refine', str(tmp_path / 'im.png'), str(tmp_path / 'p_lhw.npy'), '--out', str(tmp_path / 'a')]) == 0
    assert cli_main(['refine', str(tmp_path / 'im.png'), str(tmp_path / 'p_hwl.npy'), '--out', str(tmp_path / 'b')]) == 0
    a = np.load(tmp_path / 'a' / 'im_refined_probs.npy')
    b = np.load(tmp_path / 'b' / 'im_refined_probs.npy')
    np.testing.assert_allclose(a, b)
    lab = np.asarray(Image.open(tmp_path / 'a' / 'im_refined.png'))
    np.testing.assert_array_equal(lab, a.argmax(0))
    capsys.readouterr()
    np.save(tmp_path / 'bad.npy', np.zeros((4, 4), np.float32))
    assert cli_main(['refine', str(tmp_path / 'im.png'), str(tmp_path / 'bad.npy')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'bad.npy' in err


def test_refine_with_learned_filters_equals_the_nets_own_crf(tmp_path):
    proto, weights = crf_net_files(tmp_path)
    learned = sg.learned_crf(weights)
    assert learned['layer'] == 'crf' and learned['crf']['num_iterations'] == 3
    assert learned['pos_scale'] == pytest.approx(0.2) and learned['color_scale'] == pytest.approx(0.05)
    expected = np.full((3, 3), 0.1, np.float32)
    expected[1, 1] = 0
    np.testing.assert_allclose(learned['blobs'][1][0, 1], expected)
    img = noisy_image(12, 12)
    Image.fromarray(img).save(tmp_path / 'im.png')
    net = sg.load_net(proto, weights)
    sg.Segmenter(net)(img)
    p = np.asarray(net.blobs['score_pre'].data[0])
    np.save(tmp_path / 'p.npy', p)
    assert cli_main(['refine', str(tmp_path / 'im.png'), str(tmp_path / 'p.npy'), '--weights', weights,
                     '--out', str(tmp_path / 'o')]) == 0
    out = np.load(tmp_path / 'o' / 'im_refined_probs.npy')
    np.testing.assert_allclose(out, np.asarray(net.blobs['score_post'].data[0]), atol=1e-5)
