"""`crfgrad segment MODEL WEIGHTS IMAGE_OR_LIST... --out DIR`: segment images with a Caffe net.

Per image <stem>: <stem>.png (labels, VOC palette PNG), <stem>_overlay.png, and with options
<stem>_probs.npy (L x H x W float32 at the image's resolution), <stem>_energy.json (the CrfGrad
energies per step) and <stem>_rounded.png (the rounded labelling of Prop. 2.1).
"""
import json
import os
import sys

import numpy as np


def add_preprocess_args(p):
    g = p.add_argument_group('preprocessing (Caffe DataTransformer order: channel swap, mean, scale)')
    g.add_argument('--mean', default='imagenet',
                   help="B,G,R numbers, a .binaryproto/.npy mean file, 'imagenet' (104.008,116.669,122.675, "
                        "the default) or 'none'")
    g.add_argument('--scale', type=float, default=1.0, help='multiply after the mean subtraction (default 1)')
    g.add_argument('--channel-swap', default='2,1,0',
                   help="input channels taken from the RGB image, default 2,1,0 (BGR, as Caffe); 'none' keeps RGB")
    g.add_argument('--input-size', default='net', metavar='net|native|S|HxW',
                   help="network input size: 'net' (the Input layer's, default), 'native' (reshape the net to "
                        "every image) or S / HxW")
    g.add_argument('--resize', choices=['fit', 'stretch'], default='fit',
                   help='fit: keep the aspect ratio and pad bottom/right with black (default); stretch: ignore it')


def segment_options(args):
    """Keyword arguments of Segmenter.from_files from the preprocessing options."""
    from ..errors import CrfGradError
    mean = None if args.mean.lower() == 'none' else args.mean
    swap = None
    if args.channel_swap.lower() != 'none':
        try:
            swap = tuple(int(c) for c in args.channel_swap.split(','))
        except ValueError:
            raise CrfGradError('--channel-swap wants e.g. 2,1,0 or none, got %r' % args.channel_swap,
                               field='--channel-swap') from None
    return dict(mean=mean, scale=args.scale, channel_swap=swap, input_size=args.input_size,
                resize=args.resize, mode=args.device)


def register(sub):
    p = sub.add_parser('segment', help='segment images with a net (label PNGs, overlays, probabilities)',
                       description=__doc__)
    p.add_argument('model', help="deploy .prototxt ('default': the bundled horse model)")
    p.add_argument('weights', help=".caffemodel or .caffemodel.h5 ('default' with the bundled model)")
    p.add_argument('inputs', nargs='+', metavar='IMAGE_OR_LIST',
                   help="images, folders of images, or list files in Caffe's 'path [label]' format")
    p.add_argument('--out', default='segment_out', help='output folder (created)')
    p.add_argument('--root', help='folder that relative paths in list files start from (default: the list file\'s)')
    p.add_argument('--output-blob', help="blob to take the labels from (default: the net's last output)")
    add_preprocess_args(p)
    p.add_argument('--save-probs', action='store_true', help='write <stem>_probs.npy (L x H x W float32)')
    p.add_argument('--save-energy', action='store_true',
                   help='write <stem>_energy.json: E(q_t) per CRF step of every CrfGrad layer')
    p.add_argument('--save-rounded', action='store_true',
                   help='write <stem>_rounded.png: the rounded labelling of Prop. 2.1 (last CrfGrad layer)')
    p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
    p.add_argument('--verify', action='store_true',
                   help='also run a second compute path (GPU vs NumPy; NumPy float32 vs float64 without a '
                        'GPU) and print the largest difference per output blob')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.set_defaults(func=run)


def _unique_stems(paths):
    seen, out = {}, []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or 'image'
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else '%s_%d' % (stem, n))
    return out


def run(args):
    from tqdm import tqdm
    from .. import segment as sg
    from ..errors import CrfGradError
    from ..preprocess import collect_images

    paths = collect_images(args.inputs, args.root)
    if not paths:
        raise CrfGradError('no images found in %s' % ', '.join(args.inputs))
    model, weights = sg.resolve_model(args.model, None if args.weights == 'default' else args.weights)
    seg = sg.Segmenter.from_files(model, weights, output_blob=args.output_blob,
                                  energy=args.save_energy, **segment_options(args))
    if args.save_energy and not seg.net.energy_blobs:
        raise CrfGradError('--save-energy needs a CrfGrad layer, the net has none', file=model)
    if args.save_rounded:
        sg.crf_problem(seg.net)          # fails early when there is no CrfGrad layer
    verifier = sg.Verifier(model, weights) if args.verify else None
    os.makedirs(args.out, exist_ok=True)
    failed = 0
    bar = tqdm(list(zip(paths, _unique_stems(paths))), desc='segment', unit='img', file=sys.stderr,
               disable=args.no_progress)
    for path, stem in bar:
        try:
            img, res = seg.segment_file(path)
            base = os.path.join(args.out, stem)
            sg.save_label_png(res.labels, base + '.png')
            sg.save_rgb_png(sg.overlay(img, res.labels), base + '_overlay.png')
            if args.save_probs:
                np.save(base + '_probs.npy', res.probs.astype(np.float32))
            if args.save_energy:
                with open(base + '_energy.json', 'w') as f:
                    json.dump({layer: e.tolist() for layer, e in res.energy.items()}, f, indent=1)
            if args.save_rounded:
                r = sg.crf_round(seg.net)
                lab = sg.labels_to_image_resolution(np.asarray(sg.backend.to_numpy(r.labels[0])), res.placement)
                sg.save_label_png(lab, base + '_rounded.png')
                why = [w for w, bad in (('self-interaction', r.self_interaction),
                                        ('q not on the simplex', not r.feasible),
                                        ("'%s' schedule" % r.schedule, r.schedule != 'sequential')) if bad]
                tqdm.write('%s: rounded labelling E(x) = %.6g, E(q_T) = %.6g%s'
                           % (path, float(r.energy_x[0]), float(r.energy_q[0]),
                              '' if r.guaranteed else ' (Prop. 2.1 guarantee does not apply: %s)' % ', '.join(why)),
                           file=sys.stderr)
            if verifier is not None:
                data, _ = seg.pre(img)
                report = verifier.compare(data, path)
                tqdm.write('%s: verify (%s): %s' % (path, verifier.description, ', '.join(
                    '%s max|diff| %.3g (max|ref| %.3g)' % (b, d, m) for b, (d, m) in report.items())))
        except CrfGradError as exc:
            failed += 1
            tqdm.write('crfgrad: error: %s' % str(exc).replace('\n', ' '), file=sys.stderr)
    bar.close()
    print('segmented %d of %d image(s) into %s' % (len(paths) - failed, len(paths), args.out))
    return 2 if failed else 0
