"""`crfgrad train`, `crfgrad test` and `crfgrad parse-log`, like Caffe's tools.

    crfgrad train SOLVER [--weights W[,W2]] [--snapshot S.solverstate] [--gpu [ID] | --cpu] [--log FILE]
    crfgrad test MODEL WEIGHTS --iterations N [--gpu [ID]]
    crfgrad parse-log LOG [OUT_PREFIX]

`train` writes Caffe-format log lines to stderr (and to --log), with a progress bar on
a terminal; Ctrl-C finishes the iteration, writes a snapshot and exits with code 130.
`test` runs N forward passes of the TEST-phase net and prints Caffe's summary lines (the
loss, then each output's mean) on stdout; the per-batch lines go to the log.  `parse-log` turns a training log (ours or Caffe's) into
OUT_PREFIX.train.csv and OUT_PREFIX.test.csv.
"""
import logging
import sys

import numpy as np

log = logging.getLogger('crfgrad_cupy.cli')


def register(sub):
    p = sub.add_parser('train', help='train a net with a Caffe solver prototxt (as `caffe train`)')
    p.add_argument('solver', help='solver .prototxt')
    p.add_argument('--weights', help='weights to start from (comma-separated list allowed); replaces the '
                   "solver's weights field")
    p.add_argument('--snapshot', help='.solverstate(.h5) to resume from')
    _device_args(p)
    p.add_argument('--log', metavar='FILE', help='also append the log (Caffe format) to FILE')
    p.add_argument('--quiet', action='store_true', help='no log lines on the terminal')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.set_defaults(func=run_train)

    t = sub.add_parser('test', help='score a net: N forward passes in the TEST phase (as `caffe test`)')
    t.add_argument('model', help='net .prototxt (with data layers)')
    t.add_argument('weights', help='.caffemodel or .caffemodel.h5')
    t.add_argument('--iterations', type=int, default=50, help='forward passes (default 50)')
    t.add_argument('--level', type=int, default=0, help='net state level')
    t.add_argument('--stage', action='append', default=[], help='net state stage (repeatable)')
    _device_args(t)
    t.add_argument('--log', metavar='FILE', help='also append the log (Caffe format) to FILE')
    t.add_argument('--verbose', action='store_true', help='log lines (each batch) on stderr too')
    t.set_defaults(func=run_test)

    g = sub.add_parser('parse-log', help='training log (ours or Caffe\'s) -> train and test CSV tables')
    g.add_argument('logfile')
    g.add_argument('prefix', nargs='?', help='output prefix (default: the log path)')
    g.set_defaults(func=run_parse_log)


def _device_args(p):
    d = p.add_mutually_exclusive_group()
    d.add_argument('--gpu', nargs='?', const=0, type=int, metavar='ID',
                   help='run on GPU ID (default 0); needs CuPy')
    d.add_argument('--cpu', action='store_true', help='run on the CPU even if the solver says GPU')


def _setup_logging(args, terminal=True):
    from .. import training_log
    handlers = []
    if terminal:
        handlers.append(training_log.add_terminal_handler())
    if getattr(args, 'log', None):
        handlers.append(training_log.add_log_file(args.log))
    return handlers


def _teardown_logging(handlers):
    from .. import training_log
    for h in handlers:
        training_log.remove_handler(h)


def _choose_device(args, solver_param=None):
    from .. import backend
    from ..proto import caffe_pb2
    if args.gpu is not None:
        backend.set_device(args.gpu)
        backend.set_mode_gpu()
        log.info('Using GPU %d', args.gpu)
        return
    if not args.cpu and solver_param is not None and solver_param.solver_mode == caffe_pb2.SolverParameter.GPU:
        if backend.cupy_available():
            backend.set_device(solver_param.device_id)
            backend.set_mode_gpu()
            log.info('Using GPU %d (solver_mode: GPU)', solver_param.device_id)
            return
        log.info('solver_mode is GPU but no CUDA device is usable: running on the CPU')
    backend.set_mode_cpu()
    log.info('Use CPU.')


def run_train(args):
    from ..errors import CrfGradError
    from ..io.prototxt import load_solver_param
    from ..solver import get_solver
    if args.weights and args.snapshot:
        raise CrfGradError('give --snapshot to resume or --weights to finetune, not both', field='--weights')
    handlers = _setup_logging(args, terminal=not args.quiet)
    try:
        sp = load_solver_param(args.solver)
        _choose_device(args, sp)
        progress = False if args.no_progress else None
        solver = get_solver(args.solver, weights=[args.weights] if args.weights else
                            ([] if args.snapshot else None), progress=progress)
        if args.snapshot:
            log.info('Resuming from %s', args.snapshot)
            solver.restore(args.snapshot)
        log.info('Starting Optimization')
        try:
            solver.solve()
        except KeyboardInterrupt:
            print('crfgrad: interrupted at iteration %d; snapshot %s_iter_%d written'
                  % (solver.iter, solver.param.snapshot_prefix, solver.iter), file=sys.stderr)
            return 130
        log.info('Optimization Done.')
        return 0
    finally:
        _teardown_logging(handlers)


def run_test(args):
    import crfgrad_cupy as cc
    from ..errors import CrfGradError
    if args.iterations < 1:
        raise CrfGradError('--iterations must be at least 1', field='--iterations')
    handlers = _setup_logging(args, terminal=args.verbose)
    try:
        _choose_device(args)
        net = cc.Net(args.model, phase=cc.TEST, level=args.level, stages=args.stage or None)
        net.copy_from(args.weights)
        log.info('Running for %d iterations.', args.iterations)
        results = score_net(net, args.iterations)
        for line in results['lines']:
            print(line)
        return 0
    finally:
        _teardown_logging(handlers)


def score_net(net, iterations):
    """Caffe's `caffe test`: forward ``iterations`` times; returns {'loss', 'means', 'lines'} where
    means maps output name -> mean values and lines are the summary lines Caffe prints."""
    from .. import backend
    sums = None
    loss = 0.0
    for i in range(iterations):
        loss += net.forward_loss()
        vals = [(name, np.asarray(backend.to_numpy(net.blobs[name].data), np.float64).ravel().copy())
                for name in net.outputs]
        for name, v in vals:
            for x in v:
                log.info('Batch %d, %s = %g', i, name, x)
        if sums is None:
            sums = vals
        else:
            for (_, acc), (_, v) in zip(sums, vals):
                acc += v
    loss /= iterations
    lines = ['Loss: %g' % loss]
    weights = net.blob_loss_weights
    means = {}
    for name, acc in sums or []:
        mean = acc / iterations
        means[name] = mean
        w = weights.get(name, 0.0)
        for x in mean:
            lines.append('%s = %g%s' % (name, x, ' (* %g = %g loss)' % (w, w * x) if w else ''))
    for line in lines:
        log.info('%s', line)
    return {'loss': loss, 'means': means, 'lines': lines}


def run_parse_log(args):
    from ..training_log import parse_caffe_log, save_csv
    tables = parse_caffe_log(args.logfile)
    for path in save_csv(tables, args.prefix or args.logfile):
        print(path)
    return 0
