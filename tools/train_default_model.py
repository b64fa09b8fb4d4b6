#!/usr/bin/env python3
"""Train the bundled default model (crfgrad_cupy/models/horse/) with crfgrad_cupy's own solver.

    python3 tools/train_default_model.py --data /work/shared/data/weizmann_horse \\
        --out crfgrad_cupy/models/horse [--size 128] [--seed 1701]

Data: the Weizmann Horse ``train`` split (150 images) for training, ``val`` (50) only for model
selection.  Preprocessing as the authors'-Caffe horse model: fit into S x S keeping the aspect
ratio, pad bottom/right (image 0, label 255), RGB -> BGR, subtract (104.008, 116.669, 122.675).

Net: a small fully convolutional unary net (16/32/64 channels, two 2x2 max-pools, dilated 3x3
convolutions with dilation 2, 4, 8 at 1/4 resolution, a 1x1 classifier, a fixed bilinear x4
Deconvolution and a Crop) -> Softmax ``score_pre`` -> PixelFeature (POSITION_AND_RGB) -> CrfGrad
-> ``score_post``.

Training (Input-fed nets, Adam, every step by :mod:`crfgrad_cupy.solver`):

1. Unary net on the train split, random mirror / scale / shift augmentation; the val mean IoU
   (at full mask resolution) is measured every ``--eval-every`` iterations and the best
   iterate is kept.
2. CRF (CrfGrad: 5 steps of size 0.5, leak 0.5, 9x9 spatial filters, bilateral taps on
   PixelFeature position + colour).  First a Potts model with Gaussian filters is chosen on val
   from a small grid (spatial / bilateral weights); it is the starting point.  Then the CRF is
   learned on unaries that look like test-time unaries: the train split is cut into two folds,
   a unary net is trained on each fold (same recipe, fewer iterations) and predicts the OTHER
   fold, so every training image gets a held-out unary (a net that fits its own training images
   far better than unseen ones would teach the CRF to trust the unary too much: learned CRF
   weights trained on such unaries overfit within a few epochs).  The CRF is trained on these
   held-out unaries with the unary net fixed (Adam, lr 1e-5); the val mean IoU of the final net
   (stage-1 unary + CRF) selects the iterate, the Potts start (iteration 0) included.

Writes ``deploy.prototxt`` + ``horse.caffemodel`` + ``samples/`` (two val images and masks) +
``PROVENANCE.md`` into --out and the training log (Caffe's glog format), the generated train
prototxts/solvers and ``summary.json`` into --work.  The functions here are also used by
benchmarks/weizmann_table1.py.
"""
import argparse
import collections
import json
import os
import platform
import shutil
import sys
import time

# One BLAS thread: on a machine whose cores other processes share, multi-threaded OpenBLAS
# spin-waits and runs several times slower (set OPENBLAS_NUM_THREADS to override).
for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ.setdefault(_var, '1')

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import crfgrad_cupy as cc  # noqa: E402
from crfgrad_cupy import segment as sg  # noqa: E402
from crfgrad_cupy.preprocess import IMAGENET_BGR_MEAN, fit_size, load_image, load_mask, resize_uint8  # noqa: E402
from crfgrad_cupy.preprocess import Preprocessor  # noqa: E402

MEAN = np.asarray(IMAGENET_BGR_MEAN, np.float32)

# (name, channels, dilation, pool after)
BODY = [('conv1_1', 16, 1, True),
        ('conv2_1', 32, 1, False), ('conv2_2', 32, 1, True),
        ('conv3_1', 64, 1, False), ('conv3_2', 64, 2, False),
        ('conv3_3', 64, 4, False), ('conv3_4', 64, 8, False)]

CRF_DEFAULTS = collections.OrderedDict([
    ('num_classes', 2), ('kernel_size', 9), ('num_iterations', 5), ('step_size', 0.5),
    ('leak_factor', 0.5), ('log_eps', 0.1), ('unary_weight_init', 1.0), ('pl_filter_init_scale', 0.1),
    ('use_cudnn', False)])
# Potts initialisations tried on val before the CRF is learned: (spatial weight, bilateral weight),
# spatial Gaussian std 2 px (segment.potts_filters), unary weight 1.
POTTS_GRID = [(ws, wb) for ws in (0.0, 1.0) for wb in (1.0, 3.0, 6.0)]
POTTS_SIGMA = 2.0


def pixel_feature(size):
    """PixelFeature scales: colour 0.3 and a position bandwidth of size/6.4 px (0.05 at 128 px,
    as the authors'-Caffe horse model), i.e. the same relative extent at every input size."""
    return {'pos_scale': 6.4 / size, 'color_scale': 0.3}


def log(msg):
    print('[%s] %s' % (time.strftime('%H:%M:%S'), msg), flush=True)


# --- prototxt generation ----------------------------------------------------------------------

def _input(tops_shapes):
    shapes = ''.join(' shape { %s }' % ' '.join('dim: %d' % d for d in s) for _, s in tops_shapes)
    tops = ' '.join('top: "%s"' % t for t, _ in tops_shapes)
    return 'layer { name: "input" type: "Input" %s input_param {%s } }\n' % (tops, shapes)


def _conv(name, bottom, num, kernel=3, dilation=1, relu=True, filler='type: "msra"', lr=1):
    pad = dilation * (kernel // 2)
    s = ('layer { name: "%s" type: "Convolution" bottom: "%s" top: "%s"\n'
         '  param { lr_mult: %g decay_mult: 1 } param { lr_mult: %g decay_mult: 0 }\n'
         '  convolution_param { num_output: %d kernel_size: %d pad: %d%s\n'
         '    weight_filler { %s } bias_filler { type: "constant" value: 0 } } }\n'
         % (name, bottom, name, lr, 2 * lr, num, kernel, pad,
            ' dilation: %d' % dilation if dilation > 1 else '', filler))
    if relu:
        s += 'layer { name: "relu%s" type: "ReLU" bottom: "%s" top: "%s" }\n' % (name[4:], name, name)
    return s


def unary_body(lr=1):
    """Layers from ``data`` to ``score`` (2 x S x S scores)."""
    s, bottom = '', 'data'
    for i, (name, ch, dil, pool) in enumerate(BODY):
        s += _conv(name, bottom, ch, dilation=dil, lr=lr)
        bottom = name
        if pool:
            p = 'pool%s' % name[4]
            s += ('layer { name: "%s" type: "Pooling" bottom: "%s" top: "%s" '
                  'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n' % (p, bottom, p))
            bottom = p
    s += _conv('score_fr', bottom, 2, kernel=1, relu=False, filler='type: "gaussian" std: 0.01', lr=lr)
    s += ('layer { name: "upscore" type: "Deconvolution" bottom: "score_fr" top: "upscore" param { lr_mult: 0 }\n'
          '  convolution_param { num_output: 2 kernel_size: 8 stride: 4 group: 2 bias_term: false\n'
          '    weight_filler { type: "bilinear" } } }\n'
          'layer { name: "score" type: "Crop" bottom: "upscore" bottom: "data" top: "score" '
          'crop_param { axis: 2 offset: 2 } }\n')
    return s


def crf_layers(size, prob='score_pre', crf=None, lr=None, pixel=None):
    """PixelFeature on ``data`` + CrfGrad(prob, features) -> score_post."""
    pixel = dict(pixel_feature(size), **(pixel or {}))
    return sg.crf_layers_prototxt(prob, _crf_fields(crf), pixel['pos_scale'], pixel['color_scale'], lr)


def deploy_prototxt(size, crf=None, pixel=None, with_crf=True):
    s = 'name: "horse_crfgrad_small"\n' + _input([('data', (1, 3, size, size))]) + unary_body()
    s += 'layer { name: "softmax_pre" type: "Softmax" bottom: "score" top: "score_pre" }\n'
    if with_crf:
        s += crf_layers(size, 'score_pre', crf, pixel=pixel)
    return s


def _loss(bottom):
    return ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "%s" bottom: "label" top: "loss"\n'
            '  loss_param { ignore_label: 255 normalize: false } }\n' % bottom)


def unary_train_prototxt(size, batch):
    return ('name: "horse_unary_train"\n'
            + _input([('data', (batch, 3, size, size)), ('label', (batch, 1, size, size))])
            + unary_body() + _loss('score'))


def _crf_fields(crf):
    return collections.OrderedDict(CRF_DEFAULTS, **(crf or {}))


def crf_train_prototxt(size, batch, crf=None, lr=(1, 1, 1), pixel=None):
    """CRF only, fed with (precomputed) unary probabilities ``prob``, SoftmaxWithLoss on score_post."""
    pixel = dict(pixel_feature(size), **(pixel or {}))
    return sg.crf_net_prototxt(2, size, size, _crf_fields(crf), pixel['pos_scale'], pixel['color_scale'],
                               batch=batch, lr_mults=lr, loss=True)


def crf_only_prototxt(size, crf=None, pixel=None):
    """Deploy-style CRF-only net: Input prob + data -> score_post."""
    pixel = dict(pixel_feature(size), **(pixel or {}))
    return sg.crf_net_prototxt(2, size, size, _crf_fields(crf), pixel['pos_scale'], pixel['color_scale'])


def solver_prototxt(net_path, base_lr, max_iter, seed, prefix, weight_decay=5e-4, stepsize=0):
    """Adam; ``stepsize`` > 0: the rate drops 10x every ``stepsize`` iterations ('step' policy)."""
    policy = 'lr_policy: "step"\ngamma: 0.1\nstepsize: %d\n' % stepsize if stepsize else 'lr_policy: "fixed"\n'
    return ('net: "%s"\ntype: "Adam"\nbase_lr: %g\nmomentum: 0.9\nmomentum2: 0.999\ndelta: 1e-8\n%s'
            'weight_decay: %g\nmax_iter: %d\ndisplay: 50\naverage_loss: 50\n'
            'snapshot: 0\nsnapshot_prefix: "%s"\nrandom_seed: %d\nsnapshot_after_train: false\n'
            % (net_path, base_lr, policy, weight_decay, max_iter, prefix, seed))


# --- data -------------------------------------------------------------------------------------

Sample = collections.namedtuple('Sample', ['stem', 'image', 'mask', 'small', 'small_mask', 'data',
                                           'label', 'placement'])


def read_split(root, split):
    """[(stem, image path, mask path)] of a split folder (images/ + masks/)."""
    return [(os.path.splitext(os.path.basename(i))[0], i, m)
            for i, m in sg.image_mask_pairs(os.path.join(root, split))]


def prepare(pairs, size):
    """Samples at network size: the fitted uint8 image/mask, the padded input and label."""
    pre = Preprocessor(input_size=(size, size))
    out = []
    for stem, ipath, mpath in pairs:
        img, mask = load_image(ipath), load_mask(mpath)
        h, w = mask.shape
        nh, nw = fit_size(h, w, size, size)
        small = resize_uint8(img, nh, nw)
        small_mask = resize_uint8(mask, nh, nw, 'nearest')
        data, placement = pre(img)
        label = np.full((size, size), 255, np.uint8)
        label[:nh, :nw] = small_mask
        out.append(Sample(stem, ipath, mask, small, small_mask, data, label, placement))
    return out


def to_input(img_u8):
    """uint8 RGB (h, w, 3) -> float32 BGR - mean (3, h, w)."""
    return img_u8[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) - MEAN[:, None, None]


class Augmenter:
    """Random training batches: mirror, scale in [smin, 1] of the fitted size, random position
    on the S x S canvas (image padding 0 -> -mean, label padding 255)."""

    def __init__(self, samples, size, rng, scale=(0.7, 1.0), augment=True):
        self.samples, self.size, self.rng, self.scale, self.augment = samples, size, rng, scale, augment

    def one(self, s):
        S = self.size
        img, mask = s.small, s.small_mask
        if not self.augment:
            return s.data, s.label
        if self.rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        f = self.rng.uniform(*self.scale)
        h, w = mask.shape
        nh, nw = max(8, int(round(h * f))), max(8, int(round(w * f)))
        img = resize_uint8(np.ascontiguousarray(img), nh, nw)
        mask = resize_uint8(np.ascontiguousarray(mask), nh, nw, 'nearest')
        y0 = int(self.rng.integers(0, S - nh + 1))
        x0 = int(self.rng.integers(0, S - nw + 1))
        canvas = np.zeros((S, S, 3), np.uint8)
        canvas[y0:y0 + nh, x0:x0 + nw] = img
        label = np.full((S, S), 255, np.uint8)
        label[y0:y0 + nh, x0:x0 + nw] = mask
        return to_input(canvas), label

    def batch(self, n):
        idx = self.rng.choice(len(self.samples), n, replace=len(self.samples) < n)
        pairs = [self.one(self.samples[i]) for i in idx]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])[:, None].astype(np.float32)


def items(samples):
    """(data, placement, full-resolution mask) items for segment.score_items."""
    return [(s.data, s.placement, s.mask) for s in samples]


def miou(conf):
    return 100.0 * sg.iou_from_confusion(conf)[1]


# --- training ---------------------------------------------------------------------------------

def snapshot_params(net):
    return {name: [np.array(cc.backend.to_numpy(b.data)) for b in blobs] for name, blobs in net.params.items()}


def load_params(net, params):
    for name, arrays in params.items():
        if name in net.params:
            for b, a in zip(net.params[name], arrays):
                b.data[...] = a


def save_stage(path, params, info):
    arrays = {'%s/%d' % (name, i): a for name, blobs in params.items() for i, a in enumerate(blobs)}
    np.savez(path, info=json.dumps(info), **arrays)


def load_stage(path):
    params = collections.OrderedDict()
    with np.load(path) as z:
        info = json.loads(str(z['info']))
        for key in z.files:
            if key == 'info':
                continue
            name, i = key.rsplit('/', 1)
            params.setdefault(name, {})[int(i)] = z[key]
    return {n: [d[i] for i in sorted(d)] for n, d in params.items()}, info


def make_solver(work, tag, net_text, base_lr, max_iter, seed, log_file, stepsize=0):
    net_path = os.path.join(work, '%s_train.prototxt' % tag)
    with open(net_path, 'w') as f:
        f.write(net_text)
    solver_path = os.path.join(work, '%s_solver.prototxt' % tag)
    with open(solver_path, 'w') as f:
        f.write(solver_prototxt(os.path.basename(net_path), base_lr, max_iter, seed,
                                os.path.join(work, 'snapshots', tag), stepsize=stepsize))
    return cc.get_solver(solver_path, log_file=log_file, progress=False)


def train_unary(train, val, size, iters, seed, work, log_file, tag='unary', batch=4, base_lr=1e-3,
                eval_every=500, rng=None):
    """Stage 1: train the unary net; returns (best params, best val mIoU, history).

    ``val`` None: no selection, the last iterate is returned."""
    rng = rng or np.random.default_rng(seed)
    solver = make_solver(work, tag, unary_train_prototxt(size, batch), base_lr, iters, seed, log_file,
                         stepsize=int(iters * 0.75))
    aug = Augmenter(train, size, rng)
    net = solver.net

    def feed():
        d, l = aug.batch(batch)
        net.blobs['data'].data[...] = d
        net.blobs['label'].data[...] = l
    solver.add_callback(on_start=feed)
    evaluator = None
    if val is not None:
        evaluator = cc.Net(deploy_prototxt(size, with_crf=False), cc.TEST)
        evaluator.share_with(net)
    best, best_miou, history = None, -1.0, []
    t0 = time.time()
    done = 0
    while done < iters:
        n = min(eval_every, iters - done)
        solver.step(n)
        done += n
        if evaluator is not None:
            m = miou(sg.score_items(evaluator, items(val), ['score_pre'])['score_pre'])
            history.append((done, m))
            log('%s: iter %d loss %.1f val mIoU %.2f (%.0f s)' % (tag, done, solver.smoothed_loss, m,
                                                                   time.time() - t0))
            if m > best_miou:
                best, best_miou = snapshot_params(net), m
        else:
            log('%s: iter %d loss %.1f (%.0f s)' % (tag, done, solver.smoothed_loss, time.time() - t0))
    solver.close()
    if best is None:
        best = snapshot_params(net)
    return best, best_miou, history


def unary_probs(params, samples, size, mirror=False):
    """score_pre (N, 2, S, S) of a unary net with ``params`` on samples (optionally mirrored)."""
    net = cc.Net(deploy_prototxt(size, with_crf=False), cc.TEST)
    load_params(net, params)
    out = []
    for s in samples:
        data = s.data
        if mirror:
            data = data[:, :, ::-1]          # a mirror of the padded input (padding now on the left)
        sg.run_net(net, np.ascontiguousarray(data))
        out.append(np.array(cc.backend.to_numpy(net.blobs['score_pre'].data[0])))
    return np.stack(out)


def crossfit_unaries(train, size, iters, seed, work, log_file, folds=2):
    """Held-out unaries for every training image (and its mirror): k unary nets, each trained
    on the other folds.  Returns (probs (N, 2, S, S), probs of the mirrored inputs)."""
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(len(train))
    probs = np.zeros((len(train), 2, size, size), np.float32)
    probs_m = np.zeros_like(probs)
    for k in range(folds):
        held = order[k::folds]
        held_set = set(held.tolist())
        rest = [train[i] for i in order if i not in held_set]
        params, _, _ = train_unary(rest, None, size, iters, seed + 10 + k, work, log_file, tag='fold%d' % k,
                                   rng=np.random.default_rng(seed + 10 + k))
        hs = [train[i] for i in held]
        probs[held] = unary_probs(params, hs, size)
        probs_m[held] = unary_probs(params, hs, size, mirror=True)
    return probs, probs_m


def crf_miou(net, samples, probs):
    """Val mean IoU (full mask resolution) of a CRF-only net (crf_only_prototxt) on given unaries."""
    conf = None
    for s, p in zip(samples, probs):
        net.blobs['prob'].data[...] = p[None]
        net.blobs['data'].data[...] = s.data[None]
        net.forward()
        full = sg.to_image_resolution(net.blobs['score_post'].data[0], s.placement)
        c = sg.confusion(cc.backend.to_numpy(full.argmax(axis=0)), s.mask, 2)
        conf = c if conf is None else conf + c
    return miou(conf)


def e2e_train_prototxt(size, batch, crf=None, lr=(10, 10, 10)):
    """The whole net (unary + CRF) for end-to-end training, SoftmaxWithLoss on score_post."""
    return ('name: "horse_e2e_train"\n'
            + _input([('data', (batch, 3, size, size)), ('label', (batch, 1, size, size))])
            + unary_body()
            + 'layer { name: "softmax_pre" type: "Softmax" bottom: "score" top: "score_pre" }\n'
            + crf_layers(size, 'score_pre', crf, lr) + _loss('score_post'))


def train_e2e(train, val, unary_params, size, iters, seed, work, log_file, crf=None, lr_mults=(10, 10, 10),
              base_lr=1e-4, eval_every=40, init=None, tag='e2e'):
    """Unary net + CRF trained together from ``unary_params`` (batch 1, augmented); the val mean
    IoU of score_post picks the iterate (iteration 0 included).  ``init``: initial CRF blobs
    (None: the layer's initialiser).  Returns (best params {layer: arrays}, best mIoU, history)."""
    rng = np.random.default_rng(seed + 3)
    solver = make_solver(work, tag, e2e_train_prototxt(size, 1, crf, lr_mults), base_lr, iters, seed, log_file)
    net = solver.net
    load_params(net, unary_params)
    if init is not None:
        for b, a in zip(net.params['crf'], init):
            b.data[...] = a
    aug = Augmenter(train, size, rng)

    def feed():
        d, l = aug.batch(1)
        net.blobs['data'].data[...] = d
        net.blobs['label'].data[...] = l
    solver.add_callback(on_start=feed)
    evaluator = cc.Net(deploy_prototxt(size, crf), cc.TEST)
    evaluator.share_with(net)

    def score():
        confs = sg.score_items(evaluator, items(val), ['score_pre', 'score_post'])
        return miou(confs['score_post']), miou(confs['score_pre'])
    t0 = time.time()
    m, mu = score()
    best, best_miou, history = snapshot_params(net), m, [(0, m)]
    log('%s: iter 0 val mIoU CRF %.2f (unary %.2f)' % (tag, m, mu))
    done = 0
    while done < iters:
        n = min(eval_every, iters - done)
        solver.step(n)
        done += n
        m, mu = score()
        history.append((done, m))
        w = net.params['crf']
        log('%s: iter %d loss %.1f val mIoU CRF %.2f (unary %.2f)  w_u %.3f |spatial| %.3f |taps| %.3f (%.0f s)'
            % (tag, done, solver.smoothed_loss, m, mu, float(w[0].data.ravel()[0]),
               float(np.abs(w[1].data).max()), float(np.abs(w[2].data).max()), time.time() - t0))
        if m > best_miou:
            best, best_miou = snapshot_params(net), m
    solver.close()
    return best, best_miou, history


def potts_blobs(spatial_weight, bilateral_weight, sigma=POTTS_SIGMA, kernel=9):
    """CrfGrad blobs [w_u = 1, spatial, taps] of a Potts model with Gaussian filters."""
    spatial, taps = sg.potts_filters(2, kernel, spatial_weight, sigma, bilateral_weight, 63)
    return [np.ones((1, 1, 1, 1), np.float32), spatial, taps]


def potts_grid(val, val_probs, size, grid=POTTS_GRID, crf=None):
    """[(val mIoU, spatial weight, bilateral weight)] of fixed Potts CRFs on the val unaries."""
    net = cc.Net(crf_only_prototxt(size, crf), cc.TEST)
    out = []
    for ws, wb in grid:
        for b, a in zip(net.params['crf'], potts_blobs(ws, wb)):
            b.data[...] = a
        out.append((crf_miou(net, val, val_probs), ws, wb))
        log('  Potts spatial %g bilateral %g: val mIoU %.2f' % (ws, wb, out[-1][0]))
    return out


def train_crf(train, probs, probs_m, val, val_probs, size, iters, seed, work, log_file, crf=None,
              lr_mults=(1, 1, 1), base_lr=1e-3, eval_every=50, init=None, tag='crf'):
    """Stage 2: CRF parameters on fixed unaries; returns (best CRF blobs, best val mIoU, history).

    ``probs``/``probs_m``: unaries of the train samples and of their mirrors; ``val_probs``:
    unaries of the val samples; ``init``: initial CRF blobs (None: the layer's initialiser)."""
    rng = np.random.default_rng(seed + 2)
    solver = make_solver(work, tag, crf_train_prototxt(size, 1, crf, lr_mults), base_lr, iters, seed,
                         log_file)
    net = solver.net
    if init is not None:
        for b, a in zip(net.params['crf'], init):
            b.data[...] = a
    labels = np.stack([s.label for s in train]).astype(np.float32)

    def feed():
        i = int(rng.integers(len(train)))
        if rng.random() < 0.5:
            p, d, l = probs_m[i], train[i].data[:, :, ::-1], labels[i][:, ::-1]
        else:
            p, d, l = probs[i], train[i].data, labels[i]
        net.blobs['prob'].data[...] = p[None]
        net.blobs['data'].data[...] = np.ascontiguousarray(d)[None]
        net.blobs['label'].data[...] = np.ascontiguousarray(l)[None, None]
    solver.add_callback(on_start=feed)
    evaluator = cc.Net(crf_only_prototxt(size, crf), cc.TEST)
    evaluator.share_with(net)

    def score():
        return crf_miou(evaluator, val, val_probs)
    t0 = time.time()
    m = score()
    best, best_miou, history = [np.array(b.data) for b in net.params['crf']], m, [(0, m)]
    log('%s: iter 0 val mIoU %.2f (initial CRF)' % (tag, m))
    done = 0
    while done < iters:
        n = min(eval_every, iters - done)
        solver.step(n)
        done += n
        m = score()
        history.append((done, m))
        w = net.params['crf']
        log('%s: iter %d loss %.1f val mIoU %.2f  w_u %.3f |spatial| %.3f |taps| %.3f (%.0f s)'
            % (tag, done, solver.smoothed_loss, m, float(w[0].data.ravel()[0]), float(np.abs(w[1].data).max()),
               float(np.abs(w[2].data).max()), time.time() - t0))
        if m > best_miou:
            best, best_miou = [np.array(b.data) for b in net.params['crf']], m
    solver.close()
    return best, best_miou, history


# --- the bundle -------------------------------------------------------------------------------

def write_bundle(out, size, unary_params, crf_blobs, val, samples):
    os.makedirs(os.path.join(out, 'samples', 'images'), exist_ok=True)
    os.makedirs(os.path.join(out, 'samples', 'masks'), exist_ok=True)
    text = deploy_prototxt(size)
    with open(os.path.join(out, 'deploy.prototxt'), 'w') as f:
        f.write(text)
    net = cc.Net(os.path.join(out, 'deploy.prototxt'), cc.TEST)
    load_params(net, unary_params)
    for b, a in zip(net.params['crf'], crf_blobs):
        b.data[...] = a
    net.save(os.path.join(out, 'horse.caffemodel'))
    from PIL import Image
    for stem in samples:
        s = [v for v in val if v.stem == stem][0]
        shutil.copyfile(s.image, os.path.join(out, 'samples', 'images', os.path.basename(s.image)))
        Image.fromarray(s.mask).save(os.path.join(out, 'samples', 'masks', stem + '.png'))
    return net


def provenance(summary):
    s = summary
    lines = [
        '# The bundled default model: `horse` (CRF-Grad on Weizmann Horse, %d px)' % s['size'], '',
        'Files: `deploy.prototxt` (Input 1x3x%dx%d -> unary net -> `score_pre` -> PixelFeature + CrfGrad -> '
        '`score_post`), `horse.caffemodel` (binary NetParameter with the deploy layers and weights, %d bytes), '
        '`samples/` (two val images with their masks).' % (s['size'], s['size'], s['caffemodel_bytes']), '',
        '## Data',
        '- Source: the Weizmann Horse Database (E. Borenstein and S. Ullman, ECCV 2002; Borenstein, Sharon & '
        'Ullman, CVPR-W 2004), in the copy and split described in `shared/data/weizmann_horse/README.md` '
        '(150 train / 50 val / 127 test, split by `numpy.random.default_rng(0).permutation(327)`).',
        '- Trained on the **train** split only (%d images); the **val** split (%d images) was used only to '
        'pick iterates (model selection). The test split was not used.' % (s['train_images'], s['val_images']),
        '- `samples/`: %s from the **val** split (images byte-identical copies of the dataset JPEGs, masks '
        're-saved as PNG, 0 = background, 1 = horse), picked by hand among small val images on which the CRF '
        'visibly changes the result (mean IoU unary -> CRF: %s), so they flatter the CRF. The dataset is for '
        'research use; cite Borenstein & Ullman.' % (
            ' and '.join('`%s`' % x for x in s['samples']),
            ', '.join('%s %.1f -> %.1f' % (k, v[0], v[1]) for k, v in sorted(s['sample_iou'].items()))), '',
        '## Preprocessing (as `shared/data/caffe_models/crfgrad_horse_caffe/README.md`)',
        'Fit into %d x %d keeping the aspect ratio (Pillow bilinear), pad bottom/right with black, RGB -> BGR, '
        'subtract (104.008, 116.669, 122.675). This is `crfgrad segment`\'s default preprocessing; '
        'the net outputs are cropped back and upsampled bilinearly to the image size.' % (s['size'], s['size']),
        '',
        '## Training (crfgrad_cupy.solver, Adam, CPU)',
        '- Command: `%s`%s' % (s['command'], '' if not s['resumed'] else
                               ' (this last run reused the stages an earlier run of the same command, without '
                               '--resume, had saved in --work; their times are those of that run)'),
        '- Machine: %s; %s; wall time %.1f min in all.' % (s['machine'], s['python'], s['total_seconds'] / 60),
        '- Seed %d (filler seed = solver `random_seed`; NumPy generator for augmentation and folds).' % s['seed'],
        '- Stage 1, unary net: Adam base_lr 1e-3 (x0.1 after 75 %% of the iterations), weight decay 5e-4, '
        'batch 4, %d iterations, random mirror, '
        'scale 0.7-1.0 and position; SoftmaxWithLoss (ignore 255, normalize false). Val mIoU every %d '
        'iterations: %s; kept iteration %d (%.1f s).' % (
            s['unary_iters'], s['eval_every'], ', '.join('%d: %.2f' % tuple(h) for h in s['unary_history']),
            s['unary_best_iter'], s['unary_seconds']),
        '- Stage 2, CRF: CrfGrad kernel %d, %d steps of size %g, leak %g, log_eps %g, PixelFeature '
        'POSITION_AND_RGB pos_scale %.4g, color_scale %g. Start: a Potts model with Gaussian filters (unary '
        'weight 1, spatial std %g px) chosen on val from spatial x bilateral weights %s: %s (%.1f s); kept '
        'spatial %g, bilateral %g. Learning on held-out-like unaries: the train split cut into %d folds, a unary '
        'net trained on each (%d iterations) predicts the other fold (%.1f s); the CRF trained on those '
        'unaries (and their mirrors) with the unary net fixed: Adam base_lr %g, batch 1, %d iterations '
        '(%.1f s). Val mIoU (stage-1 unary + CRF): %s; kept iteration %d.' % (
            CRF_DEFAULTS['kernel_size'], CRF_DEFAULTS['num_iterations'], CRF_DEFAULTS['step_size'],
            CRF_DEFAULTS['leak_factor'], CRF_DEFAULTS['log_eps'], s['pixel_feature']['pos_scale'], s['pixel_feature']['color_scale'], s['potts_sigma'],
            s['potts_weights'], ', '.join('%g/%g: %.2f' % (g[1], g[2], g[0]) for g in s['potts_grid']),
            s['potts_seconds'], s['potts_best'][0], s['potts_best'][1], s['folds'], s['fold_iters'],
            s['crossfit_seconds'], s['crf_lr'], s['crf_iters'], s['crf_seconds'],
            ', '.join('%d: %.2f' % tuple(h) for h in s['crf_history']), s['crf_best_iter']),
        '',
        '## Result (val split, mean IoU over background and horse, percent, at full mask resolution)',
        '| output | mean IoU |', '| --- | --- |',
        '| `score_pre` (unary) | %.2f |' % s['val_unary_miou'],
        '| `score_post` (CRF-Grad) | %.2f |' % s['val_crf_miou'], '',
        'Reproduce with `crfgrad evaluate --model default --data shared/data/weizmann_horse/val`. These val '
        'numbers are optimistic: val picked the iterates.',
        'Learned CRF: unary weight %.4f, spatial filters max |w| %.4f, bilateral taps range %.4f .. %.4f.' % (
            s['crf_unary_weight'], s['crf_spatial_absmax'], s['crf_taps_min'], s['crf_taps_max']),
    ]
    return '\n'.join(lines) + '\n'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', default='/work/shared/data/weizmann_horse', help='folder with train/ and val/')
    ap.add_argument('--out', default=os.path.join(os.path.dirname(HERE), 'crfgrad_cupy', 'models', 'horse'))
    ap.add_argument('--work', default='/tmp/crfgrad_train_horse', help='logs, generated prototxts, summary')
    ap.add_argument('--size', type=int, default=96)
    ap.add_argument('--seed', type=int, default=1701)
    ap.add_argument('--unary-iters', type=int, default=8000)
    ap.add_argument('--eval-every', type=int, default=1000)
    ap.add_argument('--folds', type=int, default=2)
    ap.add_argument('--fold-iters', type=int, default=2000)
    ap.add_argument('--crf-iters', type=int, default=400)
    ap.add_argument('--crf-eval-every', type=int, default=50)
    ap.add_argument('--crf-lr', type=float, default=1e-5)
    ap.add_argument('--samples', default='horse020,horse092', help='two val stems to bundle as samples')
    ap.add_argument('--resume', action='store_true',
                    help='reuse the stage-1 weights / held-out unaries saved in --work by an earlier run')
    args = ap.parse_args(argv)
    t_start = time.time()
    os.makedirs(os.path.join(args.work, 'snapshots'), exist_ok=True)
    log_file = os.path.join(args.work, 'train.log')
    log('preparing data (%d px)' % args.size)
    train = prepare(read_split(args.data, 'train'), args.size)
    val = prepare(read_split(args.data, 'val'), args.size)
    log('%d train / %d val images' % (len(train), len(val)))

    stage1 = os.path.join(args.work, 'stage1.npz')
    reused = 0.0
    if args.resume and os.path.exists(stage1):
        unary, info = load_stage(stage1)
        unary_hist, unary_seconds = [tuple(h) for h in info['history']], info['seconds']
        args.unary_iters = info.get('iters', args.unary_iters)
        args.eval_every = info.get('eval_every', args.eval_every)
        reused += unary_seconds
        log('stage 1 loaded from %s' % stage1)
    else:
        t = time.time()
        unary, _, unary_hist = train_unary(train, val, args.size, args.unary_iters, args.seed, args.work,
                                           log_file, eval_every=args.eval_every)
        unary_seconds = time.time() - t
        save_stage(stage1, unary, {'history': unary_hist, 'seconds': unary_seconds, 'iters': args.unary_iters,
                                   'eval_every': args.eval_every})
    best_iter, unary_miou = max(unary_hist, key=lambda h: h[1])
    log('stage 1: best val mIoU %.2f at iter %d (%.0f s)' % (unary_miou, best_iter, unary_seconds))

    crossfit = os.path.join(args.work, 'crossfit.npz')
    if args.resume and os.path.exists(crossfit):
        with np.load(crossfit) as z:
            probs, probs_m, crossfit_seconds = z['probs'], z['probs_m'], float(z['seconds'])
            if 'folds' in z.files:
                args.folds, args.fold_iters = int(z['folds']), int(z['fold_iters'])
        reused += crossfit_seconds
        log('held-out unaries loaded from %s' % crossfit)
    else:
        t = time.time()
        probs, probs_m = crossfit_unaries(train, args.size, args.fold_iters, args.seed, args.work, log_file,
                                          args.folds)
        crossfit_seconds = time.time() - t
        np.savez(crossfit, probs=probs, probs_m=probs_m, seconds=crossfit_seconds, folds=args.folds,
                 fold_iters=args.fold_iters)
    val_probs = unary_probs(unary, val, args.size)
    t = time.time()
    potts = potts_grid(val, val_probs, args.size)
    init_miou, ws, wb = max(potts)
    init = potts_blobs(ws, wb)
    grid_seconds = time.time() - t
    log('Potts grid on val: best spatial %g bilateral %g: %.2f (%.0f s)' % (ws, wb, init_miou, grid_seconds))
    stage2 = os.path.join(args.work, 'stage2.npz')
    if args.resume and os.path.exists(stage2):
        params, info = load_stage(stage2)
        crf, crf_hist, crf_seconds = params['crf'], [tuple(h) for h in info['history']], info['seconds']
        args.crf_iters, args.crf_lr = info['iters'], info['lr']
        reused += crf_seconds
        log('CRF loaded from %s' % stage2)
    else:
        t = time.time()
        crf, _, crf_hist = train_crf(train, probs, probs_m, val, val_probs, args.size, args.crf_iters,
                                     args.seed, args.work, log_file, base_lr=args.crf_lr,
                                     eval_every=args.crf_eval_every, init=init)
        crf_seconds = time.time() - t
        save_stage(stage2, {'crf': crf}, {'history': crf_hist, 'seconds': crf_seconds, 'iters': args.crf_iters,
                                          'lr': args.crf_lr})
    crf_best_iter = max(crf_hist, key=lambda h: h[1])[0]
    samples = args.samples.split(',')
    write_bundle(args.out, args.size, unary, crf, val, samples)
    res = sg.evaluate_folder(os.path.join(args.out, 'deploy.prototxt'), os.path.join(args.out, 'horse.caffemodel'),
                             os.path.join(args.data, 'val'))
    seg = sg.Segmenter.from_files(os.path.join(args.out, 'deploy.prototxt'), os.path.join(args.out, 'horse.caffemodel'),
                                  extra_blobs=('score_pre',))
    sample_iou = {}
    for img_path, mask_path in sg.sample_pairs_in(args.out):
        _, r = seg.segment_file(img_path)
        mask = load_mask(mask_path)
        sample_iou[os.path.basename(img_path)] = [100 * sg.iou_from_confusion(sg.confusion(
            r.blobs[b].argmax(axis=0), mask, 2))[1] for b in ('score_pre', 'score_post')]
    total = time.time() - t_start + reused      # + the stages loaded with --resume
    summary = collections.OrderedDict(
        size=args.size, seed=args.seed, resumed=reused > 0, command='python3 tools/train_default_model.py ' + ' '.join(
            sys.argv[1:] if argv is None else argv),
        machine='%s, %d CPU cores (shared with other processes)' % (platform.machine(), os.cpu_count()),
        python='Python %s, NumPy %s' % (platform.python_version(), np.__version__),
        train_images=len(train), val_images=len(val), samples=samples, sample_iou=sample_iou,
        unary_iters=args.unary_iters, eval_every=args.eval_every, unary_history=unary_hist,
        unary_best_iter=best_iter, unary_seconds=unary_seconds, folds=args.folds, fold_iters=args.fold_iters,
        crossfit_seconds=crossfit_seconds, crf_iters=args.crf_iters, crf_lr=args.crf_lr, crf_history=crf_hist,
        crf_best_iter=crf_best_iter, crf_seconds=crf_seconds, potts_grid=potts, potts_best=[ws, wb],
        potts_seconds=grid_seconds, potts_sigma=POTTS_SIGMA, potts_weights=str(POTTS_GRID), pixel_feature=pixel_feature(args.size),
        val_unary_miou=res['unary_miou'], val_crf_miou=res['crf_miou'],
        crf_unary_weight=float(crf[0].ravel()[0]), crf_spatial_absmax=float(np.abs(crf[1]).max()),
        crf_taps_min=float(crf[2].min()), crf_taps_max=float(crf[2].max()),
        caffemodel_bytes=os.path.getsize(os.path.join(args.out, 'horse.caffemodel')), total_seconds=total)
    with open(os.path.join(args.work, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, 'PROVENANCE.md'), 'w') as f:
        f.write(provenance(summary))
    log('done in %.1f min: val mIoU unary %.2f, CRF %.2f' % (total / 60, res['unary_miou'], res['crf_miou']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
