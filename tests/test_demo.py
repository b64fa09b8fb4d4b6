"""`crfgrad demo` on the bundled model and its sample images, and `crfgrad segment` agreeing with it."""
import os

import numpy as np
from PIL import Image

from crfgrad_cupy import segment as sg
from crfgrad_cupy.cli import main as cli_main


def test_bundled_model_files():
    proto, weights = sg.default_model()
    assert os.path.getsize(weights) < 5 * 2 ** 20
    pairs = sg.sample_pairs()
    assert len(pairs) == 2
    assert os.path.exists(os.path.join(sg.default_model_dir(), 'PROVENANCE.md'))
    net = sg.load_net(proto, weights)
    assert {'score_pre', 'score_post'} <= set(net.blobs)
    assert [net.layer_dict[n].type for n in sg.crf_layer_names(net)] == ['CrfGrad']


def test_demo_writes_its_files_and_segment_gives_the_same_labels(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert cli_main(['demo', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    pairs = sg.sample_pairs()
    for img_path, _ in pairs:
        stem = os.path.splitext(os.path.basename(img_path))[0]
        assert stem in printed
        for suffix in ('_unary.png', '_crf.png', '_overlay.png'):
            assert (out / (stem + suffix)).stat().st_size > 100
    for fig in ('overview.png', 'energy.png', 'energy_leak0.png'):
        assert (out / fig).stat().st_size > 5000
    proto, weights = sg.default_model()
    seg_out = tmp_path / 'seg'
    assert cli_main(['segment', proto, weights] + [p for p, _ in pairs] + ['--out', str(seg_out),
                                                                          '--no-progress']) == 0
    for img_path, mask_path in pairs:
        stem = os.path.splitext(os.path.basename(img_path))[0]
        seg_labels = np.asarray(Image.open(seg_out / (stem + '.png')))
        demo_labels = np.asarray(Image.open(out / (stem + '_crf.png')))
        np.testing.assert_array_equal(seg_labels, demo_labels)
        mask = np.asarray(Image.open(mask_path))
        assert seg_labels.shape == mask.shape
        # the bundled model segments its own samples well
        assert 100 * sg.iou_from_confusion(sg.confusion(seg_labels, mask, 2))[1] > 70
