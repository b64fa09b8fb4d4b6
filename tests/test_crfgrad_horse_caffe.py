"""The CrfGrad model trained by the authors' own Caffe (Weizmann Horse) gives pycaffe's outputs here.

References: ../shared/data/caffe_models/crfgrad_horse_caffe/val/<stem>.npz (pycaffe's score_pre and
score_post per val image) and val_metrics.json (val mIoU 81.00 -> 83.84 with the CRF)."""
import json
import os

import numpy as np
import pytest

import crfgrad_cupy as cc
from crfgrad_cupy import backend
from oracle_util import DATA

HORSE = os.path.join(DATA, 'caffe_models', 'crfgrad_horse_caffe')
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(HORSE, 'val')), reason='no horse model data')


def _confusion(pred, label, n=2):
    valid = label != 255
    return np.bincount(n * label[valid].astype(np.int64) + pred[valid], minlength=n * n).reshape(n, n)


def _miou(conf):
    iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    return float(iou.mean())


@pytest.mark.parametrize('weights', ['stage2_iter_1200.caffemodel', 'stage2_iter_1200.caffemodel.h5'])
def test_authors_caffe_model_reproduces_pycaffe_on_every_val_image(weights):
    net = cc.Net(os.path.join(HORSE, 'deploy.prototxt'), cc.TEST, weights=os.path.join(HORSE, weights))
    metrics = json.load(open(os.path.join(HORSE, 'val_metrics.json')))
    stems = sorted(f[:-4] for f in os.listdir(os.path.join(HORSE, 'val')) if f.endswith('.npz'))
    assert len(stems) == 50
    conf = {'score_pre': 0, 'score_post': 0}
    agree = {'score_pre': 0, 'score_post': 0}
    total = 0
    worst = {'score_pre': 0.0, 'score_post': 0.0}
    for stem in stems:
        ref = np.load(os.path.join(HORSE, 'val', stem + '.npz'))
        net.forward(data=ref['data'])
        label = ref['label']
        valid = label != 255
        total += int(valid.sum())
        for blob in conf:
            ours = backend.to_numpy(net.blobs[blob].data)
            theirs = ref[blob]
            worst[blob] = max(worst[blob], float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
            pred = ours[0].argmax(0)
            agree[blob] += int((pred == theirs[0].argmax(0))[valid].sum())
            conf[blob] = conf[blob] + _confusion(pred, label)
    for blob in conf:
        assert agree[blob] / total >= 0.999, (blob, agree[blob] / total)
        assert worst[blob] < 1e-3, (blob, worst[blob])
    assert abs(_miou(conf['score_pre']) - metrics['miou_score_pre']) <= 0.001
    assert abs(_miou(conf['score_post']) - metrics['miou_score_post']) <= 0.001
    # and the CRF really helps on this model, as in the authors' Caffe
    assert _miou(conf['score_post']) > _miou(conf['score_pre']) + 0.02
