"""Binary .caffemodel files: a serialized NetParameter whose layers carry their blobs.

Reading upgrades V0/V1 nets like Caffe's ``UpgradeNetAsNeeded`` (keeping the
blobs).  Weights come back as ``LoadedWeights``: an OrderedDict
``layer name -> [np.ndarray, ...]`` in file order that also remembers which
arrays were stored with Caffe's legacy 4-D num/channels/height/width dims (those
are matched leniently, see ``fit_blob``).
"""
import collections
import logging
import os

from google.protobuf.message import DecodeError

from ..errors import CrfGradError
from ..proto import caffe_pb2
from . import upgrade
from .atomic import write_bytes_atomic
from .blobproto import blob_to_array, uses_legacy_shape

log = logging.getLogger('crfgrad_cupy')

_MAX_BYTES = 2 ** 31 - 1  # Caffe's CodedInputStream total-bytes limit


class LoadedWeights(collections.OrderedDict):
    """``layer name -> list of float32 arrays`` in file order.

    ``legacy`` holds ``(layer, index)`` of blobs that used the legacy 4-D
    dims; ``source`` is the file they came from (for messages).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.legacy = set()
        self.source = None


def fit_blob(array, target_shape, legacy=False, source=None, layer=None, index=None):
    """``array`` reshaped to ``target_shape`` when Caffe would accept it, else CrfGradError.

    Shapes must be identical, except that a legacy 4-D blob also matches a
    target of at most 4 axes whose shape padded with 1s on the left equals it
    (Caffe's Blob::ShapeEquals).
    """
    target_shape = tuple(int(d) for d in target_shape)
    shape = tuple(array.shape)
    if shape == target_shape:
        return array
    if legacy and len(target_shape) <= 4 and \
            (1,) * (4 - len(target_shape)) + target_shape == shape:
        return array.reshape(target_shape)
    raise CrfGradError('shape mismatch for parameter blob %s: the weights file has %s, the net '
                       'needs %s' % (index, shape, target_shape), file=source, layer=layer,
                       field='blobs')


def _read_bytes(path):
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > _MAX_BYTES:
            raise CrfGradError('file is larger than 2 GB, the protobuf limit Caffe uses', file=path)
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        raise CrfGradError('file not found', file=path) from None
    except IsADirectoryError:
        raise CrfGradError('is a directory, not a .caffemodel file', file=path) from None
    except OSError as exc:
        raise CrfGradError('cannot read: %s' % (exc.strerror or exc), file=path) from None


def parse_caffemodel_bytes(data, source='<bytes>'):
    """NetParameter parsed from the bytes of a binary caffemodel (not upgraded)."""
    if data[:8] == b'\x89HDF\r\n\x1a\n':
        raise CrfGradError('this is an HDF5 file, not a binary protobuf .caffemodel (use '
                           'load_weights or load_hdf5_weights)', file=source)
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CrfGradError('not a valid binary NetParameter (truncated or not a .caffemodel): %s'
                           % exc, file=source) from None
    if not len(net.layer) and not len(net.layers):
        raise CrfGradError('not a .caffemodel: no layers found in %d bytes of protobuf data'
                           % len(data), file=source)
    return net


def load_caffemodel(path, upgrade_legacy=True):
    """NetParameter of a binary .caffemodel, upgraded from V0/V1 as Caffe does (blobs kept)."""
    path = os.fspath(path)
    net = parse_caffemodel_bytes(_read_bytes(path), path)
    if upgrade_legacy and upgrade.needs_upgrade(net):
        net, warnings = upgrade.upgrade_net_param(net, path)
        for w in warnings:
            log.warning('%s: %s', path, w)
    return net


def save_caffemodel(net_param, path):
    """Write a NetParameter as a binary .caffemodel (temp file + rename: never half-written)."""
    data = net_param.SerializeToString()
    write_bytes_atomic(data, path)


def _entries(net_param, source):
    """(name, blobs) of each layer: current ``layer`` entries, or V1/V0 ``layers`` (upgraded)."""
    if len(net_param.layers) and not len(net_param.layer):
        net_param, _ = upgrade.upgrade_net_param(net_param, source)
    return [(l.name, l.blobs) for l in net_param.layer]


def weights_from_net_param(net_param, source=None):
    """LoadedWeights (``layer -> [float32 arrays]``) of a NetParameter, in layer order.

    Every layer appears, blob-less ones with an empty list.  When a name occurs
    twice, the later entry's blobs win (Caffe copies source layers in file
    order, so the last copy stays).
    """
    out = LoadedWeights()
    out.source = source
    for name, blobs in _entries(net_param, source):
        arrays = []
        for i, b in enumerate(blobs):
            arrays.append(blob_to_array(b, source=source, layer=name))
            if uses_legacy_shape(b):
                out.legacy.add((name, i))
            else:
                out.legacy.discard((name, i))
        out[name] = arrays
    return out


def load_caffemodel_weights(path):
    """LoadedWeights of a binary .caffemodel file."""
    return weights_from_net_param(load_caffemodel(path), source=os.fspath(path))
