"""`crfgrad plot filters|states|energy|training ...`: the paper's figures from our runs.

  crfgrad plot filters WEIGHTS [--proto P] [--layer L] [--class-names a,b] [--pairs 0-1,...] --out F.png
      learned spatial filters of a CrfGrad layer, class-pair grid (paper Fig. 1/4)
  crfgrad plot states MODEL WEIGHTS INPUT [--mask M] [--class 1] --out F.png
      image, z, q^1..q^{T-1}, output, ground truth for one class (Fig. 5/11); INPUT is an
      image file or an .npz with the preprocessed `data` blob (and optionally `label`)
  crfgrad plot energy MODEL WEIGHTS INPUT... [--leak-factor 0] --out F.png [--csv E.csv]
      energy per iteration per image, each normalised, with the mean (Fig. 6/9)
  crfgrad plot training LOG --out PREFIX
      PREFIX.png (loss, lr, test outputs) + PREFIX.train.csv / PREFIX.test.csv from a
      Caffe-format training log (ours or real Caffe's)
MODEL may be 'default' (the bundled model; WEIGHTS then '-').
"""
import argparse
import os

import numpy as np


def _pairs(text):
    out = []
    for item in text.split(','):
        try:
            a, b = item.split('-')
            out.append((int(a), int(b)))
        except ValueError:
            raise argparse.ArgumentTypeError('pairs look like 0-1,1-0; got %r' % text) from None
    return out


def _names(text):
    return [s.strip() for s in text.split(',')]


def register(sub):
    from .segment import add_preprocess_args
    p = sub.add_parser('plot', help='figures: CRF filters, intermediate states, energies, training curves',
                       description=__doc__.split('\n', 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    sp = p.add_subparsers(dest='what', metavar='WHAT')

    f = sp.add_parser('filters', help='learned spatial filters of a CrfGrad layer (Fig. 1/4)')
    f.add_argument('weights', help='.caffemodel, .caffemodel.h5, .npz or .mat weights')
    f.add_argument('--proto', help='prototxt to find the CrfGrad layer by type')
    f.add_argument('--layer', help='the CrfGrad layer (default: the only one)')
    f.add_argument('--class-names', type=_names, help='comma-separated class names')
    f.add_argument('--pairs', type=_pairs, help='class pairs to show, e.g. 0-1,1-0 (default: all)')
    f.add_argument('--title')
    f.add_argument('--out', required=True, help='output image (.png, .pdf, .svg)')
    f.set_defaults(func=run_filters)

    for name, helptext in (('states', 'intermediate CRF states for one image (Fig. 5/11)'),
                           ('energy', 'CRF energy per iteration over images (Fig. 6/9)')):
        s = sp.add_parser(name, help=helptext)
        s.add_argument('model', help="deploy .prototxt with a CrfGrad layer, or 'default'")
        s.add_argument('weights', help="weights file ('-' for the bundled model's)")
        if name == 'states':
            s.add_argument('input', help='an image, or an .npz with the network input `data` '
                           '(1 x C x H x W) and optionally `label`')
            s.add_argument('--mask', help='ground-truth mask PNG (0, 1, ...; 255 ignored)')
            s.add_argument('--class', dest='class_index', type=int, default=1, help='class to show (default 1)')
            s.add_argument('--class-name', help='its name (for the titles)')
        else:
            s.add_argument('inputs', nargs='+', help='images, folders (of images or .npz inputs), list files or .npz inputs')
            s.add_argument('--max-images', type=int, help='use at most this many inputs')
            s.add_argument('--no-normalize', action='store_true', help='plot raw energies')
            s.add_argument('--csv', help='also write the energies (one row per image) here')
        s.add_argument('--layer', help='the CrfGrad layer (default: the last one)')
        s.add_argument('--leak-factor', type=float,
                       help="override the layer's leak factor (the paper's energy plots use 0)")
        add_preprocess_args(s)
        s.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
        s.add_argument('--out', required=True, help='output image')
        s.set_defaults(func=run_states if name == 'states' else run_energy)

    t = sp.add_parser('training', help='training curves + CSV from a Caffe-format log')
    t.add_argument('log', help='training log (ours or real Caffe\'s)')
    t.add_argument('--out', required=True, help='output prefix: PREFIX.png, PREFIX.train.csv, PREFIX.test.csv')
    t.set_defaults(func=run_training)


def run_filters(args):
    from ..convert.weights import load_any_weights
    from ..plots import plot_spatial_filters, spatial_filter_blob
    weights = load_any_weights(args.weights)
    net_param = None
    if args.proto:
        from ..io.prototxt import load_net_param
        net_param = load_net_param(args.proto)
    layer, W = spatial_filter_blob(weights, layer=args.layer, net_param=net_param)
    fig = plot_spatial_filters(W, class_names=args.class_names, pairs=args.pairs,
                               title=args.title or 'spatial filters of %s' % layer, path=args.out)
    print('%s: %d panels of layer %s (%dx%d filters) -> %s'
          % (args.weights, sum(1 for ax in fig.axes if ax.images), layer, W.shape[2], W.shape[3], args.out))
    return 0


def _segmenter(args):
    from ..segment import Segmenter, resolve_model
    from .segment import segment_options
    model, weights = resolve_model(args.model, None if args.weights == '-' else args.weights)
    return Segmenter.from_files(model, weights, **segment_options(args))


def _npz_input(path):
    from ..errors import CrfGradError
    try:
        with np.load(path, allow_pickle=False) as z:
            if 'data' not in z.files:
                raise CrfGradError("an input .npz needs the array 'data' (1 x C x H x W)", file=path)
            data = np.asarray(z['data'], dtype=np.float32)
            label = np.asarray(z['label']) if 'label' in z.files else None
    except (ValueError, OSError) as exc:
        raise CrfGradError('cannot read the .npz input: %s' % exc, file=path) from None
    if data.ndim == 4:
        data = data[0]
    return data, label


def _image_from_data(data, pre):
    """The RGB uint8 picture of a preprocessed input (undo scale, mean and channel swap)."""
    x = np.asarray(data, dtype=np.float64) / (pre.scale or 1.0)
    if pre.mean is not None:
        mean = np.asarray(pre.mean, dtype=np.float64)
        if mean.ndim == 3 and mean.shape[1:] != x.shape[1:]:
            mean = mean.reshape(mean.shape[0], -1).mean(axis=1)
        x = x + (mean.reshape(-1, 1, 1) if mean.ndim <= 1 else mean)
    if pre.channel_swap is not None and x.shape[0] == len(pre.channel_swap):
        rgb = np.empty_like(x)
        for i, c in enumerate(pre.channel_swap):
            rgb[c] = x[i]
        x = rgb
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return np.clip(np.round(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def run_states(args):
    from ..plots import crf_states, plot_intermediate_states
    from ..preprocess import load_mask, resize_uint8
    seg = _segmenter(args)
    if args.input.lower().endswith('.npz'):
        data, label = _npz_input(args.input)
        seg.forward(data, source=args.input)
        image = _image_from_data(data, seg.pre)
        valid = data.shape[1:]
        if args.mask:
            label = load_mask(args.mask)
    else:
        img = seg.pre.load(args.input)
        data, placement = seg.pre(img)
        seg.forward(data, source=args.input)
        valid = placement.valid_region(data.shape[1:])
        image = resize_uint8(img, valid[0], valid[1])
        label = None
        if args.mask:
            label = resize_uint8(load_mask(args.mask), valid[0], valid[1], resample='nearest')
    states = crf_states(seg.net, args.layer, leak_factor=args.leak_factor)
    h, w = valid
    states = [s[:, :h, :w] for s in states]
    if label is not None:
        label = np.asarray(label)[:h, :w]
    fig = plot_intermediate_states(states, image=image[:h, :w], ground_truth=label,
                                   class_index=args.class_index, class_name=args.class_name, path=args.out)
    print('%s: %d panels (T = %d) -> %s' % (args.input, len(fig.axes), len(states) - 1, args.out))
    return 0


def run_energy(args):
    from ..plots import crf_energy_curves, plot_energies
    from ..preprocess import collect_images
    seg = _segmenter(args)
    paths = []
    for item in args.inputs:
        if item.lower().endswith('.npz'):
            paths.append(item)
        elif os.path.isdir(item) and any(n.lower().endswith('.npz') for n in os.listdir(item)):
            paths.extend(os.path.join(item, n) for n in sorted(os.listdir(item)) if n.lower().endswith('.npz'))
        else:
            paths.extend(collect_images([item]))
    if args.max_images:
        paths = paths[:args.max_images]
    if not paths:
        from ..errors import CrfGradError
        raise CrfGradError('no inputs found in %s' % ' '.join(args.inputs), field='inputs')
    inputs = []
    for p in paths:
        if p.lower().endswith('.npz'):
            inputs.append(_npz_input(p)[0])
        else:
            inputs.append(seg.pre(seg.pre.load(p))[0])
    E = crf_energy_curves(seg.net, inputs, layer_name=args.layer, input_name=seg.input_name,
                          leak_factor=args.leak_factor)
    plot_energies(E, normalize=not args.no_normalize, path=args.out)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        header = 'input,' + ','.join('E%d' % t for t in range(E.shape[1]))
        with open(args.csv, 'w') as f:
            f.write(header + '\n')
            for p, row in zip(paths, E):
                f.write('%s,%s\n' % (p, ','.join(repr(float(v)) for v in row)))
    print('%d images, %d iterations -> %s' % (E.shape[0], E.shape[1] - 1, args.out))
    return 0


def run_training(args):
    from ..plots import training_curves_from_log
    fig, csvs, png = training_curves_from_log(args.log, args.out)
    print('%s -> %s, %s (%d panels)' % (args.log, png, ', '.join(csvs), len(fig.axes)))
    return 0
