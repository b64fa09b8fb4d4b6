"""`crfgrad energy MODEL WEIGHTS IMAGE`: the CRF energy per CRF-Grad step, and of the rounded labelling.

Runs the net on the image (preprocessed as `crfgrad segment` does), then for a CrfGrad layer
prints E(q^t) for t = 0 .. T (q^0 = the layer's input probabilities, q^T its output), with
E(q) = psi.q + 1/2 q'Kq (paper eq. 6, per image, at the net's resolution), and E(x) of the
labelling x that the rounding of Prop. 2.1 (crfgrad_cupy.core.rounding) makes from q^T,
and whether its guarantee E(x) <= E(q^T) applies (--no-round skips it).
"""
import json
import sys


def register(sub):
    from .segment import add_preprocess_args
    p = sub.add_parser('energy', help='CRF energy per CRF-Grad step and of the rounded labelling',
                       description=__doc__)
    p.add_argument('model', help="deploy .prototxt with a CrfGrad layer, or 'default'")
    p.add_argument('weights', nargs='?', help='.caffemodel / .caffemodel.h5 (not needed with default)')
    p.add_argument('image')
    p.add_argument('--layer', help='the CrfGrad layer (default: the last one)')
    p.add_argument('--leak-factor', type=float,
                   help="re-run the steps with this leak (the paper's energy figures use 0)")
    p.add_argument('--no-round', action='store_true', help='skip the rounded labelling')
    p.add_argument('--plot', help='write the energy-per-iteration plot here (.png, .pdf, ...)')
    p.add_argument('--json', help='write the energies as JSON here')
    add_preprocess_args(p)
    p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
    p.set_defaults(func=run)


def run(args):
    import numpy as np

    from .. import backend, plots
    from .. import segment as sg
    from .segment import segment_options
    from ..errors import CrfGradError
    if args.weights is None and args.model != 'default':
        raise CrfGradError('give the weights file (or use the bundled model: crfgrad energy default IMAGE)')
    model, weights = sg.resolve_model(args.model, args.weights)
    seg = sg.Segmenter.from_files(model, weights, **segment_options(args))
    img = seg.pre.load(args.image)
    data, _ = seg.pre(img)
    layer = args.layer or (sg.crf_layer_names(seg.net) or [None])[-1]
    if layer is None:
        raise CrfGradError('the net has no CrfGrad layer', file=model)
    try:
        E = plots.crf_energy_curves(seg.net, [data], layer_name=layer, leak_factor=args.leak_factor)[0]
    except CrfGradError as exc:
        raise CrfGradError(str(exc), file=args.image if exc.file is None else exc.file) from None
    print('%s, CrfGrad layer %r: E(q) = psi.q + 1/2 q\'Kq (eq. 6) at %s px' % (
        args.image, layer, 'x'.join(str(v) for v in data.shape[1:])))
    print('   t  E(q^t)')
    for t, e in enumerate(E):
        print('%4d  %.8g%s' % (t, e, '   (input)' if t == 0 else '   (output)' if t == len(E) - 1 else ''))
    result = {'image': args.image, 'layer': layer, 'energies': [float(e) for e in E]}
    if not args.no_round:
        r = sg.crf_round(seg.net, layer)
        ex = float(backend.to_numpy(r.energy_x)[0])
        why = []
        if r.self_interaction:
            why.append('pixels interact with themselves')
        if not r.feasible:
            why.append('q^T is not on the simplex (leak > 0)')
        if r.schedule != 'sequential':
            why.append("the '%s' schedule fixes coupled pixels together" % r.schedule)
        print("rounded labelling (Prop. 2.1 rounding, '%s' schedule, %d steps): E(x) = %.8g  (%s E(q^T))"
              % (r.schedule, r.num_steps, ex, '<=' if ex <= E[-1] else '>'))
        print('  the guarantee E(x) <= E(q) %s' % ('holds' if r.guaranteed else
                                                  'does not apply here: ' + '; '.join(why)))
        result.update(rounded_energy=ex, guaranteed=bool(r.guaranteed), rounding_steps=int(r.num_steps),
                      rounding_schedule=r.schedule)
    if args.plot:
        fig = plots.plot_energies(np.asarray(E)[None], normalize=False,
                                  title='CRF energy per iteration: %s' % args.image.rsplit('/', 1)[-1])
        ax = fig.axes[0]
        if 'rounded_energy' in result:
            ax.axhline(result['rounded_energy'], color='tab:green', linestyle='--', label='E(x), rounded')
            ax.legend(fontsize=8)
        plots.save_figure(fig, args.plot)
        print('wrote %s' % args.plot)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    sys.stdout.flush()
    return 0
