"""Caffe weights between binary .caffemodel, Caffe HDF5 (.caffemodel.h5) and NumPy .npz.

All three hold ``layer name -> [blob 0, blob 1, ...]`` (float32, Caffe's row-major shapes):

* .caffemodel: a NetParameter whose layers carry ``blobs`` (see :mod:`crfgrad_cupy.io.caffemodel`)
* Caffe HDF5: ``/data/<layer>/<index>`` datasets (see :mod:`crfgrad_cupy.io.hdf5_weights`)
* .npz: one array per blob under the key ``"<layer>/<index>"`` (layer names may contain
  '/', the index is after the last one); read with ``allow_pickle=False``.  Layers without
  blobs are not stored.

Format is chosen from the file name: ``.npz``; ``.h5``/``.hdf5``; ``.mat`` (see
:mod:`.matlab`); anything else is a binary .caffemodel.  Reading detects HDF5 by content.
"""
import collections
import os
import zipfile

import numpy as np

from ..errors import CrfGradError
from ..io.caffemodel import LoadedWeights, load_caffemodel, save_caffemodel, weights_from_net_param
from ..io.blobproto import array_to_blob
from ..io.hdf5_weights import is_hdf5, load_hdf5_weights, save_hdf5_weights
from ..proto import caffe_pb2
from ..io.atomic import atomic_path


def weights_format(path):
    """'npz', 'hdf5', 'mat' or 'caffemodel' from the file name."""
    name = os.fspath(path).lower()
    if name.endswith('.npz'):
        return 'npz'
    if name.endswith('.h5') or name.endswith('.hdf5'):
        return 'hdf5'
    if name.endswith('.mat'):
        return 'mat'
    return 'caffemodel'


# ----------------------------------------------------------------------------- npz

def load_npz_weights(path):
    """LoadedWeights from an .npz with keys ``layer/index`` (no pickles)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CrfGradError('file not found', file=path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CrfGradError('not a NumPy .npz archive: %s' % exc, file=path) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CrfGradError('not a .npz archive (a single .npy array)', file=path)
    grouped = collections.OrderedDict()
    with archive:
        for key in archive.files:
            layer, sep, index = key.rpartition('/')
            if not sep or not layer or not index.isdigit():
                raise CrfGradError('key %r is not of the form "layer/index"' % key, file=path,
                                   field=key)
            try:
                arr = archive[key]
            except ValueError as exc:
                raise CrfGradError('array %r cannot be read without pickle: %s' % (key, exc),
                                   file=path, layer=layer) from None
            if arr.dtype.kind not in 'fiub':
                raise CrfGradError('array %r has non-numeric dtype %s' % (key, arr.dtype),
                                   file=path, layer=layer)
            grouped.setdefault(layer, {})[int(index)] = np.asarray(arr, dtype=np.float32)
    out = LoadedWeights()
    out.source = path
    for layer, blobs in grouped.items():
        idx = sorted(blobs)
        if idx != list(range(len(idx))):
            raise CrfGradError('blob indices are not 0..%d: %s' % (len(idx) - 1, idx), file=path,
                               layer=layer)
        out[layer] = [blobs[i] for i in idx]
    return out


def save_npz_weights(weights, path, compressed=True):
    """Write ``layer -> [arrays]`` as .npz with keys ``layer/index`` (float32)."""
    path = os.fspath(path)
    arrays = collections.OrderedDict()
    for layer, blobs in weights.items():
        for i, a in enumerate(blobs):
            arrays['%s/%d' % (layer, i)] = np.asarray(_host(a), dtype=np.float32)
    with atomic_path(path, suffix='.npz') as tmp:
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)


def _host(a):
    if hasattr(a, 'get') and not isinstance(a, np.ndarray):
        a = a.get()
    return np.asarray(a)


# ----------------------------------------------------------------------------- any format

def load_any_weights(path):
    """LoadedWeights of a .npz, Caffe HDF5, .caffemodel or our exported .mat file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CrfGradError('file not found', file=path)
    fmt = weights_format(path)
    if fmt == 'npz':
        return load_npz_weights(path)
    if fmt == 'mat':
        from .matlab import load_mat_weights
        return load_mat_weights(path)
    if is_hdf5(path):
        return load_hdf5_weights(path)
    return weights_from_net_param(load_caffemodel(path), source=path)


def weights_to_net_param(weights, template=None, name=None):
    """A NetParameter carrying ``weights`` as layer blobs (what a .caffemodel stores).

    With a ``template`` NetParameter (e.g. the deploy prototxt) its layers are copied and the
    blobs attached by name; weights of layers the template lacks are appended as layers with
    only a name and blobs (Caffe's CopyTrainedLayersFrom matches by name only)."""
    net = caffe_pb2.NetParameter()
    if template is not None:
        net.CopyFrom(template)
        for lp in net.layer:
            del lp.blobs[:]
    if name:
        net.name = name
    by_name = {lp.name: lp for lp in net.layer}
    for layer, blobs in weights.items():
        lp = by_name.get(layer)
        if lp is None:
            if not blobs:
                continue
            lp = net.layer.add()
            lp.name = layer
            by_name[layer] = lp
        for a in blobs:
            lp.blobs.add().CopyFrom(array_to_blob(a))
    return net


def save_any_weights(weights, path, template=None, **mat_options):
    """Write ``layer -> [arrays]`` in the format the file name says (see module doc)."""
    fmt = weights_format(path)
    if fmt == 'npz':
        save_npz_weights(weights, path)
    elif fmt == 'hdf5':
        save_hdf5_weights(weights, path)
    elif fmt == 'mat':
        from .matlab import save_mat_weights
        save_mat_weights(weights, path, **mat_options)
    else:
        save_caffemodel(weights_to_net_param(weights, template), path)


def convert_weights(src, dst, proto=None, **mat_options):
    """Read weights from ``src`` and write them to ``dst`` (formats from the names).

    ``proto`` (a deploy/train prototxt) is only used when writing a .caffemodel, to keep the
    layer definitions next to the blobs.  Returns the weights."""
    weights = load_any_weights(src)
    template = None
    if proto is not None and weights_format(dst) == 'caffemodel':
        from ..io.prototxt import load_net_param
        template = load_net_param(proto)
    save_any_weights(weights, dst, template=template, **mat_options)
    return weights
