#!/usr/bin/env python3
"""CPU speed of CRF-Grad against the references, in one process and one run (issue 7).

Cases (the same inputs for ours and the reference of each row):

1. spatial term, L = 21, k = 9, 1×21×375×500: ours (one kernel transform + T = 5 applies)
   vs five ``torch.nn.functional.conv2d`` calls (skipped, with a note, without torch);
2. Gaussian bilateral filtering of 21 channels over a 500×375 RGB photo (d = 5): ours (lattice
   build, symmetric normalisers, one Gaussian filtering) vs pydensecrf's permutohedral lattice
   (``DenseCRF.addPairwiseEnergy`` = its lattice build and normaliser, plus one mean-field step's
   filtering measured as ``inference(1) - inference(0)``), for the CrfGrad features and for
   pydensecrf's usual bilateral scales;
3. the whole CrfGrad layer, N = 1, L = 21, k = 9, T = 5 at 250×250 and 500×375: forward and
   forward+backward (also with the NumPy fallback, CRFGRAD_NO_NUMBA=1, at 250×250);
4. float32 vs float64;
5. the unit of the ratios: one torch conv2d 21→21 9×9 on 1×21×H×W.

Median of --runs runs after a warm-up (fewer for the slow float64/NumPy-fallback rows, as the
table says), peak memory (tracemalloc: NumPy/Python allocations of one forward+backward; and the
process' peak RSS), machine, versions, load before and after, and a cProfile of the layer; the
report goes to benchmarks/RESULTS.md between the bench_crf markers (other sections are kept).

Usage: python3 benchmarks/bench_crf.py [--runs 5] [--image PATH] [--out benchmarks/RESULTS.md]
"""
import argparse
import contextlib
import cProfile
import datetime
import io
import os
import platform
import pstats
import resource
import sys
import time
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from google.protobuf import text_format  # noqa: E402

from crfgrad_cupy.blob import Blob  # noqa: E402
from crfgrad_cupy.core import accel  # noqa: E402
from crfgrad_cupy.core import lattice as latmod  # noqa: E402
from crfgrad_cupy.core import spatial  # noqa: E402
from crfgrad_cupy.layers.base import create_layer  # noqa: E402
from crfgrad_cupy.proto import caffe_pb2  # noqa: E402

START, END = '<!-- bench_crf:start -->', '<!-- bench_crf:end -->'
DEFAULT_IMAGE = os.path.join(ROOT, '..', 'shared', 'data', 'weizmann_horse', 'train', 'images', 'horse142.jpg')
BGR_MEAN = np.array([104.0, 117.0, 123.0], np.float32)
L, K, T = 21, 9, 5
POS_SCALE, COLOR_SCALE = 0.02, 0.3           # PixelFeature POSITION_AND_RGB scales of the benchmark
DCRF_SXY, DCRF_SRGB = 80.0, 13.0             # pydensecrf's usual addPairwiseBilateral scales


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def synthetic_photo(h, w, seed=0):
    """(3, h, w) mean-subtracted BGR: a noisy piecewise-constant picture (rectangles and discs,
    Gaussian noise σ = 8)."""
    rng = np.random.default_rng(seed)
    img = np.empty((3, h, w), np.float32)
    img[:] = rng.uniform(0, 255, (3, 1, 1))
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(12):
        c = rng.uniform(0, 255, 3).astype(np.float32)
        if rng.random() < 0.5:
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m = (yy >= y0) & (yy < y0 + rng.integers(h // 8, h // 2)) & (xx >= x0) & (xx < x0 + rng.integers(w // 8, w // 2))
        else:
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(min(h, w) // 10, min(h, w) // 3)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[:, m] = c[:, None]
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return img - BGR_MEAN[:, None, None]


def load_photo(path, h, w):
    """(3, h, w) mean-subtracted BGR float32 of the centre crop of ``path`` (scaled up first when it
    is smaller), or None."""
    if not path or not os.path.exists(path):
        return None
    from PIL import Image
    im = Image.open(path).convert('RGB')
    if im.size[0] < w or im.size[1] < h:
        s = max(w / im.size[0], h / im.size[1])
        im = im.resize((int(np.ceil(im.size[0] * s)), int(np.ceil(im.size[1] * s))), Image.BILINEAR)
    x0, y0 = (im.size[0] - w) // 2, (im.size[1] - h) // 2
    rgb = np.asarray(im, dtype=np.float32)[y0:y0 + h, x0:x0 + w]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[::-1]) - BGR_MEAN[:, None, None]


def pixel_features(img, pos_scale=POS_SCALE, color_scale=COLOR_SCALE):
    """PixelFeature POSITION_AND_RGB: (5, h, w) = (pos·y, pos·x, colour·B, colour·G, colour·R)."""
    c, h, w = img.shape
    f = np.empty((2 + c, h, w), np.float32)
    f[0] = np.arange(h, dtype=np.float32)[:, None] * np.float32(pos_scale)
    f[1] = np.arange(w, dtype=np.float32)[None, :] * np.float32(pos_scale)
    f[2:] = np.float32(color_scale) * img
    return f


def probabilities(h, w, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((1, L, h, w)) * 2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(dtype)


# ------------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------------
def median_time(fn, runs, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), len(ts)


def interleaved(fns, runs, warmup=1):
    """Medians of the functions run in turn (a, b, c, a, b, c, ...), so that a change of load
    during the benchmark hits the compared implementations alike.  A function may return its own
    time in seconds (else its wall-clock time is taken)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            own = fn()
            ts[i].append(own if isinstance(own, float) else time.perf_counter() - t)
    return [float(np.median(t)) for t in ts]


def traced_peak(fn):
    """Peak of the NumPy/Python allocations (tracemalloc) while fn runs, in MiB."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2 ** 20


@contextlib.contextmanager
def numpy_fallback():
    old = os.environ.get('CRFGRAD_NO_NUMBA')
    os.environ['CRFGRAD_NO_NUMBA'] = '1'
    try:
        yield
    finally:
        if old is None:
            del os.environ['CRFGRAD_NO_NUMBA']
        else:
            os.environ['CRFGRAD_NO_NUMBA'] = old


def rss_child(args, h, w):
    """Peak resident memory added by one forward+backward at h×w (float32), measured in a fresh
    process (see :func:`memory_child`), MiB."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', '%d,%d' % (h, w), '--image', args.image]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
        return float(out.strip().splitlines()[-1])
    except Exception as exc:  # pragma: no cover - reported in the table
        print('memory child failed:', exc, file=sys.stderr)
        return float('nan')


def _proc_status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(spec, image):
    """Prints the peak resident memory (MiB) added by one forward+backward: the high-water mark is
    reset (/proc/self/clear_refs) once the kernels are loaded and the inputs exist; ru_maxrss
    (inherited from the parent process, hence not usable here) only where /proc is missing."""
    h, w = (int(x) for x in spec.split(','))
    img = load_photo(image, h, w)
    if img is None:
        img = synthetic_photo(h, w)
    make_layer(16, 20, synthetic_photo(16, 20), np.float32)[1]()       # loads the compiled kernels
    fwd, fb = make_layer(h, w, img, np.float32)
    try:
        before = _proc_status_kib('VmRSS')
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        fb()
        after = _proc_status_kib('VmHWM')
    except (OSError, KeyError):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fb()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024.0)


def load():
    try:
        return open('/proc/loadavg').read().split()[:3]
    except OSError:
        return ['?'] * 3


def machine():
    model, cores = platform.processor() or '?', os.cpu_count()
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return model, cores


def versions(torch, dcrf):
    import scipy
    out = {'python': platform.python_version(), 'numpy': np.__version__, 'scipy': scipy.__version__}
    try:
        import numba
        out['numba'] = numba.__version__
    except Exception:
        out['numba'] = 'not installed'
    out['torch'] = torch.__version__ if torch is not None else 'not installed'
    if dcrf is not None:
        try:
            from importlib.metadata import version
            out['pydensecrf'] = 'pydensecrf2 ' + version('pydensecrf2')
        except Exception:
            out['pydensecrf'] = 'installed'
    else:
        out['pydensecrf'] = 'not installed'
    return out


# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------
def make_layer(h, w, img, dtype=np.float32, seed=0):
    """A CrfGrad layer (L = 21, k = 9, T = 5) on the photo's features with random small spatial
    filters and perturbed default taps; returns (forward, forward+backward) closures."""
    lp = caffe_pb2.LayerParameter()
    text_format.Merge('name: "crf" type: "CrfGrad" bottom: "p" bottom: "f" top: "q" crfgrad_param { '
                      'num_classes: %d kernel_size: %d num_iterations: %d }' % (L, K, T), lp)
    from crfgrad_cupy import backend
    backend.set_default_dtype(dtype)
    try:
        layer = create_layer(lp, caffe_pb2.TRAIN)
        p = probabilities(h, w, dtype=dtype)
        feat = pixel_features(img)[None].astype(dtype)
        pb, fb, top = Blob(p.shape, dtype=dtype), Blob(feat.shape, dtype=dtype), Blob((), dtype=dtype)
        pb.data, fb.data = p, feat
        layer.setup([pb, fb], [top])
    finally:
        backend.set_default_dtype(np.float32)
    rng = np.random.default_rng(seed)
    layer.blobs[1].data = (rng.standard_normal(layer.blobs[1].shape) * 0.01).astype(dtype)
    layer.blobs[2].data = (layer.blobs[2].data + rng.standard_normal(layer.blobs[2].shape) * 0.01).astype(dtype)
    diff = rng.standard_normal(p.shape).astype(dtype)

    def forward():
        layer.forward([pb, fb], [top])

    def forward_backward():
        layer.forward([pb, fb], [top])
        top.diff[...] = diff
        for b in layer.blobs:
            b.diff[...] = 0
        layer.backward([top], [True, False], [pb, fb])
    return forward, forward_backward


def torch_conv(torch, h, w):
    q = torch.from_numpy(np.random.default_rng(2).random((1, L, h, w), dtype=np.float32))
    wt = torch.from_numpy((np.random.default_rng(3).standard_normal((L, L, K, K)) * 0.01).astype(np.float32))
    return lambda: torch.nn.functional.conv2d(q, wt, padding=K // 2)


def bench_spatial(torch, runs, rows, notes):
    """(ours, torch) back to back (each with warm caches) and interleaved (each after the other)."""
    h, w = 375, 500
    q = np.random.default_rng(2).random((1, L, h, w), dtype=np.float32)
    W = (np.random.default_rng(3).standard_normal((L, L, K, K)) * 0.01).astype(np.float32)

    def ours():
        f = spatial.SpatialFilter(W, h, w)
        for _ in range(T):
            f.apply(q)
    f = spatial.SpatialFilter(W, h, w)
    label = 'ours (%s, %d×%d tiles of %d×%d)' % (f.method, f.tiling.ny, f.tiling.nx, f.tiling.ph, f.tiling.pw)
    case = 'spatial term, T = 5 applies (one kernel transform), 1×21×375×500'
    if torch is None:
        notes.append('torch is not installed: the spatial and conv2d reference rows are skipped.')
        t_ours, n = median_time(ours, runs)
        rows.append((case, label, t_ours, n))
        return t_ours, None
    conv = torch_conv(torch, h, w)

    def ref():
        for _ in range(T):
            conv()
    t_ours, _ = median_time(ours, runs)
    t_ref, _ = median_time(ref, runs)
    i_ours, i_ref = interleaved([ours, ref], runs)
    rows.append((case, label + ', back to back', t_ours, runs))
    rows.append(('', 'torch conv2d ×5, back to back', t_ref, runs))
    rows.append(('', 'ours, runs interleaved with torch\'s', i_ours, runs))
    rows.append(('', 'torch conv2d ×5, runs interleaved with ours', i_ref, runs))
    return t_ours, t_ref, i_ours, i_ref


def bench_gaussian(dcrf, img, runs, rows, notes, label, feats):
    """Ours vs pydensecrf on the same (5, n) features and the same 21 channels."""
    h, w = img.shape[1:]
    n = h * w
    x = np.random.default_rng(4).random((L, n), dtype=np.float32)

    def ours():
        bf = latmod.BilateralFilter(latmod.build_lattice(feats), 'symmetric')
        bf.gaussian(x)
    M = latmod.build_lattice(feats).num_vertices
    case = 'Gaussian filtering, 21 channels, 500×375, d = 5, %s (%d lattice points)' % (label, M)
    if dcrf is None:
        notes.append('pydensecrf is not installed: the Gaussian reference rows are skipped.')
        t_ours, k = median_time(ours, runs)
        rows.append((case, 'ours (build + normalisers + one pass)', t_ours, k))
        return t_ours, None
    U = np.ascontiguousarray(-np.log(x / x.sum(axis=0, keepdims=True)))

    def crf():
        d = dcrf.DenseCRF(n, L)
        d.setUnaryEnergy(U)
        return d

    def build():
        d = crf()
        t = time.perf_counter()
        d.addPairwiseEnergy(feats, compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
        return time.perf_counter() - t, d

    def one_pass(d, steps):
        t = time.perf_counter()
        d.inference(steps)
        return time.perf_counter() - t

    parts = []

    def ref():
        b, d = build()
        t1, t0 = one_pass(d, 1), one_pass(d, 0)
        parts.append((b, t1 - t0))
        return b + t1 - t0
    t_ours, t_ref = interleaved([ours, ref], runs)
    t_b, t_p = (float(np.median([p[i] for p in parts[1:]])) for i in (0, 1))
    rows.append((case, 'ours (build + normalisers + one pass)', t_ours, runs))
    rows.append(('', 'pydensecrf (addPairwiseEnergy %.1f ms + one filtering %.1f ms; runs interleaved with ours)'
                 % (1e3 * t_b, 1e3 * t_p), t_ref, runs))
    return t_ours, t_ref


def profile_layer(fb):
    pr = cProfile.Profile()
    pr.enable()
    fb()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats('tottime').print_stats(22)
    text = s.getvalue()
    keep = [ln for ln in text.splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(keep) if ln.lstrip().startswith('ncalls'))
    head = [ln for ln in keep[:start] if 'function calls' in ln]
    body = [ln.replace(ROOT + '/', '') for ln in keep[start:]]
    return '\n'.join(head + body)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def fmt(t):
    return '%.1f ms' % (1e3 * t) if t < 1 else '%.2f s' % t


def write_section(path, text):
    old = open(path).read() if os.path.exists(path) else '# Benchmark results\n'
    block = START + '\n' + text.rstrip() + '\n' + END
    if START in old and END in old:
        new = old[:old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + '\n\n' + block + '\n'
    with open(path, 'w') as f:
        f.write(new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--slow-runs', type=int, default=3, help='runs of the float64 and NumPy-fallback rows')
    ap.add_argument('--image', default=DEFAULT_IMAGE, help='photo (centre crop); synthetic when missing')
    ap.add_argument('--out', default=os.path.join(HERE, 'RESULTS.md'))
    ap.add_argument('--no-write', action='store_true')
    ap.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.image)
        return 0

    try:
        import torch
    except Exception:
        torch = None
    try:
        import pydensecrf.densecrf as dcrf
    except Exception:
        dcrf = None
    load0, t_start = load(), time.time()
    print('load at start:', ' '.join(load0), flush=True)
    rows, notes = [], []

    img_big = load_photo(args.image, 375, 500)
    source = os.path.basename(args.image) + ' (centre crop)' if img_big is not None else None
    if img_big is None:
        img_big = synthetic_photo(375, 500)
        source = 'synthetic noisy piecewise-constant picture (the photo %s was not found)' % args.image
    img_small = load_photo(args.image, 250, 250) if source and 'synthetic' not in source else None
    if img_small is None:
        img_small = synthetic_photo(250, 250)

    units, units_interleaved = {}, {}

    # 1. spatial
    sp = bench_spatial(torch, args.runs, rows, notes)
    t_sp, t_sp_ref = sp[0], sp[1]
    print('spatial', ' '.join(fmt(x) for x in sp if x), flush=True)

    # 2. Gaussian lattice filtering
    f_crf = np.ascontiguousarray(pixel_features(img_big).reshape(5, -1))
    f_dcrf = np.ascontiguousarray(pixel_features(img_big, 1.0 / DCRF_SXY, 1.0 / DCRF_SRGB).reshape(5, -1))
    gauss = [bench_gaussian(dcrf, img_big, args.runs, rows, notes, 'CrfGrad features (pos %g, colour %g)'
                            % (POS_SCALE, COLOR_SCALE), f_crf),
             bench_gaussian(dcrf, img_big, args.runs, rows, notes, 'pydensecrf scales (sxy %g, srgb %g)'
                            % (DCRF_SXY, DCRF_SRGB), f_dcrf)]
    print('gaussian', [(fmt(a), fmt(b) if b else '-') for a, b in gauss], flush=True)

    # 3./4. the layer
    layer_times, mem = {}, {}
    for (h, w), img in (((250, 250), img_small), ((375, 500), img_big)):
        for dtype in (np.float32, np.float64):
            fwd, fb = make_layer(h, w, img, dtype)
            runs = args.runs if dtype == np.float32 else args.slow_runs
            name = 'CrfGrad layer N=1, L=21, k=9, T=5, %d×%d, %s' % (h, w, np.dtype(dtype).name)
            if dtype == np.float32 and torch is not None:
                # 5. the unit: one conv2d on the same size, back to back (warm caches: the smaller,
                # stricter unit) and with its runs interleaved with the layer's (same load)
                conv = torch_conv(torch, h, w)
                warm, _ = median_time(conv, runs, warmup=2)
                cold, tf, tb = interleaved([conv, fwd, fb], runs)
                units[(h, w)] = warm
                units_interleaved[(h, w)] = cold
                rows.append(('one torch conv2d 21→21 9×9 on 1×21×%d×%d (the unit)' % (h, w),
                             'torch (%d threads), back to back' % torch.get_num_threads(), warm, runs))
                rows.append(('', 'torch, runs interleaved with the layer\'s', cold, runs))
                n1 = n2 = runs
            else:
                tf, n1 = median_time(fwd, runs)
                tb, n2 = median_time(fb, runs)
            layer_times[(h, w, dtype)] = (tf, tb)
            rows.append((name, 'ours forward', tf, n1))
            rows.append(('', 'ours forward+backward', tb, n2))
            if dtype == np.float32:
                mem[(h, w)] = (traced_peak(fb), rss_child(args, h, w))
            print(name, fmt(tf), fmt(tb), flush=True)
            if dtype == np.float32 and accel.kernels(np) is not None and (h, w) == (250, 250):
                with numpy_fallback():
                    fwd_np, fb_np = make_layer(h, w, img, dtype)
                    tfn, n1 = median_time(fwd_np, args.slow_runs)
                    tbn, n2 = median_time(fb_np, args.slow_runs)
                rows.append(('', 'ours, NumPy fallback (CRFGRAD_NO_NUMBA=1), forward', tfn, n1))
                rows.append(('', 'ours, NumPy fallback, forward+backward', tbn, n2))
                print('numpy fallback', fmt(tfn), fmt(tbn), flush=True)
    fwd, fb = make_layer(375, 500, img_big, np.float32)
    fb()
    prof = profile_layer(fb)
    lat = latmod.build_lattice(np.ascontiguousarray(pixel_features(img_big).reshape(5, -1)))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    load1 = load()
    print('load at end:', ' '.join(load1), flush=True)

    # ---- report
    model, cores = machine()
    ver = versions(torch, dcrf)
    out = []
    out.append('## CRF-Grad on the CPU (benchmarks/bench_crf.py)\n')
    out.append('Run %s on %s (%d cores; numba threads %s); %s. Load average (1/5/15 min) at start %s, at '
               'end %s: other processes (a training job of this project among them) may have been running, so '
               'absolute times are pessimistic; ratios come from the same run.\n'
               % (datetime.datetime.now().strftime('%Y-%m-%d %H:%M'), model, cores,
                  _numba_threads(), ', '.join('%s %s' % kv for kv in ver.items()), ' '.join(load0), ' '.join(load1)))
    out.append('Input: %s, 500×375 (and a 250×250 crop); PixelFeature POSITION_AND_RGB features, pos_scale %g, '
               'color_scale %g: %d lattice points for %d pixels. Median of the stated number of runs after one '
               'warm-up; wall-clock time; the runs of compared implementations are interleaved (a, b, a, b, ...) '
               'so that load changes during the run affect both.\n' % (source, POS_SCALE, COLOR_SCALE, lat.num_vertices, 375 * 500))
    out.append('| case | implementation | median | runs |')
    out.append('| --- | --- | ---: | ---: |')
    for case, impl, t, n in rows:
        out.append('| %s | %s | %s | %d |' % (case, impl, fmt(t), n))
    out.append('')
    out.append('### Targets (ratios from this run)\n')
    out.append('| target | value | met |')
    out.append('| --- | ---: | :---: |')
    u = units.get((375, 500))
    tf, tb = layer_times[(375, 500, np.float32)]
    if u:
        ui = units_interleaved[(375, 500)]
        out.append('| layer forward ≤ 14× one conv2d (500×375; unit back to back, in brackets interleaved) | '
                   '%.1f× (%.1f×) | %s |' % (tf / u, tf / ui, _yes(tf / u <= 14)))
        out.append('| layer forward+backward ≤ 42× one conv2d (500×375) | %.1f× (%.1f×) | %s |'
                   % (tb / u, tb / ui, _yes(tb / u <= 42)))
        us = units[(250, 250)]
        tfs, tbs = layer_times[(250, 250, np.float32)]
        out.append('| (250×250: forward / forward+backward in conv2d units) | %.1f× / %.1f× | |' % (tfs / us, tbs / us))
    if t_sp_ref:
        out.append('| spatial term over a T = 5 forward ≥ 2× faster than 5 conv2d (back to back; in brackets '
                   'interleaved) | %.2f× faster (%.2f×) | %s |' % (t_sp_ref / t_sp, sp[3] / sp[2], _yes(t_sp_ref / t_sp >= 2)))
    for (a, b), lab in zip(gauss, ('CrfGrad features', 'pydensecrf scales')):
        if b:
            out.append('| Gaussian filtering (build + one pass) no slower than pydensecrf, %s | %.2f× its time | %s |'
                       % (lab, a / b, _yes(a <= b)))
    for (h, w) in ((250, 250), (375, 500)):
        f32, f64 = layer_times[(h, w, np.float32)], layer_times[(h, w, np.float64)]
        out.append('| float64 / float32, %d×%d (forward, forward+backward) | %.1f×, %.1f× | |'
                   % (h, w, f64[0] / f32[0], f64[1] / f32[1]))
    out.append('')
    out.append('On this shared 2-core machine the ratios move by about ±10 % from run to run (the numba kernels '
               'and the spatial term use both cores, pydensecrf one: when another process takes a core, the '
               'Gaussian comparison loses most of its margin). Rerun with more --runs when a value is close to '
               'its target.\n')
    out.append('### Memory\n')
    for (h, w), (m, r) in mem.items():
        out.append('- %d×%d forward+backward, float32: peak of the NumPy allocations (tracemalloc; the numba '
                   'kernels\' own buffers are not traced) %.0f MiB; peak resident memory added by the first '
                   'forward+backward in a fresh process (peak RSS minus RSS before, everything included) %.0f MiB.'
                   % (h, w, m, r))
    out.append('- Peak resident set of the whole benchmark process (ru_maxrss, includes torch, pydensecrf and the '
               'float64 runs): %.0f MiB.' % maxrss)
    out.append('')
    if notes:
        out.append('### Notes\n')
        out.extend('- ' + n for n in sorted(set(notes)))
        out.append('')
    out.append('### Profile of the layer (500×375, float32, one forward+backward, cProfile, by own time)\n')
    out.append('```\n' + prof + '\n```')
    text = '\n'.join(out)
    print(text)
    if not args.no_write:
        write_section(args.out, text)
        print('written to', args.out)
    return 0


def _yes(ok):
    return 'yes' if ok else '**no**'


def _numba_threads():
    if accel.kernels(np) is None:
        return 'n/a (NumPy path)'
    import numba
    return str(numba.get_num_threads())


if __name__ == '__main__':
    sys.exit(main())
