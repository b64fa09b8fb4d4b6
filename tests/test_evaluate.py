"""`crfgrad evaluate`: JSON keys, and IoU at each mask's full resolution (padding cropped first)."""
import json

import numpy as np
from PIL import Image

from crfgrad_cupy import segment as sg
from crfgrad_cupy.cli import main as cli_main
from test_segment import tiny_net_files


def disc_case(h, w, cy, cx, r, band=0.5):
    """A red disc on blue; the mask is the disc, with 255 in a band around its edge."""
    yy, xx = np.mgrid[:h, :w]
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (30, 40, 200)
    img[d < r] = (200, 30, 40)
    mask = (d < r).astype(np.uint8)
    mask[np.abs(d - r) < band] = 255
    mask[:2, :3] = 255                       # and an ignored corner
    return img, mask


def reference_confusion(seg, img, mask, blob):
    """Net output -> crop the valid region -> Pillow bilinear (mode F) to the mask size -> argmax."""
    data, pl = seg.pre(img)
    sg.run_net(seg.net, data)
    maps = np.asarray(seg.net.blobs[blob].data[0])
    vh, vw = pl.valid_hw
    up = np.stack([np.asarray(Image.fromarray(m[:vh, :vw], mode='F').resize((mask.shape[1], mask.shape[0]),
                                                                            Image.BILINEAR)) for m in maps])
    pred = up.argmax(0)
    ok = mask != 255
    conf = np.zeros((2, 2), np.int64)
    for g in (0, 1):
        for p in (0, 1):
            conf[g, p] = np.sum(ok & (mask == g) & (pred == p))
    return conf


def net_resolution_confusion(seg, img, mask, blob):
    data, pl = seg.pre(img)
    sg.run_net(seg.net, data)
    vh, vw = pl.valid_hw
    pred = np.asarray(seg.net.blobs[blob].data[0]).argmax(0)[:vh, :vw]
    small = np.asarray(Image.fromarray(mask).resize((vw, vh), Image.NEAREST))
    return sg.confusion(pred, small, 2)


def miou(conf):
    tp = np.diag(conf).astype(float)
    return 100 * np.mean(tp / (conf.sum(0) + conf.sum(1) - tp))


def test_evaluate_json_and_full_resolution_iou(tmp_path, capsys):
    proto, weights = tiny_net_files(tmp_path, size=16, mix=1.5)
    data = tmp_path / 'set'
    (data / 'images').mkdir(parents=True)
    (data / 'masks').mkdir()
    cases = {'a': disc_case(37, 53, 18, 20, 11), 'b': disc_case(41, 23, 25, 12, 7.3),
             'c': disc_case(19, 19, 9, 9, 5.5)}
    for stem, (img, mask) in cases.items():
        Image.fromarray(img).save(data / 'images' / (stem + '.png'))
        Image.fromarray(mask).save(data / 'masks' / (stem + '.png'))
    out = tmp_path / 'res.json'
    assert cli_main(['evaluate', '--model', proto, '--weights', weights, '--data', str(data), '--json', str(out),
                     '--no-progress']) == 0
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert {'unary_miou', 'crf_miou', 'images'} <= set(res)
    assert res['images'] == 3
    seg = sg.Segmenter.from_files(proto, weights)
    for key, blob in (('unary', 'score_pre'), ('crf', 'score_post')):
        ref = sum(reference_confusion(seg, img, mask, blob) for img, mask in cases.values())
        np.testing.assert_array_equal(res['%s_confusion' % key], ref)
        assert abs(res['%s_miou' % key] - miou(ref)) < 1e-9
        assert ('%.2f' % res['%s_miou' % key]) in table
        # scoring at the net's resolution would give another number: the test can tell them apart
        low = sum(net_resolution_confusion(seg, img, mask, blob) for img, mask in cases.values())
        assert abs(miou(low) - miou(ref)) > 0.05
    assert res['unary_miou'] != res['crf_miou']
    assert 0 < res['crf_miou'] <= 100


def test_evaluate_folder_errors(tmp_path, capsys):
    proto, weights = tiny_net_files(tmp_path)
    (tmp_path / 'd' / 'images').mkdir(parents=True)
    (tmp_path / 'd' / 'masks').mkdir()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / 'd' / 'images' / 'x.png')
    assert cli_main(['evaluate', '--model', proto, '--weights', weights, '--data', str(tmp_path / 'd')]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'x.png' in err and 'no mask' in err
    assert cli_main(['evaluate', '--model', proto, '--weights', weights, '--data', str(tmp_path / 'nowhere')]) == 2
    assert 'nowhere' in capsys.readouterr().err
