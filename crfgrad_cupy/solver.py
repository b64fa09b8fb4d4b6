"""Caffe's solvers with pycaffe's API.

    solver = crfgrad_cupy.get_solver('solver.prototxt')   # type from the file
    solver.net.blobs['data'].data[...] = x                  # Python-fed nets (Input layers)
    solver.step(10)                                         # or solver.solve()
    solver.snapshot(); solver.restore('x_iter_10.solverstate')

One iteration follows Caffe's Solver::Step exactly: zero the parameter diffs; test when
``iter % test_interval == 0``; ``iter_size`` forward/backward passes (diffs accumulate, the
loss is averaged); then ApplyUpdate: rate = policy(iter), global-norm gradient clipping,
and for each learnable parameter Normalize (diff /= iter_size) -> Regularize (L2/L1 weight
decay times decay_mult) -> ComputeUpdateValue (the rule of the solver type, leaving the step
in the diff) -> Net::Update (w -= diff); iter += 1; snapshot every ``snapshot`` iterations.

The update rules (g: the regularized gradient, lr = rate * lr_mult, histories start at 0):

* SGD:      h = mu*h + lr*g;  w -= h
* Nesterov: h' = mu*h + lr*g; w -= (1+mu)*h' - mu*h
* AdaGrad:  h += g^2;  w -= lr * g / (sqrt(h) + delta)
* RMSProp:  h = d*h + (1-d)*g^2;  w -= lr * g / (sqrt(h) + delta)        (d = rms_decay)
* AdaDelta: h = mu*h + (1-mu)*g^2;  u = g*sqrt((hu+delta)/(h+delta));
            hu = mu*hu + (1-mu)*u^2;  w -= lr*u
* Adam:     m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;
            w -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+delta),  t = iter+1

Snapshots are named ``<snapshot_prefix>_iter_<iter>.caffemodel`` + ``.solverstate`` (or
``.caffemodel.h5`` + ``.solverstate.h5`` with ``snapshot_format: HDF5``) and hold what
Caffe's hold (SolverState: iter, learned_net, history, current_step).  Ctrl-C during
``step``/``solve`` finishes the running iteration, writes a snapshot and raises
KeyboardInterrupt (a KeyboardInterrupt raised inside a layer or callback snapshots too).
"""
import collections
import logging
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from . import backend
from .errors import CrfGradError
from .proto import caffe_pb2
from .io.atomic import atomic_path, write_bytes_atomic

log = logging.getLogger('crfgrad_cupy.solver')

LR_POLICIES = ('fixed', 'step', 'exp', 'inv', 'multistep', 'poly', 'sigmoid')
REGULARIZATION_TYPES = ('L2', 'L1')


# --- learning-rate policies (pure) -----------------------------------------------------------

def learning_rate(sp, it, current_step=0):
    """Caffe's GetLearningRate at iteration ``it`` (updates done so far).

    Returns ``(rate, current_step)``: ``step`` sets current_step = floor(it/stepsize);
    ``multistep`` advances it by at most one per call when ``it >= stepvalue[current_step]``
    (so it must be called once per iteration, as the solver does).
    """
    policy = sp.lr_policy
    base = float(sp.base_lr)
    gamma = float(sp.gamma)
    if policy == 'fixed':
        rate = base
    elif policy == 'step':
        current_step = it // int(sp.stepsize)
        rate = base * gamma ** current_step
    elif policy == 'exp':
        rate = base * gamma ** it
    elif policy == 'inv':
        rate = base * (1.0 + gamma * it) ** (-float(sp.power))
    elif policy == 'multistep':
        if current_step < len(sp.stepvalue) and it >= sp.stepvalue[current_step]:
            current_step += 1
            log.info('MultiStep Status: Iteration %d, step = %d', it, current_step)
        rate = base * gamma ** current_step
    elif policy == 'poly':
        rate = base * (1.0 - float(it) / float(sp.max_iter)) ** float(sp.power)
    elif policy == 'sigmoid':
        rate = base * (1.0 / (1.0 + math.exp(-gamma * (float(it) - float(sp.stepsize)))))
    else:
        raise CrfGradError('unknown learning rate policy %r (known: %s)' % (policy, ', '.join(LR_POLICIES)),
                           field='lr_policy')
    return rate, current_step


def check_lr_policy(sp, source=None):
    """The checks Caffe makes when it first computes the rate, done up front."""
    policy = sp.lr_policy
    if policy not in LR_POLICIES:
        what = 'lr_policy is not set' if not sp.HasField('lr_policy') else \
            'unknown learning rate policy %r' % policy
        raise CrfGradError('%s (known: %s)' % (what, ', '.join(LR_POLICIES)), file=source,
                           field='lr_policy')
    if policy in ('step', 'sigmoid') and sp.stepsize <= 0:
        raise CrfGradError('lr_policy "%s" needs stepsize > 0' % policy, file=source, field='stepsize')
    if policy in ('step', 'exp', 'inv', 'multistep', 'sigmoid') and sp.gamma < 0:
        raise CrfGradError('lr_policy "%s" needs gamma >= 0' % policy, file=source, field='gamma')
    if policy == 'poly' and sp.max_iter <= 0:
        raise CrfGradError('lr_policy "poly" needs max_iter > 0', file=source, field='max_iter')


# --- update rules (pure, in place on arrays) ----------------------------------------------

def regularize(diff, data, local_decay, kind):
    """diff += local_decay * w (L2) or local_decay * sign(w) (L1); nothing when the decay is 0."""
    if not local_decay:
        return
    if kind == 'L2':
        diff += local_decay * data
    elif kind == 'L1':
        xp = backend.get_array_module(data)
        diff += local_decay * xp.sign(data)
    else:
        raise CrfGradError('unknown regularization type %r (L1 or L2)' % kind, field='regularization_type')


def clip_gradients(diffs, threshold):
    """Scale all diffs by threshold/||g|| when the global L2 norm ||g|| exceeds threshold.

    Returns the norm (None when clipping is off, threshold < 0)."""
    if threshold < 0:
        return None
    sumsq = 0.0
    for d in diffs:
        sumsq += float((d * d).sum())
    norm = math.sqrt(sumsq)
    if norm > threshold:
        scale = threshold / norm
        log.info('Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale factor %g',
                 norm, threshold, scale)
        for d in diffs:
            d *= d.dtype.type(scale)
    return norm


def sgd_update(g, h, local_rate, momentum):
    """h = momentum*h + lr*g; g <- h (the step)."""
    h *= momentum
    h += local_rate * g
    g[...] = h


def nesterov_update(g, h, local_rate, momentum):
    """h' = momentum*h + lr*g; g <- (1+momentum)*h' - momentum*h."""
    h_old = h.copy()
    h *= momentum
    h += local_rate * g
    h_old *= -momentum
    h_old += (1.0 + momentum) * h
    g[...] = h_old


def adagrad_update(g, h, local_rate, delta):
    """h += g^2; g <- lr * g / (sqrt(h) + delta)."""
    xp = backend.get_array_module(g)
    h += g * g
    g[...] = local_rate * (g / (xp.sqrt(h) + delta))


def rmsprop_update(g, h, local_rate, rms_decay, delta):
    """h = d*h + (1-d)*g^2; g <- lr * g / (sqrt(h) + delta)."""
    xp = backend.get_array_module(g)
    h *= rms_decay
    h += (1.0 - rms_decay) * (g * g)
    g[...] = local_rate * (g / (xp.sqrt(h) + delta))


def adadelta_update(g, h_g, h_u, local_rate, momentum, delta):
    """h_g = mu*h_g + (1-mu)*g^2; u = g*sqrt((h_u+delta)/(h_g+delta)); h_u = mu*h_u + (1-mu)*u^2; g <- lr*u."""
    xp = backend.get_array_module(g)
    h_g *= momentum
    h_g += (1.0 - momentum) * (g * g)
    u = g * xp.sqrt((h_u + delta) / (h_g + delta))
    h_u *= momentum
    h_u += (1.0 - momentum) * (u * u)
    g[...] = local_rate * u


def adam_update(g, m, v, local_rate, beta1, beta2, eps, t):
    """m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; g <- lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps)."""
    xp = backend.get_array_module(g)
    correction = math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    g[...] = (local_rate * correction) * (m / (xp.sqrt(v) + eps))


# --- helpers ------------------------------------------------------------------------------

def _f32(x):
    """A Caffe float parameter as the float the C++ code holds."""
    return float(np.float32(x))


def resolve_read_path(path, source, field):
    """``path`` relative to the working directory (as Caffe), else to the solver file's folder."""
    if not path:
        raise CrfGradError('empty path', file=source, field=field)
    if os.path.isabs(path) or os.path.exists(path) or not source:
        return path
    alt = os.path.join(os.path.dirname(os.path.abspath(source)), path)
    return alt if os.path.exists(alt) else path


def _merge_state(phase, net_param, extra):
    """Caffe: start from the phase, merge the net's own state, then the solver's train/test state."""
    state = caffe_pb2.NetState()
    state.phase = phase
    state.MergeFrom(net_param.state)
    if extra is not None:
        state.MergeFrom(extra)
    return state


class _NetSpec:
    """Where a net comes from: a prototxt path (errors name it) or an inline NetParameter."""

    def __init__(self, what, path=None, param=None):
        self.what, self.path, self.param = what, path, param

    def load(self):
        from .io.prototxt import load_net_param
        return load_net_param(self.path if self.path is not None else self.param)


# --- the solver -----------------------------------------------------------------------------

class Solver:
    """Base class: the training loop, tests, snapshots; subclasses give the update rule.

    ``Solver(solver_file_or_param, weights=None, log_file=None, progress=None)``:
    ``weights`` (comma-separated paths or a list) replaces the solver's ``weights``;
    ``log_file`` adds a Caffe-format (glog) log file; ``progress`` shows a tqdm bar in
    ``solve``/``step`` (None: only when stderr is a terminal).
    """
    type = None
    history_per_param = 1

    def __init__(self, solver, weights=None, log_file=None, progress=None):
        from .io.prototxt import load_solver_param
        self.source = None
        if isinstance(solver, (str, os.PathLike)) and os.path.exists(os.fspath(solver)):
            self.source = os.fspath(solver)
        sp = load_solver_param(solver if not isinstance(solver, os.PathLike) else os.fspath(solver))
        if self.source is not None:
            self._upgrade_snapshot_prefix(sp)
        if weights is not None:
            del sp.weights[:]
            sp.weights.extend([weights] if isinstance(weights, (str, os.PathLike)) else list(weights))
        self.param = sp
        self.progress = progress
        self._log_handler = None
        if log_file:
            from .training_log import add_log_file
            self._log_handler = add_log_file(log_file)
        self._callbacks = []
        self.iter = 0
        self._check_param()
        log.info('Initializing solver from parameters: \n%s', _text(sp))
        if sp.random_seed >= 0:
            from .layers import fillers
            fillers.set_random_seed(int(sp.random_seed))
        self.net = self._init_train_net()
        self.test_nets = self._init_test_nets()
        for t in self.test_nets:
            t.share_with(self.net)
        log.info('Solver scaffolding done.')
        self.iter = 0
        self.current_step = 0
        self.smoothed_loss = 0.0
        self.last_loss = None
        self.last_lr = None
        self.requested_early_exit = False
        self.test_results = [None] * len(self.test_nets)
        self._losses = []
        self._last_snapshot_iter = None
        self._stop_requested = False
        self._pre_solve()

    # -- construction ------------------------------------------------------------------
    def _check_param(self):
        sp, src = self.param, self.source
        if self.type is None:
            raise CrfGradError('Solver is abstract: use get_solver() or a solver class')
        if sp.average_loss < 1:
            raise CrfGradError('average_loss must be at least 1', file=src, field='average_loss')
        if sp.iter_size < 1:
            raise CrfGradError('iter_size must be at least 1', file=src, field='iter_size')
        check_lr_policy(sp, src)
        if sp.weight_decay and sp.regularization_type not in REGULARIZATION_TYPES:
            raise CrfGradError('unknown regularization_type %r (L1 or L2)' % sp.regularization_type,
                               file=src, field='regularization_type')
        if sp.snapshot_format not in (caffe_pb2.SolverParameter.HDF5, caffe_pb2.SolverParameter.BINARYPROTO):
            raise CrfGradError('unsupported snapshot format %d' % sp.snapshot_format, file=src,
                               field='snapshot_format')
        self._check_rule_param()
        if sp.snapshot > 0:
            self._check_snapshot_writable()

    def _check_rule_param(self):
        """Checks of the update rule's own parameters (subclasses)."""

    def _upgrade_snapshot_prefix(self, sp):
        """Caffe: no prefix -> solver path without extension; a folder -> folder/solver stem."""
        stem = os.path.splitext(self.source)[0]
        if not sp.HasField('snapshot_prefix'):
            sp.snapshot_prefix = stem
            log.info('snapshot_prefix was not specified and is set to %s', stem)
        elif os.path.isdir(sp.snapshot_prefix):
            sp.snapshot_prefix = os.path.join(sp.snapshot_prefix, os.path.basename(stem))
            log.info('snapshot_prefix was a directory and is replaced to %s', sp.snapshot_prefix)

    def _check_snapshot_writable(self):
        sp = self.param
        if not sp.HasField('snapshot_prefix'):
            raise CrfGradError('snapshot is set but snapshot_prefix is not', file=self.source,
                               field='snapshot_prefix')
        probe = self.snapshot_filename('.tempfile')
        try:
            with open(probe, 'w'):
                pass
            os.remove(probe)
        except OSError as exc:
            raise CrfGradError("cannot write to snapshot prefix %r (%s); make sure that the folder "
                               'exists and is writable' % (sp.snapshot_prefix, exc.strerror or exc),
                               file=self.source, field='snapshot_prefix') from None

    def _net_from_file(self, path, field):
        return _NetSpec('%s file: %s' % (field, path),
                        path=resolve_read_path(path, self.source, field))

    def _init_train_net(self):
        sp, src = self.param, self.source
        given = [f for f in ('net', 'net_param', 'train_net', 'train_net_param') if sp.HasField(f)]
        if len(given) != 1:
            raise CrfGradError('the solver must give exactly one train net with one of net, net_param, '
                               'train_net, train_net_param (found %s)' % (', '.join(given) or 'none'),
                               file=src, field='net')
        f = given[0]
        if f in ('net', 'train_net'):
            spec = self._net_from_file(getattr(sp, f), f)
        else:
            spec = _NetSpec(f, param=getattr(sp, f))
        log.info('Creating training net from %s', spec.what)
        net = self._build_net(spec, caffe_pb2.TRAIN, sp.train_state if sp.HasField('train_state') else None)
        self._load_weights(net)
        return net

    def _init_test_nets(self):
        sp, src = self.param, self.source
        generic = [f for f in ('net', 'net_param') if sp.HasField(f)]
        n_specific = len(sp.test_net_param) + len(sp.test_net)
        if len(generic) > 1:
            raise CrfGradError('both net_param and net may not be given', file=src, field='net')
        if generic and len(sp.test_iter) < n_specific or not generic and len(sp.test_iter) != n_specific:
            raise CrfGradError('test_iter must be given once for each test net (%d test nets, %d test_iter)'
                               % (n_specific, len(sp.test_iter)), file=src, field='test_iter')
        n_total = len(sp.test_iter) if generic else n_specific
        if sp.test_state and len(sp.test_state) != n_total:
            raise CrfGradError('test_state must be unset or given once per test net (%d)' % n_total,
                               file=src, field='test_state')
        if n_total and sp.test_interval <= 0:
            raise CrfGradError('test nets need test_interval > 0', file=src, field='test_interval')
        specs = [_NetSpec('test_net_param', param=p) for p in sp.test_net_param]
        specs += [self._net_from_file(p, 'test_net') for p in sp.test_net]
        remaining = n_total - len(specs)
        if generic:
            f = generic[0]
            for _ in range(remaining):
                specs.append(self._net_from_file(sp.net, 'net') if f == 'net' else _NetSpec(f, param=sp.net_param))
        nets = []
        for i, spec in enumerate(specs):
            log.info('Creating test net (#%d) specified by %s', i, spec.what)
            net = self._build_net(spec, caffe_pb2.TEST, sp.test_state[i] if sp.test_state else None)
            self._load_weights(net)
            nets.append(net)
        return nets

    def _build_net(self, spec, phase, extra_state):
        from .net import Net
        param = spec.load()
        state = _merge_state(phase, param, extra_state)
        network = spec.path if spec.path is not None else param
        return Net(network, phase=state.phase, level=state.level, stages=list(state.stage))

    def _load_weights(self, net):
        for entry in self.param.weights:
            for name in str(entry).split(','):
                name = name.strip()
                if name:
                    path = resolve_read_path(name, self.source, 'weights')
                    log.info('Finetuning from %s', path)
                    net.copy_from(path)

    def _pre_solve(self):
        """Histories: ``history_per_param`` zero blobs per learnable parameter (all of the
        first kind, then all of the second)."""
        xp = backend.xp()
        params = self.net.learnable_params
        self.history = []
        for _ in range(self.history_per_param):
            for p in params:
                self.history.append(xp.zeros(p.shape, dtype=p.dtype))

    # -- pycaffe surface ---------------------------------------------------------------
    @property
    def lr(self):
        """The rate the next update would use (Caffe's GetLearningRate at the current iter)."""
        return self._rate(learning_rate(self.param, self.iter, self.current_step)[0])

    def _rate(self, rate):
        dtype = self.net.learnable_params[0].dtype if self.net.learnable_params else np.float32
        return float(np.asarray(rate, dtype=dtype))

    def add_callback(self, on_start=None, on_gradients_ready=None):
        """Called at the start of each iteration / after forward-backward (pycaffe's add_callback)."""
        self._callbacks.append((on_start, on_gradients_ready))

    def share_weights(self, net):
        """Make ``net`` use this solver's train-net parameters (pycaffe's share_weights)."""
        net.share_with(self.net)

    def close(self):
        """Detach the log file handler this solver added."""
        if self._log_handler is not None:
            from .training_log import remove_handler
            remove_handler(self._log_handler)
            self._log_handler = None

    # -- training loop -----------------------------------------------------------------
    def step(self, iters):
        """Run ``iters`` iterations (Caffe's Solver::Step)."""
        iters = int(iters)
        with _SigintDeferral(self):
            try:
                self._step(iters)
            except KeyboardInterrupt:
                self._interrupted()
                raise
        if self._stop_requested:
            self._stop_requested = False
            self._interrupted()
            raise KeyboardInterrupt('training stopped by SIGINT at iteration %d' % self.iter)

    def _interrupted(self):
        self.requested_early_exit = True
        log.info('Interrupted at iteration %d: snapshotting', self.iter)
        if self._last_snapshot_iter != self.iter:
            try:
                self.snapshot()
            except Exception as exc:   # the interrupt is what the user must see
                log.error('could not write the snapshot: %s', exc)

    def _step(self, iters):
        sp = self.param
        start_iter = self.iter
        stop_iter = self.iter + iters
        self._losses = []
        self.smoothed_loss = 0.0
        timer = time.time()
        iterations_last = self.iter
        bar = self._progress_bar(iters)
        try:
            while self.iter < stop_iter:
                self.net.clear_param_diffs()
                if sp.test_interval and self.iter % sp.test_interval == 0 and \
                        (self.iter > 0 or sp.test_initialization):
                    self.test_all()
                    if self._stop_requested:
                        break
                for on_start, _ in self._callbacks:
                    if on_start:
                        on_start()
                display = sp.display and self.iter % sp.display == 0
                loss = 0.0
                for _ in range(sp.iter_size):
                    loss += self.net.forward_backward()
                loss /= sp.iter_size
                self.last_loss = loss
                self._update_smoothed_loss(loss, start_iter, sp.average_loss)
                if display:
                    lapse = time.time() - timer
                    per_s = (self.iter - iterations_last) / (lapse if lapse else 1.0)
                    log.info('Iteration %d (%g iter/s, %gs/%d iters), loss = %g', self.iter, per_s,
                             round(lapse, 3), sp.display, self.smoothed_loss)
                    timer = time.time()
                    iterations_last = self.iter
                    self._log_outputs(self.net, 'Train', None)
                for _, on_grad in self._callbacks:
                    if on_grad:
                        on_grad()
                self.apply_update()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss='%.4g' % self.smoothed_loss, lr='%.3g' % self.last_lr,
                                    refresh=False)
                if (sp.snapshot and self.iter % sp.snapshot == 0) or self._stop_requested:
                    self.snapshot()
                if self._stop_requested:
                    break
        finally:
            if bar is not None:
                bar.close()

    def _progress_bar(self, iters):
        show = self.progress
        if show is None:
            show = iters > 1 and hasattr(sys.stderr, 'isatty') and sys.stderr.isatty()
        if not show or iters <= 0:
            return None
        from tqdm import tqdm
        return tqdm(total=iters, desc='iter %d' % self.iter, unit='it', file=sys.stderr,
                    dynamic_ncols=True, leave=False)

    def _update_smoothed_loss(self, loss, start_iter, average_loss):
        """Mean of the last ``average_loss`` iteration losses (Caffe's ring buffer)."""
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            n = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (n - 1) + loss) / n
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss += (loss - self._losses[idx]) / average_loss
            self._losses[idx] = loss

    def _log_outputs(self, net, kind, divisor, values=None):
        """Caffe's '    Train net output #k: name = v (* w = w*v loss)' lines."""
        weights = net.blob_loss_weights
        k = 0
        out = collections.OrderedDict()
        for name in net.outputs:
            vals = values[name] if values is not None else backend.to_numpy(net.blobs[name].data)
            vals = np.asarray(vals, dtype=np.float64).ravel()
            if divisor:
                vals = vals / divisor
            out[name] = vals
            w = weights.get(name, 0.0)
            for v in vals:
                extra = ' (* %g = %g loss)' % (w, w * v) if w else ''
                log.info('    %s net output #%d: %s = %g%s', kind, k, name, v, extra)
                k += 1
        return out

    def apply_update(self):
        """Rate, clipping, Normalize -> Regularize -> ComputeUpdateValue for every parameter,
        then w -= diff and iter += 1 (Caffe's SGDSolver::ApplyUpdate)."""
        sp = self.param
        rate, self.current_step = learning_rate(sp, self.iter, self.current_step)
        rate = self._rate(rate)
        self.last_lr = rate
        if sp.display and self.iter % sp.display == 0:
            log.info('Iteration %d, lr = %g', self.iter, rate)
        params = self.net.learnable_params
        clip_gradients([p.diff for p in params], _f32(sp.clip_gradients))
        for i, p in enumerate(params):
            self._normalize(i, p)
            regularize(p.diff, p.data, _f32(sp.weight_decay) * self.net.param_decay_mult[i],
                       sp.regularization_type)
            self.compute_update_value(i, rate)
        for p in params:
            p.data -= p.diff
        self.iter += 1

    def _normalize(self, i, p):
        if self.param.iter_size != 1:
            p.diff *= p.diff.dtype.type(1.0 / self.param.iter_size)

    def solve(self, resume_file=None):
        """Train to max_iter (Caffe's Solver::Solve); ``resume_file``: a .solverstate to restore."""
        sp = self.param
        log.info('Solving %s', self.net.name)
        log.info('Learning Rate Policy: %s', sp.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info('Restoring previous solver status from %s', resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(sp.max_iter - self.iter)
        if sp.snapshot_after_train and (not sp.snapshot or self.iter % sp.snapshot != 0) \
                and self._last_snapshot_iter != self.iter:
            self.snapshot()
        if sp.display and self.iter % sp.display == 0:
            loss = self.net.forward_loss()
            self._update_smoothed_loss(loss, start_iter, sp.average_loss)
            log.info('Iteration %d, loss = %g', self.iter, self.smoothed_loss)
        if sp.test_interval and self.iter % sp.test_interval == 0:
            self.test_all()
        log.info('Optimization Done.')

    # -- testing -----------------------------------------------------------------------
    def test_all(self):
        """Run every test net; returns the list of {output: mean values}."""
        for i in range(len(self.test_nets)):
            if self._stop_requested:
                break
            self.test(i)
        return self.test_results

    def test(self, test_net_id=0):
        """test_iter forward passes of a test net; outputs averaged and logged as Caffe does."""
        sp = self.param
        log.info('Iteration %d, Testing net (#%d)', self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_with(self.net)
        n = int(sp.test_iter[test_net_id])
        sums = None
        loss = 0.0
        for _ in range(n):
            if self._stop_requested:
                log.info('Test interrupted.')
                return None
            iter_loss = net.forward_loss()
            if sp.test_compute_loss:
                loss += iter_loss
            vals = collections.OrderedDict(
                (name, np.asarray(backend.to_numpy(net.blobs[name].data), np.float64).ravel().copy())
                for name in net.outputs)
            if sums is None:
                sums = vals
            else:
                for name in sums:
                    sums[name] += vals[name]
        if sp.test_compute_loss:
            log.info('Test loss: %g', loss / n)
        result = self._log_outputs(net, 'Test', n, sums) if sums is not None else collections.OrderedDict()
        self.test_results[test_net_id] = result
        return result

    # -- snapshots ---------------------------------------------------------------------
    def snapshot_filename(self, extension):
        return '%s_iter_%d%s' % (self.param.snapshot_prefix, self.iter, extension)

    def snapshot(self):
        """Write the weights and the solver state; returns (model file, state file)."""
        sp = self.param
        hdf5 = sp.snapshot_format == caffe_pb2.SolverParameter.HDF5
        model = self.snapshot_filename('.caffemodel.h5' if hdf5 else '.caffemodel')
        try:
            if hdf5:
                log.info('Snapshotting to HDF5 file %s', model)
                self.net.save_hdf5(model, write_diff=sp.snapshot_diff)
            else:
                log.info('Snapshotting to binary proto file %s', model)
                self.net.save(model, write_diff=sp.snapshot_diff)
            state = self._snapshot_state(model, hdf5)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise CrfGradError('cannot write the snapshot %s: %s (does the folder of snapshot_prefix '
                               'exist?)' % (getattr(exc, 'filename', None) or model, exc.strerror or exc),
                               file=self.source, field='snapshot_prefix') from None
        self._last_snapshot_iter = self.iter
        return model, state

    def _snapshot_state(self, model, hdf5):
        if hdf5:
            path = self.snapshot_filename('.solverstate.h5')
            log.info('Snapshotting solver state to HDF5 file %s', path)
            save_solver_state_hdf5(path, self.iter, model, self.current_step,
                                   [backend.to_numpy(h) for h in self.history])
        else:
            path = self.snapshot_filename('.solverstate')
            log.info('Snapshotting solver state to binary proto file %s', path)
            save_solver_state(path, self.iter, model, self.current_step,
                              [backend.to_numpy(h) for h in self.history])
        return path

    def restore(self, state_file):
        """Continue from a .solverstate(.h5): iter, current_step, the weights it names, histories."""
        state_file = os.fspath(state_file)
        if state_file.endswith('.h5'):
            it, learned, current_step, history = load_solver_state_hdf5(state_file)
        else:
            it, learned, current_step, history = load_solver_state(state_file)
        if len(history) != len(self.history):
            raise CrfGradError('the solver state has %d history blobs, this %s solver needs %d'
                               % (len(history), self.type, len(self.history)), file=state_file,
                               field='history')
        for i, (h, mine) in enumerate(zip(history, self.history)):
            if h.size != mine.size:
                raise CrfGradError('history blob %d has shape %s, the parameter needs %s'
                                   % (i, tuple(h.shape), tuple(mine.shape)), file=state_file,
                                   field='history')
        if learned:
            path = learned
            if not os.path.exists(path):
                alt = os.path.join(os.path.dirname(os.path.abspath(state_file)), os.path.basename(learned))
                if os.path.exists(alt):
                    path = alt
                else:
                    raise CrfGradError('learned_net %r not found (relative to the working directory or '
                                       'next to the state file)' % learned, file=state_file,
                                       field='learned_net')
            self.net.copy_from(path)
        self.iter = int(it)
        self.current_step = int(current_step)
        log.info('%s: restoring history', type(self).__name__)
        xp = backend.xp()
        for i, h in enumerate(history):
            self.history[i][...] = xp.asarray(h.reshape(self.history[i].shape), dtype=self.history[i].dtype)
        self._last_snapshot_iter = self.iter


def _text(message):
    from .io.prototxt import to_text
    return to_text(message)


# --- solver state files -----------------------------------------------------------------------

def save_solver_state(path, it, learned_net, current_step, history):
    """Binary SolverState proto (iter 1, learned_net 2, history 3, current_step 4)."""
    from .io.blobproto import array_to_blob
    state = caffe_pb2.SolverState()
    state.iter = int(it)
    state.learned_net = str(learned_net)
    state.current_step = int(current_step)
    for h in history:
        state.history.add().CopyFrom(array_to_blob(np.asarray(h), double=np.asarray(h).dtype == np.float64))
    write_bytes_atomic(state.SerializeToString(), path)


def load_solver_state(path):
    """(iter, learned_net, current_step, [history arrays]) of a binary .solverstate."""
    from google.protobuf.message import DecodeError
    from .io.blobproto import blob_to_array
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise CrfGradError('solver state file not found', file=path) from None
    except OSError as exc:
        raise CrfGradError('cannot read the solver state: %s' % (exc.strerror or exc), file=path) from None
    if data[:8] == b'\x89HDF\r\n\x1a\n':
        raise CrfGradError('this is an HDF5 solver state: name it *.solverstate.h5', file=path)
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CrfGradError('not a valid binary SolverState: %s' % exc, file=path) from None
    history = [blob_to_array(b, source=path, layer=None, dtype=np.float64) for b in state.history]
    return state.iter, state.learned_net if state.HasField('learned_net') else None, state.current_step, history


def save_solver_state_hdf5(path, it, learned_net, current_step, history):
    """Caffe's HDF5 solver state: int datasets iter, current_step (shape (1,)); the string
    dataset learned_net (scalar, null-terminated); group history with datasets 0..K-1."""
    import h5py
    with atomic_path(path) as tmp:
        with h5py.File(tmp, 'w') as f:
            f.create_dataset('iter', data=np.array([it], dtype=np.int32))
            raw = str(learned_net).encode('utf-8')
            tid = h5py.h5t.C_S1.copy()
            tid.set_size(len(raw) + 1)
            tid.set_strpad(h5py.h5t.STR_NULLTERM)
            space = h5py.h5s.create(h5py.h5s.SCALAR)
            ds = h5py.h5d.create(f.id, b'learned_net', tid, space)
            ds.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw + b'\0', dtype='S%d' % (len(raw) + 1)))
            f.create_dataset('current_step', data=np.array([current_step], dtype=np.int32))
            g = f.create_group('history')
            for i, h in enumerate(history):
                h = np.asarray(h)
                g.create_dataset(str(i), data=h.astype(np.float64 if h.dtype == np.float64 else np.float32))


def load_solver_state_hdf5(path):
    """(iter, learned_net, current_step, [history arrays]) of a .solverstate.h5."""
    import h5py
    if not os.path.exists(path):
        raise CrfGradError('solver state file not found', file=path)
    try:
        with h5py.File(path, 'r') as f:
            for key in ('iter', 'current_step', 'history'):
                if key not in f:
                    raise CrfGradError('no %r entry: not a Caffe HDF5 solver state' % key, file=path,
                                       field=key)
            it = int(np.asarray(f['iter'][()]).ravel()[0])
            current_step = int(np.asarray(f['current_step'][()]).ravel()[0])
            learned = None
            if 'learned_net' in f:
                raw = f['learned_net'][()]
                if isinstance(raw, np.ndarray):
                    raw = raw.ravel()[0]
                learned = raw.decode('utf-8') if isinstance(raw, bytes) else str(raw)
                learned = learned.rstrip('\0')
            g = f['history']
            names = sorted(g.keys(), key=lambda s: int(s) if s.isdigit() else -1)
            if [n for n in names] != [str(i) for i in range(len(names))]:
                raise CrfGradError('history datasets must be named 0..K-1, found %s' % names, file=path,
                                   field='history')
            history = [np.asarray(g[n][()], dtype=np.float64) for n in names]
    except OSError as exc:
        raise CrfGradError('cannot read the HDF5 solver state: %s' % exc, file=path) from None
    return it, learned, current_step, history


# --- SIGINT: finish the iteration, snapshot, stop ----------------------------------------------

class _SigintDeferral:
    """While stepping in the main thread, the first Ctrl-C only asks the solver to stop after the
    running iteration (Caffe's SIGINT action); a second one interrupts at once."""

    def __init__(self, solver):
        self.solver = solver
        self.installed = False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                return self
            self.previous = signal.signal(signal.SIGINT, self._handler)
            self.installed = True
        except (ValueError, OSError):
            pass
        return self

    def _handler(self, signum, frame):
        if self.solver._stop_requested:
            raise KeyboardInterrupt
        self.solver._stop_requested = True
        log.warning('SIGINT: stopping after the current iteration (press Ctrl-C again to stop now)')

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)
        return False


# --- the rules --------------------------------------------------------------------------------

class SGDSolver(Solver):
    """Stochastic gradient descent with momentum (Caffe's lr-inside-the-history form)."""
    type = 'SGD'

    def compute_update_value(self, i, rate):
        p = self.net.learnable_params[i]
        sgd_update(p.diff, self.history[i], rate * self.net.param_lr_mult[i], _f32(self.param.momentum))


class NesterovSolver(Solver):
    type = 'Nesterov'

    def compute_update_value(self, i, rate):
        p = self.net.learnable_params[i]
        nesterov_update(p.diff, self.history[i], rate * self.net.param_lr_mult[i], _f32(self.param.momentum))


class AdaGradSolver(Solver):
    type = 'AdaGrad'

    def _check_rule_param(self):
        if self.param.momentum != 0:
            raise CrfGradError('momentum must be 0 for AdaGrad (got %g)' % self.param.momentum,
                               file=self.source, field='momentum')

    def compute_update_value(self, i, rate):
        p = self.net.learnable_params[i]
        adagrad_update(p.diff, self.history[i], rate * self.net.param_lr_mult[i], _f32(self.param.delta))


class RMSPropSolver(Solver):
    type = 'RMSProp'

    def _check_rule_param(self):
        sp = self.param
        if sp.momentum != 0:
            raise CrfGradError('momentum must be 0 for RMSProp (got %g)' % sp.momentum, file=self.source,
                               field='momentum')
        if not 0 <= sp.rms_decay < 1:
            raise CrfGradError('rms_decay must be in [0, 1) (got %g)' % sp.rms_decay, file=self.source,
                               field='rms_decay')

    def compute_update_value(self, i, rate):
        p = self.net.learnable_params[i]
        rmsprop_update(p.diff, self.history[i], rate * self.net.param_lr_mult[i], _f32(self.param.rms_decay),
                       _f32(self.param.delta))


class AdaDeltaSolver(Solver):
    type = 'AdaDelta'
    history_per_param = 2

    def compute_update_value(self, i, rate):
        p = self.net.learnable_params[i]
        n = len(self.net.learnable_params)
        adadelta_update(p.diff, self.history[i], self.history[n + i], rate * self.net.param_lr_mult[i],
                        _f32(self.param.momentum), _f32(self.param.delta))


class AdamSolver(Solver):
    type = 'Adam'
    history_per_param = 2

    def compute_update_value(self, i, rate):
        p = self.net.learnable_params[i]
        n = len(self.net.learnable_params)
        sp = self.param
        adam_update(p.diff, self.history[i], self.history[n + i], rate * self.net.param_lr_mult[i],
                    _f32(sp.momentum), _f32(sp.momentum2), _f32(sp.delta), self.iter + 1)


SOLVERS = collections.OrderedDict(
    (cls.type, cls) for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver,
                                AdamSolver))


def solver_class(type_name, source=None):
    cls = SOLVERS.get(type_name)
    if cls is None:
        raise CrfGradError('unknown solver type %r (known: %s)' % (type_name, ', '.join(SOLVERS)),
                           file=source, field='type')
    return cls


def get_solver(solver, weights=None, log_file=None, progress=None):
    """The solver of the type the file names (pycaffe's caffe.get_solver)."""
    from .io.prototxt import load_solver_param
    sp = load_solver_param(os.fspath(solver) if isinstance(solver, os.PathLike) else solver)
    source = os.fspath(solver) if isinstance(solver, (str, os.PathLike)) and os.path.exists(os.fspath(solver)) \
        else None
    cls = solver_class(sp.type, source)
    return cls(solver, weights=weights, log_file=log_file, progress=progress)
