"""HDF5Data, ImageData, ImageLabelData (and their transform_param), IOUAccuracy."""

import numpy as np
import pytest
from PIL import Image

import crfgrad_cupy as cc
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.io.blobproto import array_to_blob
from crfgrad_cupy.layers import data as D


def net_with(tmp_path, layer_text, phase=cc.TRAIN):
    path = tmp_path / 'net.prototxt'
    path.write_text('name: "d"\n' + layer_text)
    return cc.Net(str(path), phase)


def rgb_image(path, h, w, seed=0, mode='RGB'):
    r = np.random.default_rng(seed)
    a = r.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(a, 'RGB').convert(mode).save(path)
    return a


# --- HDF5Data -----------------------------------------------------------------------------------

def write_h5(path, n, seed, offset=0):
    import h5py
    r = np.random.default_rng(seed)
    data = r.normal(size=(n, 2, 3)).astype(np.float32)
    label = (np.arange(n) + offset).astype(np.float32)
    with h5py.File(path, 'w') as f:
        f['data'] = data
        f['label'] = label
    return data, label


HDF5_LAYER = '''layer { name: "d" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "%s" batch_size: %d %s } }'''


def test_hdf5data_reads_files_in_order_and_wraps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d1, l1 = write_h5(tmp_path / 'a.h5', 3, 0, 0)
    d2, l2 = write_h5(tmp_path / 'b.h5', 2, 1, 3)
    (tmp_path / 'list.txt').write_text('a.h5\nb.h5\n')
    net = net_with(tmp_path, HDF5_LAYER % ('list.txt', 4, ''))
    assert net.blobs['data'].shape == (4, 2, 3) and net.blobs['label'].shape == (4,)
    all_d, all_l = np.concatenate([d1, d2]), np.concatenate([l1, l2])
    order = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    for b in range(3):
        net.forward()
        idx = order[4 * b:4 * b + 4]
        np.testing.assert_array_equal(net.blobs['label'].data, all_l[idx])
        np.testing.assert_array_equal(net.blobs['data'].data, all_d[idx])


def test_hdf5data_shuffle_is_a_seeded_permutation(tmp_path, monkeypatch):
    from crfgrad_cupy.layers import fillers
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / 'a.h5', 10, 0)
    (tmp_path / 'list.txt').write_text('a.h5\n')
    seen = []
    for _ in range(2):
        fillers.set_random_seed(4)
        net = net_with(tmp_path, HDF5_LAYER % ('list.txt', 5, 'shuffle: true'))
        labels = []
        for _ in range(2):
            net.forward()
            labels.extend(net.blobs['label'].data.tolist())
        seen.append(labels)
    assert sorted(seen[0]) == list(range(10))
    assert seen[0] == seen[1]
    assert seen[0] != list(range(10))


def test_hdf5data_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'list.txt').write_text('missing.h5\n')
    with pytest.raises(CrfGradError, match='missing.h5'):
        net_with(tmp_path, HDF5_LAYER % ('list.txt', 2, ''))
    with pytest.raises(CrfGradError, match='nolist.txt'):
        net_with(tmp_path, HDF5_LAYER % ('nolist.txt', 2, ''))
    import h5py
    with h5py.File(tmp_path / 'x.h5', 'w') as f:
        f['data'] = np.zeros((2, 3), np.float32)
    (tmp_path / 'list2.txt').write_text('x.h5\n')
    with pytest.raises(CrfGradError, match="x.h5.*'label'|'label'.*x.h5"):
        net_with(tmp_path, HDF5_LAYER % ('list2.txt', 2, ''))


# --- ImageData ----------------------------------------------------------------------------------

def test_imagedata_bgr_labels_and_centre_crop_in_test(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'img').mkdir()
    a = rgb_image(tmp_path / 'img' / 'a.png', 7, 9, 0)
    b = rgb_image(tmp_path / 'img' / 'b.png', 7, 9, 1)
    (tmp_path / 'list.txt').write_text('a.png 3\nb.png 5\n')
    layer = '''layer { name: "d" type: "ImageData" top: "data" top: "label"
      transform_param { crop_size: 5 mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5 }
      image_data_param { source: "list.txt" root_folder: "img/" batch_size: 3 } }'''
    net = net_with(tmp_path, layer, cc.TEST)
    net.forward()
    x, y = net.blobs['data'].data, net.blobs['label'].data
    assert x.shape == (3, 3, 5, 5)
    np.testing.assert_array_equal(y, [3, 5, 3])
    mean = np.array([10, 20, 30], np.float32)[:, None, None]
    for k, img in enumerate([a, b, a]):
        ref = (img[1:6, 2:7, ::-1].transpose(2, 0, 1).astype(np.float32) - mean) * np.float32(0.5)
        np.testing.assert_array_equal(x[k], ref)


def test_imagedata_mirror_and_random_crop_stay_inside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = rgb_image(tmp_path / 'a.png', 6, 6, 0)
    (tmp_path / 'list.txt').write_text('a.png 0\n')
    layer = '''layer { name: "d" type: "ImageData" top: "data" top: "label"
      transform_param { crop_size: 4 mirror: true }
      image_data_param { source: "list.txt" batch_size: 16 } }'''
    net = net_with(tmp_path, layer)
    net.forward()
    chw = a[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    crops = {(i, j, m): (chw[:, i:i + 4, j:j + 4][:, :, ::-1] if m else chw[:, i:i + 4, j:j + 4])
             for i in range(3) for j in range(3) for m in (0, 1)}
    found = set()
    for x in net.blobs['data'].data:
        keys = [k for k, c in crops.items() if np.array_equal(c, x)]
        assert keys, 'batch item is not a crop (mirrored or not) of the image'
        found.add(keys[0][2])
    assert found == {0, 1}


def test_imagedata_mean_file_resize_and_grey(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rgb_image(tmp_path / 'a.png', 8, 6, 3)
    (tmp_path / 'list.txt').write_text('a.png 1\n')
    mean = np.random.default_rng(0).uniform(0, 50, size=(1, 1, 4, 3)).astype(np.float32)
    (tmp_path / 'mean.binaryproto').write_bytes(array_to_blob(mean).SerializeToString())
    layer = '''layer { name: "d" type: "ImageData" top: "data" top: "label"
      transform_param { mean_file: "mean.binaryproto" }
      image_data_param { source: "list.txt" batch_size: 1 new_height: 4 new_width: 3 is_color: false } }'''
    net = net_with(tmp_path, layer)
    net.forward()
    grey = np.asarray(Image.open(tmp_path / 'a.png').convert('L'))
    # exact 2x shrink: OpenCV's linear resize takes the area path = 2x2 block means
    blocks = grey.reshape(4, 2, 3, 2).astype(np.float64).mean(axis=(1, 3))
    ref = np.rint(blocks).astype(np.float32) - mean[0, 0]
    np.testing.assert_array_equal(net.blobs['data'].data[0, 0], ref)


def test_imagedata_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'bad.png').write_bytes(b'not a png at all')
    (tmp_path / 'l1.txt').write_text('bad.png 0\n')
    layer = '''layer { name: "d" type: "ImageData" top: "data" top: "label"
      image_data_param { source: "%s" batch_size: 1 } }'''
    with pytest.raises(CrfGradError, match='bad.png') as e:
        net_with(tmp_path, layer % 'l1.txt')
    assert 'decode' in str(e.value)
    (tmp_path / 'l2.txt').write_text('gone.png 0\n')
    with pytest.raises(CrfGradError, match='gone.png'):
        net_with(tmp_path, layer % 'l2.txt')
    with pytest.raises(CrfGradError, match='image_data_param.new_height'):
        net_with(tmp_path, '''layer { name: "d" type: "ImageData" top: "data" top: "label"
          image_data_param { source: "l2.txt" new_height: 4 } }''')


# --- ImageLabelData -------------------------------------------------------------------------------

def write_pair(tmp_path, name, h, w, seed, label_shape=None):
    img = rgb_image(tmp_path / (name + '.png'), h, w, seed)
    lab = np.random.default_rng(seed + 50).integers(0, 3, size=label_shape or (h, w)).astype(np.uint8)
    Image.fromarray(lab, 'L').save(tmp_path / (name + '_lab.png'))
    return img, lab


def ild_layer(extra_param='', transform='crop_size: 8', phase=''):
    return '''layer { name: "d" type: "ImageLabelData" top: "data" top: "label"
      transform_param { %s }
      image_label_data_param { image_list_path: "images.txt" label_list_path: "labels.txt"
        batch_size: 1 %s } %s }''' % (transform, extra_param, phase)


def write_lists(tmp_path, names):
    (tmp_path / 'images.txt').write_text(''.join(n + '.png\n' for n in names))
    (tmp_path / 'labels.txt').write_text(''.join(n + '_lab.png\n' for n in names))


def test_imagelabeldata_pads_small_images_like_the_fork(tmp_path, monkeypatch):
    """5x6 image, crop 8, padding not centred: image reflected / zero and label 255 at the
    bottom and the right; in TEST the crop is centred, so it covers the padded image."""
    monkeypatch.chdir(tmp_path)
    img, lab = write_pair(tmp_path, 'a', 5, 6, 0)
    write_lists(tmp_path, ['a'])
    for padding in ('REFLECT', 'ZERO'):
        net = net_with(tmp_path, ild_layer('pad_centre: false padding: %s' % padding), cc.TEST)
        net.forward()
        x, y = net.blobs['data'].data[0], net.blobs['label'].data[0, 0]
        assert x.shape == (3, 8, 8) and y.shape == (8, 8)
        bgr = img[:, :, ::-1].astype(np.float32)
        if padding == 'REFLECT':
            rows = [0, 1, 2, 3, 4, 3, 2, 1]
            cols = [0, 1, 2, 3, 4, 5, 4, 3]
            ref = bgr[np.ix_(rows, cols)]
        else:
            ref = np.zeros((8, 8, 3), np.float32)
            ref[:5, :6] = bgr
        np.testing.assert_array_equal(x, ref.transpose(2, 0, 1))
        ref_lab = np.full((8, 8), 255, np.float32)
        ref_lab[:5, :6] = lab
        np.testing.assert_array_equal(y, ref_lab)


def test_imagelabeldata_centred_padding_and_label_slice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img, lab = write_pair(tmp_path, 'a', 5, 5, 1)
    write_lists(tmp_path, ['a'])
    net = net_with(tmp_path, ild_layer('padding: ZERO label_slice { dim: 4 dim: 4 stride: 2 stride: 2 '
                                       'offset: 0 offset: 0 }'), cc.TEST)
    net.forward()
    assert net.blobs['label'].shape == (1, 1, 4, 4)
    full = np.full((8, 8), 255, np.float32)
    full[1:6, 2:7] = lab            # centred: top 1 / bottom 2, left 2 / right 1 (the fork's swap)
    np.testing.assert_array_equal(net.blobs['label'].data[0, 0], full[::2, ::2])
    x = net.blobs['data'].data[0]
    np.testing.assert_array_equal(x[:, 1:6, 2:7], img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32))
    assert x[:, 0].sum() == 0 and x[:, :, :2].sum() == 0


def test_imagelabeldata_mirror_and_crop_apply_to_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img, lab = write_pair(tmp_path, 'a', 10, 10, 2)
    # a label that encodes the pixel position, to check the crop/mirror alignment
    pos = (np.arange(100).reshape(10, 10) % 251).astype(np.uint8)
    Image.fromarray(pos, 'L').save(tmp_path / 'a_lab.png')
    write_lists(tmp_path, ['a'])
    net = net_with(tmp_path, ild_layer('batch_size: 1', 'crop_size: 6 mirror: true mean_value: 5'))
    bgr = img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) - 5
    mirrored = 0
    for _ in range(12):
        net.forward()
        x, y = net.blobs['data'].data[0], net.blobs['label'].data[0, 0]
        m = y[0, 0] > y[0, 1]
        mirrored += m
        if m:
            x, y = x[:, :, ::-1], y[:, ::-1]
        i, j = divmod(int(y[0, 0]), 10)
        np.testing.assert_array_equal(y, pos[i:i + 6, j:j + 6])
        np.testing.assert_array_equal(x, bgr[:, i:i + 6, j:j + 6])
    assert 0 < mirrored < 12


def test_imagelabeldata_random_scale_keeps_label_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pair(tmp_path, 'a', 12, 12, 3)
    write_lists(tmp_path, ['a'])
    net = net_with(tmp_path, ild_layer('rand_scale: true min_scale: 0.5 max_scale: 1.5 hsv_noise: true '
                                       'h_noise: 10 s_noise: 10 v_noise: 10 shuffle: true'))
    for _ in range(4):
        net.forward()
        assert set(np.unique(net.blobs['label'].data)) <= {0.0, 1.0, 2.0, 255.0}
        x = net.blobs['data'].data
        assert x.min() >= 0 and x.max() <= 255


def test_imagelabeldata_size_mismatch_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pair(tmp_path, 'a', 6, 6, 0, label_shape=(6, 5))
    write_lists(tmp_path, ['a'])
    net = net_with(tmp_path, ild_layer())
    with pytest.raises(CrfGradError, match='a_lab.png') as e:
        net.forward()
    assert 'a.png' in str(e.value)
    (tmp_path / 'labels.txt').write_text('nope.png\n')
    net = net_with(tmp_path, ild_layer())
    with pytest.raises(CrfGradError, match='nope.png'):
        net.forward()
    (tmp_path / 'labels.txt').write_text('x.png\ny.png\n')
    with pytest.raises(CrfGradError, match='labels'):
        net_with(tmp_path, ild_layer())


def test_resize_weights_match_opencv_rules():
    # nearest: floor(d * scale); linear: half-pixel centres with clamped borders
    np.testing.assert_array_equal(D.resize_weights(4, 2, 2.0, D.NEAREST).argmax(1), [0, 2])
    W = D.resize_weights(2, 4, 0.5, D.LINEAR)
    np.testing.assert_allclose(W, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    for method in (D.LINEAR, D.CUBIC, D.AREA):
        np.testing.assert_allclose(D.resize_weights(7, 5, 7 / 5, method).sum(1), 1.0)
    A = D.resize_weights(6, 3, 2.0, D.AREA)
    np.testing.assert_allclose(A, np.kron(np.eye(3), [0.5, 0.5]))


def test_hsv_roundtrip():
    a = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    back = D.hsv_to_bgr(D.bgr_to_hsv(a))
    assert np.abs(back.astype(int) - a).max() <= 3
    assert D.bgr_to_hsv(np.array([[[0, 0, 255]]], np.uint8)).tolist() == [[[0, 255, 255]]]
    assert D.bgr_to_hsv(np.array([[[255, 0, 0]]], np.uint8)).tolist() == [[[120, 255, 255]]]


# --- IOUAccuracy ----------------------------------------------------------------------------------

def iou_net(tmp_path, extra='', tops='top: "loss" top: "miou"'):
    text = '''layer { name: "in" type: "Input" top: "score" top: "label"
      input_param { shape { dim: 1 dim: 3 dim: 4 dim: 5 } shape { dim: 1 dim: 1 dim: 4 dim: 5 } } }
    layer { name: "iou" type: "IOUAccuracy" bottom: "score" bottom: "label" %s
      iou_accuracy_param { test_iterations: 3 %s } }''' % (tops, extra)
    return net_with(tmp_path, text, cc.TEST)


def test_iou_accumulates_over_test_iterations(tmp_path, caplog):
    net = iou_net(tmp_path, 'ignore_label: 255')
    r = np.random.default_rng(0)
    conf = np.zeros((3, 3), np.int64)
    layer = net.layer_dict['iou']
    with caplog.at_level('INFO', logger='crfgrad_cupy'):
        for k in range(4):
            s = r.normal(size=(1, 3, 4, 5)).astype(np.float32)
            lab = r.integers(0, 3, size=(1, 1, 4, 5)).astype(np.float32)
            lab[0, 0, 0, :2] = 255
            out = net.forward(score=s, label=lab)
            if k == 3:
                conf[...] = 0                      # a new cycle started after 3 calls
            pred = s[0].argmax(0).ravel()
            g = lab.ravel().astype(int)
            ok = g != 255
            np.add.at(conf, (g[ok], pred[ok]), 1)
            inter = np.diag(conf)
            union = conf.sum(0) + conf.sum(1) - inter
            assert float(out['miou']) == pytest.approx(100 * np.mean(inter / (union + 1e-10)), rel=1e-6)
            p = np.exp(s[0] - s[0].max(0)) / np.exp(s[0] - s[0].max(0)).sum(0)
            nll = -np.log(p.reshape(3, -1)[g[ok], np.flatnonzero(ok)])
            assert float(out['loss']) == pytest.approx(nll.mean(), rel=1e-5)
            if k == 2:
                assert layer.last_mean_iou == pytest.approx(float(out['miou']))
    assert sum('IOU Accuracy' in rec.getMessage() for rec in caplog.records) == 1
    assert net.blob_loss_weights['loss'] == 1 and net.blob_loss_weights['miou'] == 0


def test_iou_normalize_false_divides_by_batch(tmp_path):
    net = iou_net(tmp_path, 'ignore_label: 255 normalize: false', tops='top: "loss"')
    s = np.zeros((1, 3, 4, 5), np.float32)
    lab = np.zeros((1, 1, 4, 5), np.float32)
    out = net.forward(score=s, label=lab)
    assert float(out['loss']) == pytest.approx(20 * np.log(3), rel=1e-6)


def test_iou_rejects_bad_labels_and_backward(tmp_path):
    net = iou_net(tmp_path, 'ignore_label: 255')
    with pytest.raises(CrfGradError, match='labels'):
        net.forward(score=np.zeros((1, 3, 4, 5)), label=np.full((1, 1, 4, 5), 7.0))
    layer = net.layer_dict['iou']
    with pytest.raises(CrfGradError, match='no gradient'):
        layer.backward([], [True, False], [])


def test_resize_pad_hsv_against_opencv():
    """Where OpenCV is installed: nearest and borders exact, linear/cubic/area and HSV within
    one grey level (OpenCV rounds its fixed-point sums differently)."""
    cv2 = pytest.importorskip('cv2')
    r = np.random.default_rng(0)
    for _ in range(30):
        h, w = (int(v) for v in r.integers(3, 30, size=2))
        oh, ow = (int(v) for v in r.integers(2, 45, size=2))
        img = r.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(D.resize(img, oh, ow, D.NEAREST),
                                      cv2.resize(img, (ow, oh), interpolation=cv2.INTER_NEAREST))
        for name, flag in ((D.LINEAR, cv2.INTER_LINEAR), (D.CUBIC, cv2.INTER_CUBIC), (D.AREA, cv2.INTER_AREA)):
            if name == D.AREA and (oh > h or ow > w):
                continue
            ref = cv2.resize(img, (ow, oh), interpolation=flag)
            assert np.abs(D.resize(img, oh, ow, name).astype(int) - ref).max() <= 1
        s = float(r.uniform(0.5, 1.5))
        ref = cv2.resize(img, (0, 0), fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(D.resize(img, *ref.shape[:2], D.NEAREST, fy=s, fx=s), ref)
        t, b, left, right = (int(v) for v in r.integers(0, 40, size=4))
        np.testing.assert_array_equal(D.pad(img, t, b, left, right),
                                      cv2.copyMakeBorder(img, t, b, left, right, cv2.BORDER_REFLECT_101))
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        assert np.abs(D.bgr_to_hsv(img).astype(int) - hsv).max() <= 1
        assert np.abs(D.hsv_to_bgr(hsv).astype(int) - cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)).max() <= 1


@pytest.mark.skipif(not __import__('crfgrad_cupy').backend.cupy_available(), reason='needs CuPy and a CUDA device')
def test_gpu_data_layers_and_iou(tmp_path, monkeypatch):
    from crfgrad_cupy import backend
    monkeypatch.chdir(tmp_path)
    write_pair(tmp_path, 'a', 9, 9, 0)
    write_lists(tmp_path, ['a'])
    cpu = net_with(tmp_path, ild_layer(), cc.TEST)
    cpu.forward()
    backend.set_mode_gpu()
    gpu = net_with(tmp_path, ild_layer(), cc.TEST)
    gpu.forward()
    assert type(gpu.blobs['data'].data).__module__.startswith('cupy')
    np.testing.assert_array_equal(backend.to_numpy(gpu.blobs['data'].data), cpu.blobs['data'].data)
    np.testing.assert_array_equal(backend.to_numpy(gpu.blobs['label'].data), cpu.blobs['label'].data)
    s = np.random.default_rng(1).normal(size=(1, 3, 4, 5)).astype(np.float32)
    lab = np.random.default_rng(2).integers(0, 3, size=(1, 1, 4, 5)).astype(np.float32)
    outs = []
    for mode in ('cpu', 'gpu'):
        backend.set_mode_gpu() if mode == 'gpu' else backend.set_mode_cpu()
        (tmp_path / mode).mkdir()
        net = iou_net(tmp_path / mode, 'ignore_label: 255')
        out = net.forward(score=s, label=lab)
        outs.append((float(out['loss']), float(out['miou'])))
    assert outs[1] == pytest.approx(outs[0], rel=1e-6)


def test_iou_without_tops_only_counts(tmp_path, caplog):
    """As in the authors' net.prototxt (no top): the layer just accumulates and logs."""
    net = iou_net(tmp_path, 'ignore_label: 255', tops='')
    s = np.random.default_rng(0).normal(size=(1, 3, 4, 5)).astype(np.float32)
    lab = np.zeros((1, 1, 4, 5), np.float32)
    with caplog.at_level('INFO', logger='crfgrad_cupy'):
        for _ in range(3):
            net.forward(score=s, label=lab)
    iou = net.layer_dict['iou'].last_mean_iou
    pred0 = (s[0].argmax(0) == 0).sum()
    assert iou == pytest.approx(100 * pred0 / 20 / 3, rel=1e-6)   # class 0: I = pred0, U = 20; others 0
    assert any('IOU Accuracy' in r.getMessage() for r in caplog.records)
