"""`crfgrad convert weights|matconvnet|to-dagnn ...`: format converters.

  crfgrad convert weights IN OUT [--proto P] [--axis-order matcaffe|matconvnet] [--mat-version V]
      Caffe weights between .caffemodel, Caffe HDF5 (.h5/.hdf5), .npz (keys layer/index) and
      MATLAB .mat (Caffe -> MATLAB in matcaffe's W x H x C x N order or MatConvNet's
      H x W x Cin x Cout order; layer names sanitised, mapping stored). Formats from the names.
  crfgrad convert matconvnet IN.mat OUT_PREFIX [--input-shape N,C,H,W] [--variable NAME]
      MatConvNet SimpleNN/DagNN (MAT v5/v7/v7.3) -> OUT_PREFIX.prototxt + OUT_PREFIX.caffemodel.
  crfgrad convert to-dagnn PROTOTXT OUT.mat [--weights W] [--mat-version V]
      Caffe net -> MatConvNet DagNN struct (variable `net`; dagnn.DagNN.loadobj(net)).
"""


def _shape(text):
    import argparse
    try:
        dims = tuple(int(v) for v in text.replace('x', ',').split(','))
    except ValueError:
        raise argparse.ArgumentTypeError('expected N,C,H,W, got %r' % text) from None
    if len(dims) != 4 or min(dims) <= 0:
        raise argparse.ArgumentTypeError('expected 4 positive numbers N,C,H,W, got %r' % text)
    return dims


def register(sub):
    p = sub.add_parser('convert', help='convert weights and models (Caffe, MATLAB, MatConvNet)',
                       description=__doc__.split('\n', 1)[1],
                       formatter_class=__import__('argparse').RawDescriptionHelpFormatter)
    conv = p.add_subparsers(dest='what', metavar='WHAT')
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    w = conv.add_parser('weights', help='weights between .caffemodel / .h5 / .npz / .mat')
    w.add_argument('input', help='.caffemodel, .caffemodel.h5, .npz or a .mat written by this tool')
    w.add_argument('output', help='output file; its extension picks the format')
    w.add_argument('--proto', help='prototxt whose layers are stored with the blobs (.caffemodel output)')
    w.add_argument('--axis-order', choices=['matcaffe', 'matconvnet'], default='matcaffe',
                   help='array layout in a .mat output (default: matcaffe, all axes reversed)')
    w.add_argument('--mat-version', choices=['5', '7', '7.3'], default='7.3',
                   help='MAT-file version of a .mat output (default 7.3, HDF5)')
    w.set_defaults(func=run_weights)

    m = conv.add_parser('matconvnet', help='MatConvNet .mat -> Caffe prototxt + caffemodel')
    m.add_argument('input', help='MatConvNet model (SimpleNN or DagNN; MAT v5, v7 or v7.3)')
    m.add_argument('prefix', help='output prefix: writes PREFIX.prototxt and PREFIX.caffemodel')
    m.add_argument('--input-shape', type=_shape, help='N,C,H,W of the input in the prototxt '
                   '(default: from meta, else a square size the net accepts)')
    m.add_argument('--variable', help='the variable holding the net (default: net, or the '
                   'top-level layers/params/vars)')
    m.set_defaults(func=run_matconvnet)

    d = conv.add_parser('to-dagnn', help='Caffe net -> MatConvNet DagNN .mat')
    d.add_argument('proto', help='deploy .prototxt')
    d.add_argument('output', help='output .mat')
    d.add_argument('--weights', help='.caffemodel or .caffemodel.h5 (default: the fillers)')
    d.add_argument('--mat-version', choices=['5', '7', '7.3'], default='7.3')
    d.set_defaults(func=run_to_dagnn)


def run_weights(args):
    from ..convert.weights import convert_weights, weights_format
    opts = {}
    if weights_format(args.output) == 'mat':
        opts = dict(order=args.axis_order, version=args.mat_version)
    weights = convert_weights(args.input, args.output, proto=args.proto, **opts)
    n = sum(len(v) for v in weights.values())
    print('%s: %d blobs of %d layers -> %s' % (args.input, n, sum(1 for v in weights.values() if v),
                                               args.output))
    return 0


def run_matconvnet(args):
    from ..convert.matconvnet import convert_matconvnet
    conv = convert_matconvnet(args.input, args.prefix, input_shape=args.input_shape,
                              variable=args.variable)
    shape = list(conv.net_param.layer[0].input_param.shape[0].dim)
    print('%s: %s, %d layers -> %s.prototxt, %s.caffemodel' % (
        args.input, 'SimpleNN' if conv.kind == 'simplenn' else 'DagNN',
        len(conv.net_param.layer), args.prefix, args.prefix))
    print('  input %s %s, output %s%s' % (conv.inputs[0], shape, conv.outputs[-1],
                                          ('; dropped: ' + ', '.join(conv.dropped)) if conv.dropped else ''))
    return 0


def run_to_dagnn(args):
    from ..convert.to_dagnn import convert_caffe_to_dagnn
    dag = convert_caffe_to_dagnn(args.proto, args.weights, args.output, version=args.mat_version)
    print('%s -> %s: %d layers, %d params, %d variables (MAT %s)' % (
        args.proto, args.output, len(dag['layers']), len(dag['params']), len(dag['vars']),
        args.mat_version))
    return 0
