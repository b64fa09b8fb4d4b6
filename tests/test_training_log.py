"""Caffe-format training logs: what our solver writes parses to the same columns as a real
Caffe log; the parser copes with both glog date styles; CSV output; the train/test CLI."""
import logging
import os
import re

import numpy as np
import pytest

import oracle_util
import crfgrad_cupy as cc
from crfgrad_cupy import training_log as TL
from crfgrad_cupy.cli import main as cli_main

REAL_LOGS = os.path.join(oracle_util.DATA, 'caffe_models', 'crfgrad_horse_caffe', 'logs')

# lines of a real `caffe train` log (older glog: no year in the date), crossing New Year
EXCERPT = '''I1231 23:59:50.000000  2057 solver.cpp:289] Solving horse_unary
I1231 23:59:50.100000  2057 solver.cpp:290] Learning Rate Policy: fixed
I1231 23:59:50.200000  2057 solver.cpp:347] Iteration 0, Testing net (#0)
I1231 23:59:53.200000  2057 solver.cpp:414]     Test net output #0: accuracy = 0.457659
I1231 23:59:53.200100  2057 solver.cpp:414]     Test net output #1: loss = 32625.6 (* 1 = 32625.6 loss)
I1231 23:59:54.000000  2057 solver.cpp:239] Iteration 0 (-3.11372e+30 iter/s, 3.739s/20 iters), loss = 47667
I1231 23:59:54.000100  2057 solver.cpp:258]     Train net output #0: loss = 47667 (* 1 = 47667 loss)
I1231 23:59:54.000200  2057 sgd_solver.cpp:112] Iteration 0, lr = 0.001
I0101 00:00:01.000000  2057 solver.cpp:239] Iteration 20 (2.75786 iter/s, 7.252s/20 iters), loss = 27930.3
I0101 00:00:01.000100  2057 solver.cpp:258]     Train net output #0: loss = 5069.95 (* 1 = 5069.95 loss)
I0101 00:00:01.000200  2057 sgd_solver.cpp:112] Iteration 20, lr = 0.001
'''


def test_parse_excerpt_with_new_year(tmp_path):
    p = tmp_path / 'caffe.log'
    p.write_text(EXCERPT)
    t = TL.parse_caffe_log(p)
    assert list(t['train']) == ['iter', 'seconds', 'loss', 'lr', 'output/loss']
    assert t['train']['iter'] == [0, 20]
    assert t['train']['loss'] == [47667.0, 27930.3]
    assert t['train']['output/loss'] == [47667.0, 5069.95]
    assert t['train']['lr'] == [0.001, 0.001]
    assert t['train']['seconds'] == pytest.approx([4.0, 11.0])
    assert list(t['test']) == ['iter', 'seconds', 'net', 'output/accuracy', 'output/loss']
    assert t['test']['output/accuracy'] == [0.457659] and t['test']['output/loss'] == [32625.6]


@pytest.mark.skipif(not os.path.isdir(REAL_LOGS), reason='real Caffe logs not present')
def test_parse_real_caffe_log():
    t = TL.parse_caffe_log(os.path.join(REAL_LOGS, 'train_stage1.log'))
    train, test = t['train'], t['test']
    assert train['iter'][:3] == [0, 20, 40] and train['iter'][-1] == 3000
    assert train['loss'][:2] == [47667.0, 27930.3] and train['output/loss'][1] == 5069.95
    assert all(v == 0.001 for v in train['lr'][:-1])            # the final line carries no lr
    assert test['iter'] == [0, 500, 1000, 1500, 2000, 2500, 3000]
    assert test['output/accuracy'][0] == 0.457659
    assert test['output/accuracy'][-1] == pytest.approx(0.9313, abs=1e-4)
    assert all(b >= a for a, b in zip(train['seconds'], train['seconds'][1:]))


NET = '''
name: "lognet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 4 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 6 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "score"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "score" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
'''


def test_our_log_parses_to_the_columns_of_a_caffe_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'net.prototxt').write_text(NET)
    (tmp_path / 'solver.prototxt').write_text(
        'net: "net.prototxt" type: "SGD" base_lr: 0.1 lr_policy: "fixed" max_iter: 6 display: 2 '
        'test_iter: 2 test_interval: 3 snapshot_after_train: false random_seed: 0\n')
    log_path = tmp_path / 'ours.log'
    s = cc.get_solver('solver.prototxt', log_file=str(log_path))
    try:
        r = np.random.default_rng(0)
        for net in [s.net] + s.test_nets:
            net.blobs['data'].data[...] = r.normal(size=(6, 4))
            net.blobs['label'].data[...] = r.integers(0, 3, size=6)
        s.solve()
    finally:
        s.close()
    text = log_path.read_text()
    first = [ln for ln in text.splitlines() if 'Iteration 2 (' in ln][0]
    assert re.match(r'^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ solver\.py:\d+\] Iteration 2 \([^)]* iter/s, [^)]*s/2 '
                    r'iters\), loss = \S+$', first), first
    assert re.search(r'\]     Train net output #0: loss = \S+ \(\* 1 = \S+ loss\)', text)
    assert re.search(r'\] Iteration 4, lr = 0\.1$', text, re.M)
    assert re.search(r'\] Iteration 3, Testing net \(#0\)$', text, re.M)
    ours = TL.parse_caffe_log(log_path)
    ref = TL.parse_caffe_log(_real_or_excerpt(tmp_path))
    assert list(ours['train']) == list(ref['train'])
    assert list(ours['test']) == list(ref['test'])
    assert ours['train']['iter'] == [0, 2, 4, 6]          # display every 2, plus Solve's final line
    assert ours['test']['iter'] == [0, 3, 6]
    assert ours['train']['lr'][:3] == [0.1, 0.1, 0.1]
    acc = ours['test']['output/accuracy']
    assert all(0 <= a <= 1 for a in acc)
    losses = ours['train']['output/loss'][:3]
    # average_loss 1: the smoothed loss is the last one
    assert np.allclose(ours["train"]["loss"][:3], losses, rtol=1e-5)


def _real_or_excerpt(tmp_path):
    real = os.path.join(REAL_LOGS, 'train_stage2.log')
    if os.path.exists(real):
        return real
    p = tmp_path / 'excerpt.log'
    p.write_text(EXCERPT)
    return p


def test_csv_roundtrip(tmp_path):
    p = tmp_path / 'caffe.log'
    p.write_text(EXCERPT)
    t = TL.parse_caffe_log(p)
    paths = TL.save_csv(t, tmp_path / 'out')
    assert [os.path.basename(x) for x in paths] == ['out.train.csv', 'out.test.csv']
    back = TL.read_csv(paths[0])
    assert list(back) == list(t['train'])
    np.testing.assert_allclose(back['output/loss'], t['train']['output/loss'])


def test_glog_formatter_prefix():
    rec = logging.LogRecord('crfgrad_cupy', logging.WARNING, '/x/solver.py', 42, 'hello %d', (3,), None)
    line = TL.GlogFormatter().format(rec)
    assert re.match(r'^W\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ solver\.py:42\] hello 3$', line)


# --- the command line -----------------------------------------------------------------------------

H5NET = '''
name: "clinet"
layer { name: "d" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
  hdf5_data_param { source: "train.txt" batch_size: 4 shuffle: true } }
layer { name: "d" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
  hdf5_data_param { source: "train.txt" batch_size: 5 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "score"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "score" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
'''


def _cli_setup(tmp_path):
    import h5py
    r = np.random.default_rng(0)
    x = r.normal(size=(20, 3)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    with h5py.File(tmp_path / 'train.h5', 'w') as f:
        f['data'] = x
        f['label'] = y
    (tmp_path / 'train.txt').write_text('train.h5\n')
    (tmp_path / 'net.prototxt').write_text(H5NET)
    (tmp_path / 'solver.prototxt').write_text(
        'net: "net.prototxt" type: "Adam" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" max_iter: 40 '
        'display: 10 test_iter: 4 test_interval: 20 snapshot: 20 snapshot_prefix: "snap" random_seed: 1 '
        'solver_mode: CPU\n')


def test_cli_train_resume_test_and_parse_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _cli_setup(tmp_path)
    assert cli_main(['train', 'solver.prototxt', '--log', 'train.log', '--quiet']) == 0
    assert (tmp_path / 'snap_iter_40.caffemodel').exists() and (tmp_path / 'snap_iter_20.solverstate').exists()
    t = TL.parse_caffe_log('train.log')
    assert t['test']['iter'] == [0, 20, 40]
    assert t['test']['output/accuracy'][-1] >= 0.8
    assert t['train']['loss'][-1] < t['train']['loss'][0]
    # resume from 20 to 40 with another log
    assert cli_main(['train', 'solver.prototxt', '--snapshot', 'snap_iter_20.solverstate', '--log', 'r.log',
                     '--quiet']) == 0
    assert TL.parse_caffe_log('r.log')['train']['iter'][0] == 20
    capsys.readouterr()
    assert cli_main(['test', 'net.prototxt', 'snap_iter_40.caffemodel', '--iterations', '4']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('Loss: ')
    assert any(re.match(r'^accuracy = [\d.]+$', ln) for ln in out)
    assert any(re.match(r'^loss = \S+ \(\* 1 = \S+ loss\)$', ln) for ln in out)
    assert cli_main(['parse-log', 'train.log', 'tables']) == 0
    assert (tmp_path / 'tables.train.csv').exists() and (tmp_path / 'tables.test.csv').exists()


def test_cli_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _cli_setup(tmp_path)
    assert cli_main(['train', 'solver.prototxt', '--weights', 'a', '--snapshot', 'b']) == 2
    (tmp_path / 'bad.prototxt').write_text('net: "net.prototxt" type: "Foo" base_lr: 1 lr_policy: "fixed"\n')
    assert cli_main(['train', 'bad.prototxt', '--quiet']) == 2
    err = capsys.readouterr().err
    assert 'bad.prototxt' in err and "'type'" in err
