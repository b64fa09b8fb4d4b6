"""`crfgrad convert ...` and the thin converters/ scripts."""
import os
import subprocess
import sys

import numpy as np
import pytest

from oracle_util import DATA, assert_close

from crfgrad_cupy.cli import main
from crfgrad_cupy.convert.matconvnet import mcn_to_caffe_data
from crfgrad_cupy.convert.matfile import load_mat
from crfgrad_cupy.net import TEST, Net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(DATA, 'matconvnet', '06_dagnn_crf_unary')
LENET = os.path.join(DATA, 'caffe_models', 'lenet_mnist')


def test_convert_matconvnet_command(tmp_path, capsys):
    if not os.path.isdir(FIXTURE):
        pytest.skip('fixtures not present')
    prefix = str(tmp_path / 'out' / 'unary')
    assert main(['convert', 'matconvnet', os.path.join(FIXTURE, 'net.mat'), prefix,
                 '--input-shape', '1,3,13,17']) == 0
    assert 'DagNN' in capsys.readouterr().out
    net = Net(prefix + '.prototxt', prefix + '.caffemodel', TEST)
    x = load_mat(os.path.join(FIXTURE, 'input.mat'))['x']
    out = net.forward(data=mcn_to_caffe_data(x))['prob']
    assert_close(out, mcn_to_caffe_data(load_mat(os.path.join(FIXTURE, 'expected.mat'))['y']),
                 rtol=1e-4, atol=1e-6, what='prob')


def test_convert_weights_and_to_dagnn_commands(tmp_path):
    model = os.path.join(LENET, 'lenet_iter_10000.caffemodel')
    proto = os.path.join(LENET, 'lenet.prototxt')
    if not os.path.exists(model):
        pytest.skip('lenet not present')
    mat = str(tmp_path / 'lenet.mat')
    assert main(['convert', 'weights', model, mat, '--axis-order', 'matconvnet', '--mat-version', '5']) == 0
    import scipy.io
    w = scipy.io.loadmat(mat)['weights'][0, 0]['conv1'][0, 0]
    assert w.shape == (5, 5, 1, 20)
    back = str(tmp_path / 'back.caffemodel')
    assert main(['convert', 'weights', mat, back, '--proto', proto]) == 0
    x = np.random.default_rng(0).uniform(0, 1, (1, 1, 28, 28)).astype(np.float32)
    a = Net(proto, model, TEST).forward(data=x)['prob']
    b = Net(proto, back, TEST).forward(data=x)['prob']
    assert np.array_equal(a, b)
    dag = str(tmp_path / 'lenet_dag.mat')
    assert main(['convert', 'to-dagnn', proto, dag, '--weights', model]) == 0
    assert main(['convert', 'matconvnet', dag, str(tmp_path / 'again')]) == 0
    c = Net(str(tmp_path / 'again.prototxt'), str(tmp_path / 'again.caffemodel'), TEST)
    out = c.forward(data=x)[c.outputs[-1]]
    assert_close(out.reshape(a.shape), a, rtol=1e-5, atol=1e-6, what='prob')


def test_convert_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / 'junk.mat'
    bad.write_bytes(b'junk' * 100)
    assert main(['convert', 'matconvnet', str(bad), str(tmp_path / 'x')]) == 2
    err = capsys.readouterr().err
    assert 'junk.mat' in err and 'not a MATLAB .mat file' in err
    assert main(['convert', 'weights', str(tmp_path / 'missing.caffemodel'), str(tmp_path / 'x.npz')]) == 2
    with pytest.raises(SystemExit):
        main(['convert', 'matconvnet', str(bad), 'x', '--input-shape', '1,2,3'])


def test_converter_script_runs(tmp_path):
    if not os.path.isdir(FIXTURE):
        pytest.skip('fixtures not present')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'converters', 'matconvnet_to_caffe.py'),
                        os.path.join(FIXTURE, 'net.mat'), str(tmp_path / 'n')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'n.prototxt').exists() and (tmp_path / 'n.caffemodel').exists()
