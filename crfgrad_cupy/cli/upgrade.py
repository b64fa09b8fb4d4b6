"""``crfgrad upgrade OLD NEW``: rewrite a legacy (V0/V1) net in the current format.

OLD may be a text prototxt (net or solver) or a binary .caffemodel; the kind is
decided from the content, not the extension.  NEW gets the same kind.
"""
import logging
import os

from ..errors import CrfGradError

log = logging.getLogger('crfgrad_cupy')


def register(subparsers):
    p = subparsers.add_parser('upgrade', help='upgrade a legacy prototxt or caffemodel',
                              description=__doc__)
    p.add_argument('old', metavar='OLD', help='legacy .prototxt (net or solver) or .caffemodel')
    p.add_argument('new', metavar='NEW', help='where to write the upgraded file')
    p.add_argument('--solver', action='store_true',
                   help='treat a text OLD as a solver (default: when its name contains "solver" '
                        'or it has no layers but solver fields)')
    p.set_defaults(func=run)


def detect_kind(path):
    """'hdf5', 'text' or 'binary' from the first bytes of the file."""
    from ..io.hdf5_weights import is_hdf5
    if is_hdf5(path):
        return 'hdf5'
    with open(path, 'rb') as f:
        head = f.read(4096)
    if not head:
        raise CrfGradError('empty file', file=path)
    if b'\x00' in head:
        return 'binary'
    try:
        head.decode('utf-8')
    except UnicodeDecodeError as exc:
        # a multi-byte character cut at the end of the sample is still text
        if exc.start < len(head) - 4:
            return 'binary'
    return 'text'


def _looks_like_solver(path, text):
    if 'solver' in os.path.basename(path).lower():
        return True
    from ..io.prototxt import parse_text
    from ..proto import caffe_pb2
    try:
        parse_text(text, caffe_pb2.NetParameter(), path)
        return False
    except CrfGradError:
        pass
    try:
        parse_text(text, caffe_pb2.SolverParameter(), path)
        return True
    except CrfGradError:
        return False


def upgrade_file(old, new, solver=None):
    """Upgrade ``old`` into ``new``; returns the kind written ('net', 'solver', 'caffemodel')."""
    from ..io import caffemodel, prototxt
    if not os.path.exists(old):
        raise CrfGradError('file not found', file=old)
    if os.path.isdir(old):
        raise CrfGradError('is a directory', file=old)
    kind = detect_kind(old)
    if kind == 'hdf5':
        raise CrfGradError('HDF5 weights have no legacy format to upgrade', file=old)
    if kind == 'binary':
        net = caffemodel.load_caffemodel(old)
        caffemodel.save_caffemodel(net, new)
        return 'caffemodel'
    with open(old, 'rb') as f:
        text = f.read().decode('utf-8', errors='strict')
    if solver is None:
        solver = _looks_like_solver(old, text)
    if solver:
        sp = prototxt.load_solver_param(old)
        prototxt.write_prototxt(sp, new)
        return 'solver'
    net = prototxt.load_net_param(old)
    prototxt.write_prototxt(net, new)
    return 'net'


def run(args):
    kind = upgrade_file(args.old, args.new, solver=True if args.solver else None)
    print('wrote upgraded %s to %s' % (kind, args.new))
    return 0
