"""Real trained Caffe models from ../shared/data/caffe_models run and give Caffe's answers."""
import glob
import gzip
import os
import time

import numpy as np
import pytest

import crfgrad_cupy as cc
from crfgrad_cupy.cli import main as cli_main
from oracle_util import DATA

MODELS = os.path.join(DATA, 'caffe_models')
pytestmark = pytest.mark.skipif(not os.path.isdir(MODELS), reason='../shared/data not present')


def _mnist_test():
    with gzip.open(os.path.join(DATA, 'mnist', 't10k-images-idx3-ubyte.gz')) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(os.path.join(DATA, 'mnist', 't10k-labels-idx1-ubyte.gz')) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def test_lenet_mnist_accuracy_and_speed():
    images, labels = _mnist_test()
    d = os.path.join(MODELS, 'lenet_mnist')
    net = cc.Net(os.path.join(d, 'lenet.prototxt'), cc.TEST,
                 weights=os.path.join(d, 'lenet_iter_10000.caffemodel'))
    batch = 500
    t0 = time.time()
    predictions = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].astype(np.float32) * np.float32(0.00390625)
        out = net.forward(data=x)
        predictions.append(np.asarray(out['prob']).argmax(1))
    elapsed = time.time() - t0
    accuracy = float((np.concatenate(predictions) == labels).mean())
    assert accuracy >= 0.990, accuracy          # Caffe's figure: about 99.1 %
    assert elapsed < 60, 'LeNet on 10,000 MNIST images took %.1f s' % elapsed


def _cifar_images():
    from PIL import Image
    names = ['dog10', 'cat10', 'truck10']
    mean = np.array([113.9, 123.0, 125.3], np.float32)[:, None, None]   # BGR
    batch = []
    for n in names:
        rgb = np.asarray(Image.open(os.path.join(MODELS, 'cifar10_quick_v1', 'images', n + '.png'))
                         .convert('RGB'), np.float32)
        batch.append(rgb[:, :, ::-1].transpose(2, 0, 1) - mean)
    return np.stack(batch)


@pytest.mark.parametrize('proto,weights,expected', [
    ('cifar10_bxuan694/cifar10_quick.prototxt', 'cifar10_quick_v1/cifar10_quick_iter_5000.caffemodel',
     [5, 3, 9]),                                  # V1 binary weights; Caffe printed dog, cat, truck
    ('cifar10_bxuan694/cifar10_quick.prototxt', 'cifar10_bxuan694/cifar10_quick_iter_4000.caffemodel',
     [5, 3, 9]),
    ('cifar10_bxuan694/cifar10_quick.prototxt', 'cifar10_bxuan694/cifar10_quick_iter_5000.caffemodel.h5',
     [5, 5, 9]),                                  # HDF5 weights (cat10 is ambiguous for this one)
    ('cifar10_bxuan694/cifar10_full.prototxt', 'cifar10_bxuan694/cifar10_full_iter_60000.caffemodel.h5',
     [5, 2, 9]),                                  # HDF5, with LRN WITHIN_CHANNEL
])
def test_cifar10_predictions(proto, weights, expected):
    net = cc.Net(os.path.join(MODELS, proto), cc.TEST, weights=os.path.join(MODELS, weights))
    out = net.forward(data=_cifar_images())
    prob = np.asarray(out[net.outputs[0]]).reshape(3, -1)
    np.testing.assert_allclose(prob.sum(1), 1, rtol=1e-5)
    assert prob.argmax(1).tolist() == expected


def test_cifar10_v1_prototxt_upgrades():
    d = os.path.join(MODELS, 'cifar10_quick_v1')
    # the V1 prediction net reads an image list with a mean file that is not public: check that it
    # upgrades (V1 enums -> strings, blobs_lr -> lr_mult)
    from crfgrad_cupy.io.prototxt import load_net_param
    param = load_net_param(os.path.join(d, 'prediction_example.prototxt'))
    assert [l.type for l in param.layer][:3] == ['ImageData', 'Convolution', 'Pooling']
    assert [p.lr_mult for p in param.layer[1].param] == [1, 2]


@pytest.mark.parametrize('stage,size,outputs', [
    ('det1', 12, {'prob1': (1, 2, 1, 1), 'conv4-2': (1, 4, 1, 1)}),
    ('det2', 24, {'prob1': (1, 2), 'conv5-2': (1, 4)}),
    ('det3', 48, {'prob1': (1, 2), 'conv6-2': (1, 4), 'conv6-3': (1, 10)}),
])
def test_mtcnn_loads_and_runs(stage, size, outputs):
    from PIL import Image
    d = os.path.join(MODELS, 'mtcnn_v1')
    net = cc.Net(os.path.join(d, stage + '.prototxt'), cc.TEST,
                 weights=os.path.join(d, stage + '.caffemodel'))
    img = Image.open(os.path.join(d, 'test1.jpg')).convert('RGB').resize((size, size), Image.BILINEAR)
    x = (np.asarray(img, np.float32) - 127.5) * 0.0078125
    x = x.transpose(2, 1, 0)[None]          # MATLAB-trained: transposed, RGB
    out = net.forward(data=x)
    for name, shape in outputs.items():
        assert tuple(out[name].shape) == shape
    prob = np.asarray(out['prob1']).reshape(-1)
    np.testing.assert_allclose(prob.sum(), 1, rtol=1e-5)
    # the PReLU slopes really came from the file (not the 0.25 default filler)
    prelu = [n for n in net.params if n.lower().startswith('prelu')][0]
    assert not np.allclose(net.params[prelu][0].data, 0.25)


DEPLOYS = [
    'lenet_mnist/lenet.prototxt', 'cifar10_bxuan694/cifar10_quick.prototxt',
    'cifar10_bxuan694/cifar10_full.prototxt', 'mtcnn_v1/det1.prototxt', 'mtcnn_v1/det2.prototxt',
    'mtcnn_v1/det3.prototxt', 'crfgrad_horse_caffe/deploy.prototxt', 'fcn_voc_fcn32s/deploy.prototxt',
    'fcn_voc_fcn32s/deploy_input_shape_416.prototxt', 'crfgd_filterbank/net_pretrain_deploy.prototxt',
]


@pytest.mark.parametrize('rel', DEPLOYS)
def test_deploy_nets_build_and_print_info(rel, capsys):
    code = cli_main(['info', os.path.join(MODELS, rel)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'layers,' in out and 'parameters' in out


def test_fcn8s_deploy_builds_with_its_real_input_size(capsys):
    path = os.path.join(MODELS, 'fcn_voc_fcn8s', 'deploy.prototxt')
    net = cc.Net(path, cc.TEST)
    assert net.blobs['data'].shape == (1, 3, 500, 500)
    assert net.blobs['score'].shape == (1, 21, 500, 500)
    assert net.params['fc6'][0].shape == (4096, 512, 7, 7)


def test_every_prototxt_parses():
    from crfgrad_cupy.io.prototxt import load_net_param, load_solver_param
    files = sorted(glob.glob(os.path.join(MODELS, '*', '*.prototxt')))
    assert len(files) > 30
    for f in files:
        text = open(f).read()
        if '${' in text:
            continue   # DeepLab templates: covered by the formats tests with substitutions
        if 'solver' in os.path.basename(f):
            load_solver_param(f)
        else:
            load_net_param(f)
