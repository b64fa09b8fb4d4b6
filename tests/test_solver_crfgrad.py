"""End to end: Input -> Convolution -> Softmax -> CrfGrad (+ PixelFeature) -> SoftmaxWithLoss
trained by the solver on a toy segmentation problem."""
import numpy as np
import pytest

import crfgrad_cupy as cc
from crfgrad_cupy.layers.base import layer_class

NET = '''
name: "toy_crf"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 dim: 1 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "softmax" type: "Softmax" bottom: "score" top: "score_pre" }
layer { name: "feat" type: "PixelFeature" bottom: "data" top: "features"
  pixel_feature_param { type: POSITION_AND_RGB pos_scale: 0.2 color_scale: 5 } }
layer { name: "crf" type: "CrfGrad" bottom: "score_pre" bottom: "features" top: "score_post"
  crfgrad_param { num_classes: 2 kernel_size: 5 num_iterations: 3 step_size: 0.1 leak_factor: 0.5
                  log_eps: 0.1 unary_weight_init: 0.5 pl_filter_init_scale: 0.1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score_post" bottom: "label" top: "loss"
  loss_param { ignore_label: 255 } }
'''


def toy_batch(rng, n=2, size=12):
    """A bright square on a darker noisy background (values about 0..2); label 1 inside the square,
    255 (ignored) on the last row."""
    data = rng.normal(0, 0.2, size=(n, 3, size, size)) + 0.5
    label = np.zeros((n, 1, size, size))
    for k in range(n):
        i, j = rng.integers(1, size - 6, size=2)
        label[k, 0, i:i + 5, j:j + 5] = 1
        data[k, :, i:i + 5, j:j + 5] += 1
    label[:, 0, -1, :] = 255
    return data.astype(np.float32), label.astype(np.float32)


@pytest.mark.skipif(layer_class('PixelFeature') is None or layer_class('CrfGrad') is None,
                    reason='needs the PixelFeature and CrfGrad layers')
def test_training_through_crfgrad_lowers_the_loss_and_learns_the_filters(tmp_path):
    (tmp_path / 'net.prototxt').write_text(NET)
    (tmp_path / 'solver.prototxt').write_text(
        'net: "%s" type: "Adam" base_lr: 0.02 momentum: 0.9 momentum2: 0.999 lr_policy: "fixed" '
        'weight_decay: 0.0001 random_seed: 3 snapshot_after_train: false\n' % (tmp_path / 'net.prototxt'))
    s = cc.get_solver(str(tmp_path / 'solver.prototxt'))
    crf = s.net.params['crf']
    assert [tuple(b.shape) for b in crf] == [(1, 1, 1, 1), (2, 2, 5, 5), (2, 2, 1, 63)]
    spatial0, lattice0 = crf[1].data.copy(), crf[2].data.copy()
    assert not spatial0.any()                         # the fork initialises the spatial filters to 0
    held_out = [toy_batch(np.random.default_rng(99 + i)) for i in range(3)]

    def held_out_loss():
        out = []
        for x, y in held_out:
            s.net.blobs['data'].data[...] = x
            s.net.blobs['label'].data[...] = y
            out.append(s.net.forward_loss())
        return np.mean(out)
    before = held_out_loss()
    rng = np.random.default_rng(0)
    for it in range(25):
        x, y = toy_batch(rng)
        s.net.blobs['data'].data[...] = x
        s.net.blobs['label'].data[...] = y
        s.step(1)
    assert held_out_loss() < 0.8 * before            # about 0.69 -> 0.49
    assert np.abs(crf[1].data).max() > 1e-3            # spatial filters learned (not all zero any more)
    assert np.abs(crf[2].data - lattice0).max() > 1e-3  # bilateral (lattice) filters changed
    assert np.isfinite(crf[0].data).all()
