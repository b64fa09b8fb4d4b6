"""Solvers: the oracle trajectories of the real Caffe, every update rule and lr policy against
a NumPy reference written from the formulas, iter_size/clipping order, test nets, snapshots
and exact resume, Ctrl-C, and bad solver files."""
import math
import os
import signal

import numpy as np
import pytest

import oracle_util
import crfgrad_cupy as cc
from crfgrad_cupy import CrfGradError
from crfgrad_cupy.proto import caffe_pb2
from crfgrad_cupy.solver import learning_rate


# --- oracle ------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', oracle_util.case_names('solver_'))
def test_oracle_trajectory(name, shared_dir):
    """5 x step(1) of the real Caffe: weights, applied update, loss and lr after every step."""
    c = oracle_util.case(name)
    solver = cc.get_solver(oracle_util.path(c['files']['solver_prototxt']))
    z = np.load(oracle_util.path(c['files']['npz']))
    xp = cc.backend.xp()     # NumPy, or CuPy when tools/gpu_check.py runs this on the GPU
    for i in range(2):
        solver.net.params['conv'][i].data[...] = xp.asarray(z['param/conv/%d/iter0' % i])
    steps = sum(1 for k in z.files if k.startswith('loss/'))
    assert steps == 5
    for k in range(steps):
        solver.net.blobs['data'].data[...] = xp.asarray(z['input/data/iter%d' % k])
        solver.net.blobs['label'].data[...] = xp.asarray(z['input/label/iter%d' % k])
        oracle_util.assert_close(solver.lr, z['lr/iter%d' % k], rtol=1e-6, atol=0, what='lr %d' % k)
        solver.step(1)
        assert solver.iter == k + 1
        oracle_util.assert_close(solver.last_lr, z['lr/iter%d' % k], rtol=1e-6, atol=0, what='lr %d' % k)
        oracle_util.assert_close(solver.last_loss, z['loss/iter%d' % k], rtol=1e-5, atol=0, what='loss %d' % k)
        for i in range(2):
            p = solver.net.params['conv'][i]
            oracle_util.assert_close(p.data, z['param/conv/%d/iter%d' % (i, k + 1)], rtol=1e-5, atol=0,
                                     what='weights %d after step %d' % (i, k))
            oracle_util.assert_close(p.diff, z['param_diff/conv/%d/iter%d' % (i, k)], rtol=1e-5, atol=0,
                                     what='update %d of step %d' % (i, k))


# --- a small net and a NumPy reference of the rules ----------------------------------------------

NET = '''
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 5 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "score"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "score" top: "score2"
  param { lr_mult: 0.5 decay_mult: 3 }
  inner_product_param { num_output: 3 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score2" bottom: "label" top: "loss" }
'''


def write_solver(tmp_path, body, net=NET, name='solver.prototxt'):
    (tmp_path / 'net.prototxt').write_text(net)
    path = tmp_path / name
    path.write_text('net: "%s"\n%s' % (tmp_path / 'net.prototxt', body))
    return str(path)


def feed(solver, k):
    from crfgrad_cupy import backend
    r = np.random.default_rng(100 + k)
    xp = backend.xp()
    solver.net.blobs['data'].data[...] = xp.asarray(r.normal(size=(4, 5)))
    solver.net.blobs['label'].data[...] = xp.asarray(r.integers(0, 3, size=4))


def ref_rate(policy, it, sp):
    """Rates written from the policy table; multistep counts the stepvalues passed."""
    base, gamma, power = sp['base_lr'], sp.get('gamma', 0), sp.get('power', 0)
    if policy == 'fixed':
        return base
    if policy == 'step':
        return base * gamma ** (it // sp['stepsize'])
    if policy == 'exp':
        return base * gamma ** it
    if policy == 'inv':
        return base * (1 + gamma * it) ** (-power)
    if policy == 'multistep':
        return base * gamma ** sum(1 for v in sp['stepvalue'] if it >= v)
    if policy == 'poly':
        return base * (1 - it / sp['max_iter']) ** power
    if policy == 'sigmoid':
        return base / (1 + math.exp(-gamma * (it - sp['stepsize'])))
    raise ValueError(policy)


class RefRule:
    """The update rules from the formulas, in float64; ``step(g, w, lr, it)`` returns the step."""

    def __init__(self, kind, sp, shapes):
        self.kind, self.sp = kind, sp
        self.h = [np.zeros(s) for s in shapes]
        self.h2 = [np.zeros(s) for s in shapes]

    def step(self, i, g, lr, it):
        sp, h, h2 = self.sp, self.h, self.h2
        mu, delta = sp.get('momentum', 0.0), sp.get('delta', 1e-8)
        if self.kind == 'SGD':
            h[i] = mu * h[i] + lr * g
            return h[i]
        if self.kind == 'Nesterov':
            old = h[i]
            h[i] = mu * h[i] + lr * g
            return (1 + mu) * h[i] - mu * old
        if self.kind == 'AdaGrad':
            h[i] = h[i] + g ** 2
            return lr * g / (np.sqrt(h[i]) + delta)
        if self.kind == 'RMSProp':
            d = sp['rms_decay']
            h[i] = d * h[i] + (1 - d) * g ** 2
            return lr * g / (np.sqrt(h[i]) + delta)
        if self.kind == 'AdaDelta':
            h[i] = mu * h[i] + (1 - mu) * g ** 2
            u = g * np.sqrt((h2[i] + delta) / (h[i] + delta))
            h2[i] = mu * h2[i] + (1 - mu) * u ** 2
            return lr * u
        if self.kind == 'Adam':
            b1, b2, t = mu, sp['momentum2'], it + 1
            h[i] = b1 * h[i] + (1 - b1) * g
            h2[i] = b2 * h2[i] + (1 - b2) * g ** 2
            return lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * h[i] / (np.sqrt(h2[i]) + delta)
        raise ValueError(self.kind)


def proto_text(d):
    lines = []
    for k, v in d.items():
        for item in (v if isinstance(v, list) else [v]):
            lines.append('%s: %s' % (k, '"%s"' % item if isinstance(item, str) else repr(item)))
    return '\n'.join(lines) + '\n'


CASES = [
    ('SGD', dict(lr_policy='step', base_lr=0.1, gamma=0.5, stepsize=3, momentum=0.9, weight_decay=0.01)),
    ('Nesterov', dict(lr_policy='inv', base_lr=0.1, gamma=0.1, power=0.75, momentum=0.8, weight_decay=0.02)),
    ('AdaGrad', dict(lr_policy='exp', base_lr=0.2, gamma=0.9, weight_decay=0.01, delta=1e-6)),
    ('RMSProp', dict(lr_policy='poly', base_lr=0.02, power=2.0, max_iter=10, rms_decay=0.9, delta=1e-6,
                     weight_decay=0.01)),
    ('AdaDelta', dict(lr_policy='sigmoid', base_lr=1.0, gamma=0.5, stepsize=4, momentum=0.95, delta=1e-6,
                      weight_decay=0.01)),
    ('Adam', dict(lr_policy='multistep', base_lr=0.01, gamma=0.3, stepvalue=[2, 5, 7], momentum=0.9,
                  momentum2=0.99, delta=1e-8, weight_decay=0.01)),
    ('SGD', dict(lr_policy='fixed', base_lr=0.1, momentum=0.5, weight_decay=0.05, regularization_type='L1',
                 clip_gradients=0.3)),
    ('Adam', dict(lr_policy='fixed', base_lr=0.01, momentum=0.9, momentum2=0.999, delta=1e-8, iter_size=2,
                  clip_gradients=0.5, weight_decay=0.001)),
]


@pytest.mark.parametrize('kind,sp', CASES, ids=['%s-%s%s' % (k, s['lr_policy'], '-clip' if 'clip_gradients' in s
                                                               else '') for k, s in CASES])
def test_rule_against_numpy_reference(tmp_path, kind, sp):
    """8 iterations; the raw accumulated gradient is taken from the on_gradients_ready callback and
    the reference applies clip -> /iter_size -> weight decay -> rule -> w -= step."""
    full = dict(sp, type=kind, max_iter=sp.get('max_iter', 8))
    solver = cc.get_solver(write_solver(tmp_path, proto_text(full)))
    assert type(solver).__name__ == kind + 'Solver'
    params = solver.net.learnable_params
    assert [tuple(p.shape) for p in params] == [(3, 5), (3,), (3, 3)]
    lr_mult, decay_mult = [1.0, 2.0, 0.5], [1.0, 0.0, 3.0]
    w = [p.data.astype(np.float64) for p in params]
    ref = RefRule(kind, full, [p.shape for p in params])
    grads = []
    solver.add_callback(on_gradients_ready=lambda: grads.append([p.diff.astype(np.float64) for p in params]))
    iter_size, clip = full.get('iter_size', 1), full.get('clip_gradients', -1)
    wd, reg = full.get('weight_decay', 0.0), full.get('regularization_type', 'L2')
    for it in range(8):
        feed(solver, it)
        solver.step(1)
        g = grads[-1]
        if clip >= 0:
            norm = math.sqrt(sum(float((x ** 2).sum()) for x in g))
            if norm > clip:
                g = [x * clip / norm for x in g]
        rate = ref_rate(full['lr_policy'], it, full)
        assert solver.last_lr == pytest.approx(rate, rel=1e-6)
        for i in range(3):
            gi = g[i] / iter_size
            gi = gi + wd * decay_mult[i] * (w[i] if reg == 'L2' else np.sign(w[i]))
            w[i] = w[i] - ref.step(i, gi, rate * lr_mult[i], it)
            oracle_util.assert_close(params[i].data, w[i], rtol=1e-5, atol=1e-7,
                                     what='%s param %d iter %d' % (kind, i, it))
            w[i] = params[i].data.astype(np.float64)    # follow the float32 trajectory


def test_lr_policies_against_formulas():
    table = {
        'fixed': dict(base_lr=0.1),
        'step': dict(base_lr=0.1, gamma=0.5, stepsize=4),
        'exp': dict(base_lr=0.1, gamma=0.95),
        'inv': dict(base_lr=0.1, gamma=1e-2, power=0.75),
        'multistep': dict(base_lr=0.1, gamma=0.1, stepvalue=[3, 7, 12]),
        'poly': dict(base_lr=0.1, power=0.9, max_iter=20),
        'sigmoid': dict(base_lr=0.1, gamma=0.5, stepsize=10),
    }
    for policy, d in table.items():
        sp = caffe_pb2.SolverParameter(lr_policy=policy, **d)
        current = 0
        for it in range(20):
            rate, current = learning_rate(sp, it, current)
            assert rate == pytest.approx(ref_rate(policy, it, dict(d, stepvalue=list(d.get('stepvalue', [])))),
                                         rel=1e-6), (policy, it)


def test_multistep_advances_one_step_per_iteration():
    """Caffe moves current_step by at most one per call: equal stepvalues take two iterations."""
    sp = caffe_pb2.SolverParameter(lr_policy='multistep', base_lr=1.0, gamma=0.5, stepvalue=[2, 2, 2])
    steps = []
    current = 0
    for it in range(6):
        _, current = learning_rate(sp, it, current)
        steps.append(current)
    assert steps == [0, 0, 1, 2, 3, 3]


def test_iter_size_equals_one_big_step_with_constant_data(tmp_path):
    """With the same inputs in both passes, iter_size 2 averages two equal gradients: same trajectory."""
    a = cc.get_solver(write_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                                             'random_seed: 3\n', name='a.prototxt'))
    b = cc.get_solver(write_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                                             'iter_size: 2 random_seed: 3\n', name='b.prototxt'))
    for k in range(4):
        feed(a, k)
        feed(b, k)
        a.step(1)
        b.step(1)
        assert b.last_loss == pytest.approx(a.last_loss, rel=1e-6)
    for pa, pb in zip(a.net.learnable_params, b.net.learnable_params):
        np.testing.assert_allclose(pb.data, pa.data, rtol=1e-5, atol=1e-7)


def test_lr_mult_zero_keeps_weights_but_histories_move(tmp_path):
    net = NET.replace('param { lr_mult: 0.5 decay_mult: 3 }', 'param { lr_mult: 0 decay_mult: 3 }')
    s = cc.get_solver(write_solver(tmp_path, 'type: "Adam" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                                             'weight_decay: 0.1\n', net=net))
    w0 = s.net.params['ip2'][0].data.copy()
    for k in range(3):
        feed(s, k)
        s.step(1)
    np.testing.assert_array_equal(s.net.params['ip2'][0].data, w0)
    assert np.abs(s.history[2]).max() > 0          # the gradient and decay still reach Adam's m


# --- train/test loop ------------------------------------------------------------------------------

TEST_NET = '''
name: "tt"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 4 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 6 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "score"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "score" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" loss_weight: 2 }
'''


def test_test_nets_share_weights_and_average_outputs(tmp_path):
    path = write_solver(tmp_path, 'type: "SGD" base_lr: 0.5 lr_policy: "fixed" test_iter: 3 test_interval: 2 '
                                  'test_initialization: false max_iter: 4 display: 1 random_seed: 1 '
                                  'snapshot_after_train: false\n', net=TEST_NET)
    s = cc.get_solver(path)
    assert len(s.test_nets) == 1
    t = s.test_nets[0]
    assert 'acc' in t.layer_dict and 'acc' not in s.net.layer_dict
    assert t.params['ip'][0] is s.net.params['ip'][0]
    r = np.random.default_rng(0)
    x, y = r.normal(size=(6, 4)), r.integers(0, 3, size=6)
    for net in (s.net, t):
        net.blobs['data'].data[...] = x
        net.blobs['label'].data[...] = y
    s.step(2)                       # no test at iter 0 (test_initialization false)
    assert s.test_results[0] is None
    s.step(1)                       # iteration 2 tests first, then updates
    res = s.test_results[0]
    assert set(res) == {'accuracy', 'loss'}
    # the same run stopped after 2 updates: its test net's forward is what the test at iter 2 saw
    # (the Input blobs are the same on every test pass, so the mean over test_iter is one pass)
    s2 = cc.get_solver(path)
    for net in (s2.net, s2.test_nets[0]):
        net.blobs['data'].data[...] = x
        net.blobs['label'].data[...] = y
    s2.step(2)
    out = s2.test_nets[0].forward()
    assert res['accuracy'][0] == pytest.approx(float(out['accuracy']), rel=1e-6)
    assert res['loss'][0] == pytest.approx(float(out['loss']), rel=1e-6)
    assert not np.array_equal(s.net.params['ip'][0].data, s2.net.params['ip'][0].data)


def test_smoothed_loss_is_running_mean(tmp_path):
    s = cc.get_solver(write_solver(tmp_path, 'type: "SGD" base_lr: 0.01 lr_policy: "fixed" average_loss: 3\n'))
    losses = []
    for k in range(6):
        feed(s, k)
        s.step(1)
        losses.append(s.last_loss)
        assert s.smoothed_loss == pytest.approx(s.last_loss)   # step() starts a fresh average
    feed(s, 0)
    seen = []
    s.add_callback(on_gradients_ready=lambda: seen.append(s.last_loss))
    s.step(5)
    assert s.smoothed_loss == pytest.approx(np.mean(seen[-3:]), rel=1e-6)


def test_solve_runs_to_max_iter_and_snapshots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_solver(tmp_path, 'type: "Nesterov" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" max_iter: 5 '
                                  'snapshot: 2 snapshot_prefix: "snap/run"\n')
    (tmp_path / 'snap').mkdir()
    s = cc.get_solver(path)
    feed(s, 0)
    s.solve()
    assert s.iter == 5
    names = sorted(os.listdir(tmp_path / 'snap'))
    assert names == ['run_iter_2.caffemodel', 'run_iter_2.solverstate', 'run_iter_4.caffemodel',
                     'run_iter_4.solverstate', 'run_iter_5.caffemodel', 'run_iter_5.solverstate']
    net = cc.Net(str(tmp_path / 'net.prototxt'), cc.TRAIN, weights='snap/run_iter_5.caffemodel')
    for a, b in zip(net.learnable_params, s.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)


def test_default_snapshot_prefix_is_the_solver_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" max_iter: 1\n', name='mysolver.prototxt')
    s = cc.get_solver(path)
    assert s.param.snapshot_prefix == str(tmp_path / 'mysolver')
    feed(s, 0)
    s.solve()
    assert (tmp_path / 'mysolver_iter_1.caffemodel').exists()


# --- resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind,fmt', [('SGD', 'BINARYPROTO'), ('Adam', 'HDF5'), ('AdaDelta', 'BINARYPROTO')])
def test_restore_continues_exactly(tmp_path, kind, fmt, monkeypatch):
    """10 iterations with a snapshot at 5 == restore(iter 5) + 5 more, bit for bit."""
    monkeypatch.chdir(tmp_path)
    extra = {'SGD': 'momentum: 0.9 lr_policy: "multistep" gamma: 0.5 stepvalue: 3 stepvalue: 7',
             'Adam': 'momentum: 0.9 momentum2: 0.999 lr_policy: "fixed"',
             'AdaDelta': 'momentum: 0.95 delta: 1e-6 lr_policy: "fixed"'}[kind]
    body = 'type: "%s" base_lr: 0.05 weight_decay: 0.01 %s max_iter: 10 snapshot: 5 snapshot_prefix: "%s" ' \
           'snapshot_format: %s random_seed: 7\n' % (kind, extra, tmp_path / 'r', fmt)
    path = write_solver(tmp_path, body)
    a = cc.get_solver(path)
    for k in range(10):
        feed(a, k)
        a.step(1)
    ext = '.solverstate.h5' if fmt == 'HDF5' else '.solverstate'
    state = tmp_path / ('r_iter_5' + ext)
    assert state.exists() and (tmp_path / ('r_iter_10' + ext)).exists()
    b = cc.get_solver(path.replace('random_seed: 7', ''))     # different random init, overwritten by restore
    b.restore(str(state))
    assert b.iter == 5
    if kind == 'SGD':
        assert b.current_step == 1
    for k in range(5, 10):
        feed(b, k)
        b.step(1)
    for pa, pb in zip(a.net.learnable_params, b.net.learnable_params):
        np.testing.assert_array_equal(pb.data, pa.data)
    for ha, hb in zip(a.history, b.history):
        np.testing.assert_array_equal(hb, ha)


def test_restore_rejects_wrong_history_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" snapshot_prefix: "x"\n')
    s = cc.get_solver(path)
    feed(s, 0)
    s.step(1)
    _, state = s.snapshot()
    adam = cc.AdamSolver(path)
    with pytest.raises(CrfGradError, match='history'):
        adam.restore(state)


def test_solverstate_hdf5_layout(tmp_path, monkeypatch):
    import h5py
    monkeypatch.chdir(tmp_path)
    s = cc.get_solver(write_solver(tmp_path, 'type: "Adam" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                                             'snapshot_prefix: "h" snapshot_format: HDF5\n'))
    feed(s, 0)
    s.step(1)
    model, state = s.snapshot()
    assert model == 'h_iter_1.caffemodel.h5' and state == 'h_iter_1.solverstate.h5'
    with h5py.File(state, 'r') as f:
        assert f['iter'].shape == (1,) and int(f['iter'][0]) == 1
        assert int(f['current_step'][0]) == 0
        assert f['learned_net'][()] == b'h_iter_1.caffemodel.h5'
        assert sorted(f['history'].keys(), key=int) == [str(i) for i in range(6)]
        np.testing.assert_array_equal(f['history/0'][()], s.history[0])
    with h5py.File(model, 'r') as f:
        np.testing.assert_array_equal(f['data/ip/0'][()], s.net.params['ip'][0].data)


def test_binary_solverstate_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = cc.get_solver(write_solver(tmp_path, 'type: "SGD" base_lr: 0.1 momentum: 0.9 lr_policy: "step" '
                                             'gamma: 0.1 stepsize: 2 snapshot_prefix: "b"\n'))
    for k in range(3):
        feed(s, k)
        s.step(1)
    _, state = s.snapshot()
    st = caffe_pb2.SolverState()
    st.ParseFromString(open(state, 'rb').read())
    assert st.iter == 3 and st.learned_net == 'b_iter_3.caffemodel' and st.current_step == 1
    assert len(st.history) == 3 and list(st.history[0].shape.dim) == [3, 5]
    np.testing.assert_array_equal(np.array(st.history[0].data, np.float32).reshape(3, 5), s.history[0])


# --- interruption --------------------------------------------------------------------------------

def test_keyboard_interrupt_in_a_callback_leaves_a_usable_snapshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_solver(tmp_path, 'type: "SGD" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" max_iter: 10 '
                                  'snapshot_prefix: "int" random_seed: 5\n')
    ref = cc.get_solver(path)
    for k in range(6):
        feed(ref, k)
        ref.step(1)
    s = cc.get_solver(path)

    def on_start():
        if s.iter == 3:
            raise KeyboardInterrupt
        feed(s, s.iter)
    s.add_callback(on_start=on_start)
    with pytest.raises(KeyboardInterrupt):
        s.solve()
    assert s.iter == 3 and (tmp_path / 'int_iter_3.solverstate').exists()
    r = cc.get_solver(path)
    r.restore('int_iter_3.solverstate')
    for k in range(3, 6):
        feed(r, k)
        r.step(1)
    for pa, pb in zip(ref.net.learnable_params, r.net.learnable_params):
        np.testing.assert_array_equal(pb.data, pa.data)


def test_sigint_finishes_the_iteration_then_snapshots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_solver(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed" max_iter: 10 '
                                  'snapshot_prefix: "sig"\n')
    s = cc.get_solver(path)
    feed(s, 0)
    s.add_callback(on_gradients_ready=lambda: os.kill(os.getpid(), signal.SIGINT) if s.iter == 2 else None)
    with pytest.raises(KeyboardInterrupt):
        s.solve()
    assert s.iter == 3                                     # the update of iteration 2 was applied
    assert (tmp_path / 'sig_iter_3.caffemodel').exists()
    assert not (tmp_path / 'sig_iter_10.caffemodel').exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize('body,field', [
    ('type: "Adamax" base_lr: 0.1 lr_policy: "fixed"', 'type'),
    ('type: "SGD" base_lr: 0.1 lr_policy: "cosine"', 'lr_policy'),
    ('type: "SGD" base_lr: 0.1', 'lr_policy'),
    ('type: "SGD" base_lr: 0.1 lr_policy: "step"', 'stepsize'),
    ('type: "AdaGrad" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9', 'momentum'),
    ('type: "RMSProp" base_lr: 0.1 lr_policy: "fixed" rms_decay: 1.5', 'rms_decay'),
    ('type: "SGD" base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.1 regularization_type: "L3"',
     'regularization_type'),
    ('type: "SGD" base_lr: 0.1 lr_policy: "fixed" test_iter: 2', 'test_interval'),
    ('type: "SGD" base_lr: 0.1 lr_policy: "fixed" snapshot: 10 snapshot_prefix: "/nonexistent/dir/x"',
     'snapshot_prefix'),
])
def test_bad_solver_files(tmp_path, body, field):
    path = write_solver(tmp_path, body + '\n')
    with pytest.raises(CrfGradError) as e:
        cc.get_solver(path)
    assert e.value.field == field
    assert str(path) in str(e.value)


def test_missing_net_file_names_it(tmp_path):
    path = tmp_path / 's.prototxt'
    path.write_text('net: "nothere.prototxt" base_lr: 0.1 lr_policy: "fixed"\n')
    with pytest.raises(CrfGradError, match='nothere.prototxt'):
        cc.get_solver(str(path))


def test_net_path_falls_back_to_the_solver_folder(tmp_path, monkeypatch):
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'net.prototxt').write_text(NET)
    (tmp_path / 'sub' / 's.prototxt').write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed"\n')
    monkeypatch.chdir(tmp_path)
    s = cc.SGDSolver('sub/s.prototxt')
    assert s.net.name == 'tiny'


def test_python_fed_training_lowers_the_loss(tmp_path):
    s = cc.get_solver(write_solver(tmp_path, 'type: "SGD" base_lr: 0.5 momentum: 0.9 lr_policy: "fixed"\n'))
    feed(s, 0)
    s.step(1)
    first = s.last_loss
    s.step(30)
    assert s.last_loss < 0.5 * first


# --- GPU ----------------------------------------------------------------------------------------

def _gpu():
    from crfgrad_cupy import backend
    return backend.cupy_available()


@pytest.mark.skipif(not _gpu(), reason='needs CuPy and a CUDA device')
@pytest.mark.parametrize('kind,sp', [CASES[0], CASES[5], CASES[7]], ids=['SGD', 'Adam', 'Adam-iter_size-clip'])
def test_gpu_training_matches_cpu(tmp_path, monkeypatch, kind, sp):
    """The same run on NumPy and on CuPy (snapshot + restore on the GPU included)."""
    from crfgrad_cupy import backend
    monkeypatch.chdir(tmp_path)
    full = dict(sp, type=kind, max_iter=6, random_seed=11, snapshot=3, snapshot_prefix='g')
    path = write_solver(tmp_path, proto_text(full))
    results = []
    for mode in ('cpu', 'gpu'):
        backend.set_mode_gpu() if mode == 'gpu' else backend.set_mode_cpu()
        s = cc.get_solver(path)
        for k in range(6):
            feed(s, k)
            s.step(1)
        results.append([backend.to_numpy(p.data) for p in s.net.learnable_params])
        if mode == 'gpu':
            assert type(s.net.learnable_params[0].data).__module__.startswith('cupy')
            r = cc.get_solver(path)
            r.restore('g_iter_3.solverstate')
            for k in range(3, 6):
                feed(r, k)
                r.step(1)
            for a, b in zip(s.net.learnable_params, r.net.learnable_params):
                np.testing.assert_array_equal(backend.to_numpy(a.data), backend.to_numpy(b.data))
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_inline_net_param_and_states(tmp_path):
    """net_param inline; train_state/test_state stages select layers (Caffe's NetState merge)."""
    net = TEST_NET.replace('include { phase: TEST }', 'include { stage: "val" }')
    body = 'net_param { %s }\ntype: "SGD" base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_iter: 1 ' \
           'test_interval: 5 test_state { stage: "val" } test_state { } train_state { stage: "val" }\n' % net
    path = tmp_path / 's.prototxt'
    path.write_text(body)
    s = cc.get_solver(str(path))
    assert 'acc' in s.net.layer_dict
    assert len(s.test_nets) == 2
    assert 'acc' in s.test_nets[0].layer_dict and 'acc' not in s.test_nets[1].layer_dict
    assert s.test_nets[1].phase == cc.TEST and s.net.phase == cc.TRAIN
