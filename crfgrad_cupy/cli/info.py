"""`crfgrad info MODEL [WEIGHTS]`: the layers of a net with their tops, output shapes and parameters."""


def register(sub):
    p = sub.add_parser('info', help='print the layers of a net: type, tops with shapes, parameter shapes')
    p.add_argument('model', help='net .prototxt (V0/V1 files are upgraded)')
    p.add_argument('weights', nargs='?', help='.caffemodel or .caffemodel.h5 to load')
    p.add_argument('--phase', choices=['TEST', 'TRAIN'], default='TEST')
    p.add_argument('--input-shape', action='append', default=[], metavar='BLOB=N,C,H,W',
                   help='reshape an input blob before printing (repeatable)')
    p.set_defaults(func=run)


def parse_shape_args(items):
    from ..errors import CrfGradError
    shapes = {}
    for item in items:
        name, _, dims = item.partition('=')
        try:
            shapes[name] = tuple(int(d) for d in dims.split(','))
        except ValueError:
            raise CrfGradError('--input-shape wants BLOB=N,C,H,W, got %r' % item, field='--input-shape')
    return shapes


def format_table(net):
    rows = [('layer', 'type', 'top (shape)', 'params')]
    for name, layer in net.layer_dict.items():
        tops = ', '.join('%s %s' % (t, 'x'.join(str(d) for d in net.blobs[t].shape) or 'scalar')
                         for t in net.top_names[name])
        params = ', '.join('x'.join(str(d) for d in b.shape) for b in layer.blobs)
        rows.append((name, layer.type or type(layer).__name__, tops, params))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ['  '.join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    total = sum(b.count for blobs in net.params.values() for b in blobs)
    lines.append('%d layers, %d parameters; inputs: %s; outputs: %s'
                 % (len(net.layers), total, ', '.join(net.inputs) or '-', ', '.join(net.outputs) or '-'))
    return '\n'.join(lines)


def run(args):
    import crfgrad_cupy as cc
    phase = cc.TEST if args.phase == 'TEST' else cc.TRAIN
    net = cc.Net(args.model, phase, weights=args.weights)
    shapes = parse_shape_args(args.input_shape)
    if shapes:
        for name, shape in shapes.items():
            if name not in net.blobs:
                raise cc.CrfGradError('no blob named %r' % name, file=args.model, field='--input-shape')
            net.blobs[name].reshape(*shape)
        net.reshape()
    print(format_table(net))
    return 0
