"""Preprocessing, mapping outputs back to the image, scores, and `crfgrad segment` on small nets."""
import os

import numpy as np
import pytest
from PIL import Image

import oracle_util
from crfgrad_cupy import segment as sg
from crfgrad_cupy.cli import main as cli_main
from crfgrad_cupy.errors import CrfGradError
from crfgrad_cupy.preprocess import (Placement, Preprocessor, collect_images, fit_size, load_image, load_mean,
                                     parse_size, read_list_file)

HORSE = os.path.join(oracle_util.DATA, 'caffe_models', 'crfgrad_horse_caffe')
WEIZMANN = os.path.join(oracle_util.DATA, 'weizmann_horse')

# A tiny fully convolutional net: 1x1 convolutions whose class-1 score is R - B (after the BGR
# swap and mean subtraction), so "red" pixels are foreground.  score_pre and score_post are two
# softmaxes of the same scores with different temperatures (the same argmax).
TINY = '''name: "tiny"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: %(size)d dim: %(size)d } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "softmax_pre" type: "Softmax" bottom: "score" top: "score_pre" }
layer { name: "sharpen" type: "Convolution" bottom: "score_pre" top: "sharp"
  convolution_param { num_output: 2 kernel_size: 1 bias_term: false } }
layer { name: "softmax_post" type: "Softmax" bottom: "sharp" top: "score_post" }
'''


def tiny_net_files(tmp_path, size=16, mix=0.0):
    """(prototxt, caffemodel) of TINY with weights that score R - B; ``mix`` > 0 makes score_post
    prefer class 0 near the decision boundary (then its argmax differs from score_pre's)."""
    import crfgrad_cupy as cc
    proto = tmp_path / 'tiny.prototxt'
    proto.write_text(TINY % {'size': size})
    net = cc.Net(str(proto), cc.TEST)
    w = np.zeros((2, 3, 1, 1), np.float32)
    w[1, 2, 0, 0], w[1, 0, 0, 0] = 0.05, -0.05           # class 1: R - B (data is BGR)
    b = np.array([0.0, (122.675 - 104.008) * 0.05], np.float32)   # undo the mean difference
    net.params['score'][0].data[...] = w
    net.params['score'][1].data[...] = b
    net.params['sharpen'][0].data[...] = np.array([[4, mix], [0, 4]], np.float32).reshape(2, 2, 1, 1)
    weights = tmp_path / 'tiny.caffemodel'
    net.save(str(weights))
    return str(proto), str(weights)


def two_colour_image(h, w, split):
    """Left part red (foreground), right part blue; mask 1 on the red part."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :split] = (200, 30, 40)
    img[:, split:] = (30, 40, 200)
    mask = np.zeros((h, w), np.uint8)
    mask[:, :split] = 1
    return img, mask


# --- preprocessing ---------------------------------------------------------------------------

def test_preprocessing_matches_the_caffe_horse_inputs():
    """The horse model's inputs (fit into 128, pad, BGR - mean), bit for bit, on val images."""
    if not os.path.isdir(os.path.join(HORSE, 'val')):
        pytest.skip('shared horse model not present')
    pre = Preprocessor(input_size=(128, 128))
    stems = sorted(f[:-4] for f in os.listdir(os.path.join(HORSE, 'val')))[:6]
    for stem in stems:
        ref = np.load(os.path.join(HORSE, 'val', stem + '.npz'))
        data, placement = pre(load_image(os.path.join(WEIZMANN, 'val', 'images', stem + '.jpg')))
        np.testing.assert_array_equal(data, ref['data'][0])
        vh, vw = placement.valid_hw
        assert np.all(ref['label'][vh:, :] == 255) and np.all(ref['label'][:, vw:] == 255)
        assert np.all(ref['label'][:vh, :vw] != 255)


def test_fit_size_and_parse_size():
    assert fit_size(299, 432, 128, 128) == (89, 128)
    assert fit_size(432, 299, 128, 128) == (128, 89)
    assert fit_size(10, 10, 96, 128) == (96, 96)
    assert parse_size('96x128') == (96, 128) and parse_size('64') == (64, 64) and parse_size('native') is None
    with pytest.raises(CrfGradError):
        parse_size('big')


def test_preprocessor_mean_scale_swap_and_stretch(tmp_path):
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    data, pl = Preprocessor(mean=(1, 2, 3), scale=0.5, channel_swap=(2, 1, 0), input_size=None)(img)
    np.testing.assert_allclose(data[0], (img[:, :, 2] - 1.0) * 0.5)
    np.testing.assert_allclose(data[2], (img[:, :, 0] - 3.0) * 0.5)
    assert pl.valid_hw == pl.input_hw == pl.orig_hw == (4, 6)
    data, pl = Preprocessor(mean=None, channel_swap=None, input_size=(8, 8), resize='stretch')(img)
    assert data.shape == (3, 8, 8) and pl.valid_hw == (8, 8)
    data, pl = Preprocessor(mean=None, channel_swap=None, input_size=(8, 8))(img)
    assert pl.valid_hw == (5, 8) and np.all(data[:, 5:] == 0)
    np.save(tmp_path / 'm.npy', np.full((3, 8, 8), 7, np.float32))
    assert load_mean(str(tmp_path / 'm.npy')).shape == (3, 8, 8)
    from crfgrad_cupy.io.blobproto import array_to_blob
    (tmp_path / 'm.binaryproto').write_bytes(
        array_to_blob(np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1)).SerializeToString())
    np.testing.assert_allclose(load_mean(str(tmp_path / 'm.binaryproto')).reshape(-1), [0, 1, 2])
    with pytest.raises(CrfGradError):
        load_mean('1,2')


def test_list_files_and_folders(tmp_path):
    (tmp_path / 'imgs').mkdir()
    for name in ('b.png', 'a.jpg', 'notes.txt'):
        (tmp_path / 'imgs' / name).write_bytes(b'x')
    (tmp_path / 'list.txt').write_text('# comment\nimgs/a.jpg 1\n\n%s 0\nwith space.png\n'
                                       % (tmp_path / 'imgs' / 'b.png'))
    got = read_list_file(str(tmp_path / 'list.txt'))
    assert got == [str(tmp_path / 'imgs' / 'a.jpg'), str(tmp_path / 'imgs' / 'b.png'),
                   str(tmp_path / 'with space.png')]
    got = collect_images([str(tmp_path / 'imgs'), str(tmp_path / 'missing.jpg')])
    assert got == [str(tmp_path / 'imgs' / 'a.jpg'), str(tmp_path / 'imgs' / 'b.png'),
                   str(tmp_path / 'missing.jpg')]


# --- mapping back, scores --------------------------------------------------------------------

def test_resize_bilinear_matches_pillow_upsampling():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 7, 5)).astype(np.float32)
    out = sg.resize_bilinear(maps, (23, 17))
    for c in range(2):
        ref = np.asarray(Image.fromarray(maps[c], mode='F').resize((17, 23), Image.BILINEAR))
        np.testing.assert_allclose(out[c], ref, atol=1e-5)
    np.testing.assert_allclose(sg.interp_matrix(9, 4).sum(axis=1), 1, atol=1e-6)


def test_to_image_resolution_crops_the_padding_first():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[1, :4, :] = 1                  # the valid region (4 x 8); the padding rows would add 0s
    maps[0, 4:, :] = 5
    pl = Placement((10, 20), (8, 8), (4, 8))
    full = sg.to_image_resolution(maps, pl)
    assert full.shape == (2, 10, 20)
    np.testing.assert_allclose(full[1], 1)
    np.testing.assert_allclose(full[0], 0)
    assert pl.valid_region((4, 4)) == (2, 4)


def test_confusion_and_iou():
    gt = np.array([[0, 0, 1, 1], [255, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [1, 0, 0, 1]])
    c = sg.confusion(pred, gt, 2)
    np.testing.assert_array_equal(c, [[2, 1], [1, 3]])
    iou, m = sg.iou_from_confusion(c)
    np.testing.assert_allclose(iou, [2 / 4, 3 / 5])
    assert m == pytest.approx((0.5 + 0.6) / 2)


def test_palette_and_label_png(tmp_path):
    pal = sg.voc_palette()
    np.testing.assert_array_equal(pal[:4], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
    np.testing.assert_array_equal(pal[15], [192, 128, 128])
    lab = np.array([[0, 1], [2, 15]], np.uint8)
    sg.save_label_png(lab, str(tmp_path / 'l.png'))
    im = Image.open(tmp_path / 'l.png')
    assert im.mode == 'P'
    np.testing.assert_array_equal(np.asarray(im), lab)


# --- segmenting with a small net -------------------------------------------------------------

def test_segmenter_full_resolution_labels(tmp_path):
    proto, weights = tiny_net_files(tmp_path)
    seg = sg.Segmenter.from_files(proto, weights, extra_blobs=('score_pre',))
    img, mask = two_colour_image(30, 50, 21)
    res = seg(img)
    assert res.probs.shape == (2, 30, 50) and res.labels.shape == (30, 50)
    assert res.placement.valid_hw == (10, 16)
    # away from the colour edge the labels are exact
    assert np.all(res.labels[:, :18] == 1) and np.all(res.labels[:, 25:] == 0)
    assert set(res.blobs) == {'score_post', 'score_pre'}
    np.testing.assert_array_equal(res.blobs['score_pre'].argmax(0), res.labels)


def test_cli_segment_writes_outputs_and_reports_bad_inputs(tmp_path, capsys):
    proto, weights = tiny_net_files(tmp_path)
    img, _ = two_colour_image(30, 50, 21)
    Image.fromarray(img).save(tmp_path / 'good1.png')
    Image.fromarray(img[:, ::-1]).save(tmp_path / 'good2.jpg')
    (tmp_path / 'broken.png').write_bytes(b'not an image at all')
    listing = tmp_path / 'list.txt'
    listing.write_text('good1.png 0\nmissing.png 1\nbroken.png 0\ngood2.jpg 1\n')
    out = tmp_path / 'out'
    code = cli_main(['segment', proto, weights, str(listing), '--out', str(out), '--save-probs',
                     '--no-progress'])
    err = capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith('crfgrad: error:')]
    assert len(lines) == 2
    assert 'missing.png' in lines[0] and 'not found' in lines[0]
    assert 'broken.png' in lines[1] and 'decode' in lines[1]
    for stem in ('good1', 'good2'):
        assert (out / (stem + '.png')).exists() and (out / (stem + '_overlay.png')).exists()
        probs = np.load(out / (stem + '_probs.npy'))
        assert probs.shape == (2, 30, 50)
        np.testing.assert_array_equal(np.asarray(Image.open(out / (stem + '.png'))), probs.argmax(0))
    assert not (out / 'broken.png').exists()


def test_cli_segment_weights_of_another_net(tmp_path, capsys):
    import crfgrad_cupy as cc
    proto, _ = tiny_net_files(tmp_path)
    other = tmp_path / 'other.prototxt'
    other.write_text('name: "other"\nlayer { name: "input" type: "Input" top: "data" input_param { shape { '
                     'dim: 1 dim: 3 dim: 8 dim: 8 } } }\nlayer { name: "conv_x" type: "Convolution" bottom: "data" '
                     'top: "y" convolution_param { num_output: 4 kernel_size: 3 } }\n')
    cc.Net(str(other), cc.TEST).save(str(tmp_path / 'other.caffemodel'))
    img, _ = two_colour_image(12, 12, 5)
    Image.fromarray(img).save(tmp_path / 'a.png')
    code = cli_main(['segment', proto, str(tmp_path / 'other.caffemodel'), str(tmp_path / 'a.png'),
                     '--out', str(tmp_path / 'o'), '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert 'other.caffemodel' in err[0] and 'another net' in err[0]
    # same layer names, other shapes: also one line naming the weights file
    wrong = tmp_path / 'wrong.prototxt'
    wrong.write_text((TINY % {'size': 16}).replace('num_output: 2 kernel_size: 1 }', 'num_output: 2 kernel_size: 3 }', 1))
    cc.Net(str(wrong), cc.TEST).save(str(tmp_path / 'wrong.caffemodel'))
    code = cli_main(['segment', proto, str(tmp_path / 'wrong.caffemodel'), str(tmp_path / 'a.png'),
                     '--out', str(tmp_path / 'o'), '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'wrong.caffemodel' in err[0] and 'shape' in err[0]


def test_cli_segment_net_that_cannot_take_an_image(tmp_path, capsys):
    """Per-image reshape: a net with a 5x5 valid convolution cannot take a 3x3 image; the
    other image is still segmented."""
    import crfgrad_cupy as cc
    proto = tmp_path / 'valid.prototxt'
    proto.write_text('name: "v"\nlayer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 '
                     'dim: 3 dim: 8 dim: 8 } } }\nlayer { name: "score" type: "Convolution" bottom: "data" '
                     'top: "score" convolution_param { num_output: 2 kernel_size: 5 } }\n')
    cc.Net(str(proto), cc.TEST).save(str(tmp_path / 'v.caffemodel'))
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / 'small.png')
    Image.fromarray(np.zeros((9, 11, 3), np.uint8)).save(tmp_path / 'big.png')
    code = cli_main(['segment', str(proto), str(tmp_path / 'v.caffemodel'), str(tmp_path / 'small.png'),
                     str(tmp_path / 'big.png'), '--input-size', 'native', '--out', str(tmp_path / 'o'),
                     '--no-progress'])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith('crfgrad: error')]
    assert code == 2 and len(err) == 1 and 'small.png' in err[0] and 'cannot take' in err[0]
    assert (tmp_path / 'o' / 'big.png').exists()


def test_cli_segment_verify(tmp_path, capsys):
    """Without a GPU: NumPy float32 against float64; with one: CuPy against NumPy."""
    proto, weights = tiny_net_files(tmp_path)
    img, _ = two_colour_image(20, 20, 9)
    Image.fromarray(img).save(tmp_path / 'a.png')
    code = cli_main(['segment', proto, weights, str(tmp_path / 'a.png'), '--out', str(tmp_path / 'o'),
                     '--verify', '--no-progress'])
    out = capsys.readouterr().out
    assert code == 0
    line = [l for l in out.splitlines() if 'verify' in l][0]
    from crfgrad_cupy import backend
    paths = 'CuPy (GPU) float32 vs NumPy float32' if backend.cupy_available() else 'NumPy float32 vs NumPy float64'
    assert paths in line and 'score_post max|diff|' in line
    v = sg.Verifier(proto, weights)
    data, _ = sg.Segmenter.from_files(proto, weights).pre(img)
    (diff, ref), = v.compare(data).values()
    assert 0 < diff < 1e-5 and ref > 0.5      # float32 rounding, nothing more
