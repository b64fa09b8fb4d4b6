"""`crfgrad refine IMAGE PROBS.npy [--out DIR]`: CRF-Grad inference on any probability map.

For pydensecrf users: give the image and the class probabilities of any model and get the
CRF-refined labels and probabilities.  PROBS.npy holds L x H x W or H x W x L float values
(a leading axis of 1 is allowed); the layout is told apart by the image size (or the
smaller axis), --layout forces it.  Without --weights the CRF is a Potts model with a
Gaussian spatial filter and Gaussian bilateral taps; with --weights it uses the learned
filters (and, from a binary caffemodel, the iteration settings and PixelFeature scales) of
a trained CrfGrad layer.  Writes <stem>_refined.png (labels, VOC palette),
<stem>_refined_overlay.png and <stem>_refined_probs.npy (L x H x W float32).
"""
import os


def register(sub):
    from ..segment import REFINE_DEFAULTS as D
    p = sub.add_parser('refine', help='CRF-Grad inference on a probability map (like pydensecrf)',
                       description=__doc__)
    p.add_argument('image', help='the image (RGB)')
    p.add_argument('probs', help='.npy probabilities, L x H x W or H x W x L')
    p.add_argument('--out', default='.', help='output folder (default: current folder)')
    p.add_argument('--layout', choices=['auto', 'lhw', 'hwl'], default='auto')
    p.add_argument('--softmax', action='store_true', help='the .npy holds scores: apply a softmax over classes')
    p.add_argument('--weights', help="learned filters from this .caffemodel / .caffemodel.h5 ('default': the bundled "
                                     "horse model's, trained at 96 px: use --size 96)")
    p.add_argument('--layer', help='the CrfGrad layer in --weights (default: the only one)')
    p.add_argument('--size', type=int,
                   help='run the CRF at the map fitted into SIZE x SIZE (learned filters act at the resolution '
                        'they were trained at; e.g. 128 for the bundled model), then resize back')
    g = p.add_argument_group('CRF settings (with --weights from a caffemodel these default to its layer)')
    g.add_argument('--iterations', type=int, help='gradient steps T (default %d)' % D['num_iterations'])
    g.add_argument('--step-size', type=float, help='step size (default %g)' % D['step_size'])
    g.add_argument('--leak-factor', type=float,
                   help='leak of the simplex projection (default %g: exact projection, outputs are '
                        'probabilities)' % D['leak_factor'])
    g.add_argument('--log-eps', type=float, help='eps in -w log(p + eps) (default %g)' % D['log_eps'])
    g.add_argument('--pos-scale', type=float,
                   help='PixelFeature position scale, about 1 / (bilateral position std in pixels) '
                        '(default %g)' % D['pos_scale'])
    g.add_argument('--color-scale', type=float,
                   help='PixelFeature colour scale, about 1 / (colour std in grey levels) (default %g)'
                        % D['color_scale'])
    g = p.add_argument_group('Potts/Gaussian filters (without --weights)')
    g.add_argument('--unary-weight', type=float, default=D['unary_weight'])
    g.add_argument('--kernel-size', type=int, default=D['kernel_size'], help='spatial filter size (odd)')
    g.add_argument('--spatial-weight', type=float, default=D['spatial_weight'],
                   help='Potts weight of the spatial Gaussian (normalised to sum 1)')
    g.add_argument('--spatial-sigma', type=float, default=D['spatial_sigma'], help='its std in pixels')
    g.add_argument('--bilateral-weight', type=float, default=D['bilateral_weight'],
                   help='Potts weight of the bilateral Gaussian taps')
    p.set_defaults(func=run)


def run(args):
    import numpy as np

    from .. import segment as sg
    from ..errors import CrfGradError
    from ..preprocess import load_image
    img = load_image(args.image)
    if not os.path.exists(args.probs):
        raise CrfGradError('file not found', file=args.probs)
    try:
        raw = np.load(args.probs, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CrfGradError('not a .npy array: %s' % exc, file=args.probs) from None
    try:
        probs = sg.probs_layout(raw, img.shape[:2], args.layout).astype(np.float32)
        if args.softmax:
            e = np.exp(probs - probs.max(axis=0, keepdims=True))
            probs = e / e.sum(axis=0, keepdims=True)
    except CrfGradError as exc:
        raise CrfGradError(str(exc), file=args.probs) from None
    crf, blobs = {}, None
    if args.weights:
        weights = sg.default_model()[1] if args.weights == 'default' else args.weights
        learned = sg.learned_crf(weights, args.layer)
        blobs = learned['blobs']
        crf.update(learned.get('crf', {}))
        for key in ('pos_scale', 'color_scale'):
            if key in learned:
                crf[key] = learned[key]
    else:
        crf.update(unary_weight=args.unary_weight, kernel_size=args.kernel_size,
                   spatial_weight=args.spatial_weight, spatial_sigma=args.spatial_sigma,
                   bilateral_weight=args.bilateral_weight)
    for key, val in (('num_iterations', args.iterations), ('step_size', args.step_size),
                     ('leak_factor', args.leak_factor), ('log_eps', args.log_eps),
                     ('pos_scale', args.pos_scale), ('color_scale', args.color_scale)):
        if val is not None:
            crf[key] = val
    try:
        out, labels = sg.refine(img, probs, crf=crf, blobs=blobs, size=args.size)
    except CrfGradError as exc:
        raise CrfGradError(str(exc), file=args.probs if exc.file is None else exc.file) from None
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, os.path.splitext(os.path.basename(args.image))[0] + '_refined')
    sg.save_label_png(labels, stem + '.png')
    from ..preprocess import resize_uint8
    shown = resize_uint8(img, labels.shape[0], labels.shape[1])
    sg.save_rgb_png(sg.overlay(shown, labels), stem + '_overlay.png')
    np.save(stem + '_probs.npy', out)
    before = np.argmax(probs, axis=0)
    print('refined %s: %d x %d, %d classes; %d pixel(s) changed label; wrote %s.png, %s_probs.npy'
          % (args.image, labels.shape[1], labels.shape[0], probs.shape[0], int((before != labels).sum()),
             stem, stem))
    return 0
