"""One prepared GPU check, run on a CUDA machine in a single call (well under 10 minutes).

    python3 tools/gpu_check.py --shared DIR [--out DIR] [--quick]

1. the test subset that compares against ../shared/oracle, on CuPy (pytest with CRFGRAD_TEST_DEVICE=gpu);
2. CuPy against NumPy on the bundled model and on random CrfGrad instances (forward and every diff),
   with the CUDA kernels (crfgrad_cupy/core/cuda_kernels.py, the default) and with the array code
   (CRFGRAD_NO_RAWKERNEL=1);
3. timings: the CrfGrad layer (N=1, L=21, k=9, T=5) at 512x1024 and 1024x2048, forward and
   forward+backward (at 512x1024 also the forward with the array code, and the forward's stages
   both ways), and the spatial term against torch.nn.functional.conv2d (cuDNN) on the same GPU.

On the device machine (../shared does not travel there): copy what it reads into the git-ignored
.device_data/ first, then run it in one call, carrying that folder::

    mkdir -p .device_data/shared/data/caffe_models
    cp -r ../shared/oracle .device_data/shared/
    cp -r ../shared/data/caffe_models/crfgrad_horse_caffe .device_data/shared/data/caffe_models/
    # device: python3 tools/gpu_check.py --shared .device_data/shared --out $OUT   (carry .device_data)

Writes a Markdown table to stdout and to OUT/gpu_results.md (+ gpu_results.json). Each part runs
on its own: a failure is reported and the next part still runs.
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, os.pardir))
sys.path.insert(0, ROOT)

RESULTS = {'parts': {}}


def log(*args):
    print(*args, flush=True)


def part(name):
    def deco(fn):
        def run(*a, **kw):
            t0 = time.time()
            try:
                out = fn(*a, **kw)
                RESULTS['parts'][name] = {'ok': True, 'seconds': round(time.time() - t0, 1), 'result': out}
            except Exception as exc:   # report and go on with the next part
                traceback.print_exc()
                RESULTS['parts'][name] = {'ok': False, 'seconds': round(time.time() - t0, 1),
                                          'error': '%s: %s' % (type(exc).__name__, exc)}
            log('== %s: %s (%.1f s)' % (name, 'ok' if RESULTS['parts'][name]['ok'] else 'FAILED',
                                        time.time() - t0))
        return run
    return deco


@part('oracle tests on CuPy')
def oracle_tests(shared, timeout):
    env = dict(os.environ, CRFGRAD_TEST_DEVICE='gpu', CRFGRAD_SHARED=shared, MPLBACKEND='Agg')
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-x',
           'tests/test_oracle_all.py', 'tests/test_solver.py', '-k', 'oracle or gpu']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    log('\n'.join(tail))
    if proc.returncode != 0:
        raise RuntimeError('pytest exit %d: %s' % (proc.returncode, tail[-1] if tail else ''))
    return tail[-1]


class _array_code:
    """``with _array_code():`` runs the block with CRFGRAD_NO_RAWKERNEL=1 (the CuPy array code)."""

    def __enter__(self):
        self.old = os.environ.get('CRFGRAD_NO_RAWKERNEL')
        os.environ['CRFGRAD_NO_RAWKERNEL'] = '1'

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop('CRFGRAD_NO_RAWKERNEL', None)
        else:
            os.environ['CRFGRAD_NO_RAWKERNEL'] = self.old


def _max_rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ref = np.max(np.abs(b)) if b.size else 0.0
    return float(np.max(np.abs(a - b)) / ref) if ref else float(np.max(np.abs(a - b)) if a.size else 0.0)


def _run_net(make_net, inputs, top_diffs, mode):
    import crfgrad_cupy as cc
    from crfgrad_cupy import backend
    (cc.set_mode_gpu if mode == 'gpu' else cc.set_mode_cpu)()
    net = make_net()
    out = net.forward(**inputs)
    res = {'out/' + k: backend.to_numpy(v).copy() for k, v in out.items()}
    for name, g in top_diffs.items():
        net.blobs[name].diff[...] = backend.xp().asarray(g)
    grads = net.backward()
    res.update({'diff/' + k: backend.to_numpy(v).copy() for k, v in grads.items()})
    for layer, blobs in net.params.items():
        for i, b in enumerate(blobs):
            res['param_diff/%s/%d' % (layer, i)] = backend.to_numpy(b.diff).copy()
    cc.set_mode_cpu()
    return res


def _crfgrad_proto(L, H, W, k=9, T=5, N=1):
    return '''
force_backward: true
layer { name: "prob" type: "Input" top: "prob" input_param { shape { dim: %d dim: %d dim: %d dim: %d } } }
layer { name: "img" type: "Input" top: "img" input_param { shape { dim: %d dim: 3 dim: %d dim: %d } } }
layer { name: "feat" type: "PixelFeature" bottom: "img" top: "feat"
  pixel_feature_param { type: POSITION_AND_RGB pos_scale: 0.05 color_scale: 0.3 } }
layer { name: "crf" type: "CrfGrad" bottom: "prob" bottom: "feat" top: "crf"
  crfgrad_param { num_classes: %d kernel_size: %d num_iterations: %d use_cudnn: false } }
''' % (N, L, H, W, N, H, W, L, k, T)


def photo_like(rng, N, H, W):
    """Piecewise-constant 3-channel image (mean-subtracted range) with noise sigma 8."""
    img = np.zeros((N, 3, H, W), np.float32)
    for n in range(N):
        for _ in range(max(8, H * W // 6000)):
            y, x = rng.integers(0, H), rng.integers(0, W)
            img[n, :, y:y + H // 5, x:x + W // 4] = rng.uniform(-100, 100, (3, 1, 1))
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return img


def random_crf_instance(seed, L, H, W, N=1, k=5, T=3):
    rng = np.random.default_rng(seed)
    p = rng.random((N, L, H, W)).astype(np.float32) + 0.05
    p /= p.sum(1, keepdims=True)
    img = photo_like(rng, N, H, W)
    F = 63
    params = [np.full((1, 1, 1, 1), 0.5, np.float32),
              rng.normal(0, 0.05, (L, L, k, k)).astype(np.float32),
              rng.normal(0, 0.05, (L, L, 1, F)).astype(np.float32)]
    g = rng.normal(size=(N, L, H, W)).astype(np.float32)
    return p, img, params, g


@part('CuPy vs NumPy: random CrfGrad instances')
def compare_random():
    import crfgrad_cupy as cc
    worst = {}
    for seed, (L, H, W, N, k, T) in enumerate([(3, 24, 31, 2, 5, 3), (5, 40, 33, 1, 9, 5),
                                               (21, 64, 48, 1, 9, 5)]):
        p, img, params, g = random_crf_instance(seed, L, H, W, N, k, T)
        proto = _crfgrad_proto(L, H, W, k, T, N)

        def make():
            net = cc.Net(proto, cc.TEST)
            for i, a in enumerate(params):
                net.params['crf'][i].data[...] = cc.backend.xp().asarray(a)
            return net
        ref = _run_net(make, {'prob': p, 'img': img}, {'crf': g}, 'cpu')
        gpu = _run_net(make, {'prob': p, 'img': img}, {'crf': g}, 'gpu')
        with _array_code():
            gpu_array = _run_net(make, {'prob': p, 'img': img}, {'crf': g}, 'gpu')
        for key in ref:
            worst[key] = max(worst.get(key, 0.0), _max_rel(gpu[key], ref[key]))
            worst['array code: ' + key] = max(worst.get('array code: ' + key, 0.0),
                                              _max_rel(gpu_array[key], ref[key]))
        log('instance L=%d %dx%d N=%d k=%d T=%d: max rel err kernels %.2e, array code %.2e' % (
            L, H, W, N, k, T, max(_max_rel(gpu[key], ref[key]) for key in ref),
            max(_max_rel(gpu_array[key], ref[key]) for key in ref)))
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    if bad:
        raise AssertionError('CuPy and NumPy differ by more than 1e-4: %s' % bad)
    return {k: '%.1e' % v for k, v in worst.items()}


@part('CuPy vs NumPy: bundled model')
def compare_bundled(shared):
    """The bundled model (or, where it is absent, the authors' Caffe-trained horse model)."""
    import crfgrad_cupy as cc
    from crfgrad_cupy import segment
    try:
        proto, weights = segment.default_model()
    except cc.CrfGradError:
        d = os.path.join(shared, 'data', 'caffe_models', 'crfgrad_horse_caffe')
        proto, weights = os.path.join(d, 'deploy.prototxt'), os.path.join(d, 'stage2_iter_1200.caffemodel')
    log('model:', proto)
    results = {}
    outs = {}
    for mode in ('cpu', 'gpu'):
        (cc.set_mode_gpu if mode == 'gpu' else cc.set_mode_cpu)()
        net = cc.Net(proto, cc.TEST, weights=weights)
        name = net.inputs[0]
        shape = net.blobs[name].shape
        x = photo_like(np.random.default_rng(1), shape[0], shape[2], shape[3])
        net.forward(**{name: x})
        outs[mode] = {b: cc.backend.to_numpy(net.blobs[b].data).copy()
                      for b in ('score_pre', 'score_post') if b in net.blobs}
        outs[mode].update({b: cc.backend.to_numpy(net.blobs[b].data).copy() for b in net.outputs})
    cc.set_mode_cpu()
    for key in outs['cpu']:
        err = _max_rel(outs['gpu'][key], outs['cpu'][key])
        results[key] = '%.1e' % err
        if err > 1e-4:
            raise AssertionError('%s: CuPy vs NumPy rel err %.2e' % (key, err))
    if 'score_post' in outs['cpu']:
        results['label agreement'] = float(
            (outs['gpu']['score_post'].argmax(1) == outs['cpu']['score_post'].argmax(1)).mean())
    return results


def _time(fn, sync, repeats):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@part('timings')
def timings(quick):
    import cupy as cp
    import crfgrad_cupy as cc
    from crfgrad_cupy.core.spatial import SpatialFilter
    sync = cp.cuda.Device().synchronize
    rows = []
    sizes = [(512, 1024)] if quick else [(512, 1024), (1024, 2048)]
    L, k, T = 21, 9, 5
    for H, W in sizes:
        rng = np.random.default_rng(0)
        p = rng.random((1, L, H, W)).astype(np.float32) + 0.05
        p /= p.sum(1, keepdims=True)
        img = photo_like(rng, 1, H, W)
        cc.set_mode_gpu()
        net = cc.Net(_crfgrad_proto(L, H, W, k, T), cc.TEST)
        net.params['crf'][1].data[...] = cp.asarray(rng.normal(0, 0.01, (L, L, k, k)).astype(np.float32))
        net.blobs['prob'].data[...] = cp.asarray(p)
        net.blobs['img'].data[...] = cp.asarray(img)
        net.blobs['crf'].diff[...] = cp.asarray(rng.normal(size=(1, L, H, W)).astype(np.float32))
        reps = 5 if H <= 512 else 3
        fwd = _time(lambda: net.forward(), sync, reps)
        fb = _time(lambda: (net.forward(), net.backward()), sync, reps)
        rows.append({'what': 'CrfGrad L=21 k=9 T=5 %dx%d forward' % (H, W), 'ms': fwd * 1e3})
        rows.append({'what': 'CrfGrad L=21 k=9 T=5 %dx%d fwd+bwd' % (H, W), 'ms': fb * 1e3})
        if H <= 512:
            out_k = cp.asnumpy(net.forward()['crf'])
            with _array_code():
                fwd_a = _time(lambda: net.forward(), sync, 3)
                out_a = cp.asnumpy(net.forward()['crf'])
            rows.append({'what': 'CrfGrad L=21 k=9 T=5 %dx%d forward, array code (no kernels); max rel '
                         'difference of the outputs kernels vs array code %.1e' % (H, W, _max_rel(out_k, out_a)),
                         'ms': fwd_a * 1e3})
            rows += _stages(cp, net, H, W, sync)
        # spatial term alone: ours (kernel transform once, T applies) vs T torch conv2d
        q = cp.asarray(p)
        w = cp.asarray(rng.normal(0, 0.01, (L, L, k, k)).astype(np.float32))

        def ours():
            sf = SpatialFilter(w, H, W)
            for _ in range(T):
                sf.apply(q)
        t_ours = _time(ours, sync, reps)
        rows.append({'what': 'spatial term, T=%d applies %dx%d (ours, %s)' % (T, H, W,
                     SpatialFilter(w, H, W).method), 'ms': t_ours * 1e3})
        try:
            import torch
            tq = torch.as_tensor(q, device='cuda')
            tw = torch.as_tensor(w, device='cuda')
            torch.backends.cudnn.benchmark = True

            def theirs():
                for _ in range(T):
                    torch.nn.functional.conv2d(tq, tw, padding=k // 2)
            t_torch = _time(lambda: (theirs(), torch.cuda.synchronize()), sync, reps)
            rows.append({'what': 'spatial term, T=%d torch conv2d (cuDNN) %dx%d' % (T, H, W),
                         'ms': t_torch * 1e3, 'ratio_ours_over_torch': t_ours / t_torch})
        except Exception as exc:
            rows.append({'what': 'torch conv2d %dx%d' % (H, W), 'error': str(exc)})
        cc.set_mode_cpu()
        net = None
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def _stages(cp, net, H, W, sync):
    """Where the forward's time goes (each stage alone: lattice build with normalisers, one bilateral
    filtering, one spatial apply, one projection) and the stages' outputs, kernels against array code,
    on random states and taps."""
    from crfgrad_cupy.core import lattice as lat_mod
    from crfgrad_cupy.core.projection import project_simplex
    from crfgrad_cupy.core.spatial import SpatialFilter
    feat = net.blobs['feat'].data[0]
    d = feat.shape[0]
    L = net.blobs['prob'].shape[1]
    rng = np.random.default_rng(5)

    def normal(shape, scale=1.0):
        return cp.asarray((scale * rng.standard_normal(shape)).astype(np.float32))
    q = normal((1, L, H, W))
    x = q[0].reshape(L, -1)
    w = normal(net.params['crf'][1].shape, 0.05)
    taps = normal((L, L, net.params['crf'][2].shape[-1]), 0.05)
    rows, outs = [], {}
    for label, ctx in (('kernels', None), ('array code', _array_code)):
        with (ctx() if ctx is not None else contextlib.nullcontext()):
            holder = {}

            def build():
                holder['f'] = lat_mod.BilateralFilter(lat_mod.build_lattice(feat.reshape(d, -1)))
            t_build = _time(build, sync, 5)
            f = holder['f']
            sf = SpatialFilter(w, H, W, method='fft')
            t_apply = _time(lambda: f.apply(x, taps), sync, 5)
            t_spat = _time(lambda: sf.apply(q), sync, 5)
            t_proj = _time(lambda: project_simplex(q, 0.5, axis=1), sync, 5)
            outs[label] = [cp.asnumpy(a) for a in (f.apply(x, taps), sf.apply(q), project_simplex(q, 0.5, axis=1)[0])]
        rows.append({'what': 'stages %dx%d (%s): lattice build + normalisers %.2f ms (M = %d), one bilateral '
                     'filtering %.2f ms, one spatial apply (FFT) %.2f ms, one projection %.2f ms' % (
                         H, W, label, t_build * 1e3, f.lattice.num_vertices, t_apply * 1e3, t_spat * 1e3,
                         t_proj * 1e3), 'ms': (t_build + t_apply + t_spat + t_proj) * 1e3})
    errs = [_max_rel(a, b) for a, b in zip(outs['kernels'], outs['array code'])]
    rows[-1]['what'] += ('; kernels vs array code, max rel difference: bilateral %.1e, spatial %.1e, '
                         'projection %.1e' % tuple(errs))
    if max(errs) > 1e-4:
        rows[-1]['what'] += ' (ABOVE 1e-4)'
    return rows


def environment():
    env = {'python': platform.python_version(), 'numpy': np.__version__,
           'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
    try:
        import cupy as cp
        env['cupy'] = cp.__version__
        props = cp.cuda.runtime.getDeviceProperties(0)
        env['device'] = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
        env['cuda_runtime'] = cp.cuda.runtime.runtimeGetVersion()
    except Exception as exc:
        env['cupy'] = 'unavailable: %s' % exc
    try:
        import torch
        env['torch'] = torch.__version__
    except Exception:
        env['torch'] = 'absent'
    return env


def to_markdown():
    env = RESULTS['environment']
    lines = ['### GPU check (%s)' % env.get('date'), '',
             'Device: %s; CuPy %s; CUDA runtime %s; torch %s; NumPy %s; Python %s.' % (
                 env.get('device'), env.get('cupy'), env.get('cuda_runtime'), env.get('torch'),
                 env.get('numpy'), env.get('python')), '']
    for name, r in RESULTS['parts'].items():
        if name == 'timings' and r['ok']:
            continue
        lines.append('- %s: %s (%.0f s)%s' % (name, 'passed' if r['ok'] else 'FAILED', r['seconds'],
                                           '' if r['ok'] else ' — ' + r['error']))
        if r['ok'] and isinstance(r.get('result'), dict):
            worst = r['result']
            lines.append('  - ' + ', '.join('%s: %s' % kv for kv in list(worst.items())[:12]))
    t = RESULTS['parts'].get('timings')
    if t and t['ok']:
        lines += ['', '| what | median ms | ratio ours/torch |', '|---|---|---|']
        for row in t['result']:
            if 'ms' in row:
                ratio = row.get('ratio_ours_over_torch')
                lines.append('| %s | %.2f | %s |' % (row['what'], row['ms'], '%.2f' % ratio if ratio else ''))
            else:
                lines.append('| %s | error: %s | |' % (row['what'], row['error']))
    elif t:
        lines.append('- timings: FAILED — %s' % t['error'])
    return '\n'.join(lines) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--shared', default=os.environ.get('CRFGRAD_SHARED', os.path.join(ROOT, '..', 'shared')))
    ap.add_argument('--out', default=os.environ.get('OUT', os.path.join(ROOT, 'out')))
    ap.add_argument('--quick', action='store_true', help='only the smaller timing size')
    ap.add_argument('--pytest-timeout', type=int, default=240)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS['environment'] = environment()
    log(json.dumps(RESULTS['environment']))
    oracle_tests(os.path.abspath(args.shared), args.pytest_timeout)
    compare_random()
    compare_bundled(os.path.abspath(args.shared))
    timings(args.quick)
    md = to_markdown()
    print(md)
    with open(os.path.join(args.out, 'gpu_results.md'), 'w') as f:
        f.write(md)
    with open(os.path.join(args.out, 'gpu_results.json'), 'w') as f:
        json.dump(RESULTS, f, indent=1, default=str)
    return 0 if all(r['ok'] for r in RESULTS['parts'].values()) else 1


if __name__ == '__main__':
    sys.exit(main())
