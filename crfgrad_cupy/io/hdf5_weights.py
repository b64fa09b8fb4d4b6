"""Caffe's HDF5 weights (``.caffemodel.h5``) and format detection for weights files.

Layout: root group ``data`` with one group per layer (every layer, blob-less
ones empty), holding datasets ``"0"``, ``"1"``, ... (blob index) with the blob's
N-D shape.  With diffs, a parallel root group ``diff`` has the same layout.
"""
import os

import numpy as np

from ..errors import CrfGradError
from .caffemodel import LoadedWeights, load_caffemodel_weights
from .atomic import atomic_path

HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        raise CrfGradError('reading HDF5 weights needs the h5py package') from None
    return h5py


def is_hdf5(path):
    """True when the file starts with the HDF5 signature (at offset 0, 512, 1024, ...)."""
    try:
        with open(os.fspath(path), 'rb') as f:
            head = f.read(8)
            if head == HDF5_SIGNATURE:
                return True
            # HDF5 allows a user block: the superblock may sit at 512 * 2**k
            size = os.fstat(f.fileno()).st_size
            off = 512
            while off + 8 <= size:
                f.seek(off)
                if f.read(8) == HDF5_SIGNATURE:
                    return True
                off *= 2
    except (FileNotFoundError, IsADirectoryError):
        return False
    return False


def _index_names(group, source, layer):
    names = list(group.keys())
    try:
        idx = sorted((int(n), n) for n in names)
    except ValueError:
        bad = [n for n in names if not n.isdigit()]
        raise CrfGradError('blob datasets must be named 0, 1, 2, ...; found %r' % bad[0],
                           file=source, layer=layer, field='data') from None
    if [i for i, _ in idx] != list(range(len(idx))):
        raise CrfGradError('blob datasets are not numbered 0..%d: %s'
                           % (len(idx) - 1, [n for _, n in idx]), file=source, layer=layer,
                           field='data')
    return [n for _, n in idx]


def _read_group(root, source, dtype):
    out = LoadedWeights()
    out.source = source
    h5py = _h5py()
    items = list(root.items())
    while items:
        layer, group = items.pop(0)
        if isinstance(group, h5py.Group) and len(group) and \
                all(isinstance(v, h5py.Group) for v in group.values()):
            # a layer name with '/' (e.g. "inception_3a/1x1") is stored as nested groups
            items[:0] = [(layer + '/' + k, v) for k, v in group.items()]
            continue
        if not isinstance(group, h5py.Group):
            raise CrfGradError('expected a group per layer under /data, found a dataset',
                               file=source, layer=layer, field='data')
        arrays = []
        for name in _index_names(group, source, layer):
            ds = group[name]
            if not isinstance(ds, h5py.Dataset):
                raise CrfGradError('blob %s is not a dataset' % name, file=source, layer=layer,
                                   field='data')
            if ds.dtype.kind not in 'fiu':
                raise CrfGradError('blob %s has non-numeric type %s' % (name, ds.dtype),
                                   file=source, layer=layer, field='data')
            arrays.append(np.asarray(ds[()], dtype=dtype).reshape(ds.shape))
        out[layer] = arrays
    return out


def load_hdf5_weights(path, dtype=np.float32, diffs=False):
    """LoadedWeights (``layer -> [arrays]``) of a Caffe HDF5 weights file, in the file's order.

    ``diffs=True`` returns ``(weights, diffs)`` where diffs is None when the
    file has no ``diff`` group.
    """
    path = os.fspath(path)
    h5py = _h5py()
    if not os.path.exists(path):
        raise CrfGradError('file not found', file=path)
    if not is_hdf5(path):
        raise CrfGradError('not an HDF5 file', file=path)
    try:
        with h5py.File(path, 'r') as f:
            if 'data' not in f:
                raise CrfGradError("no '/data' group: not a Caffe HDF5 weights file "
                                   '(top-level entries: %s)' % sorted(f.keys()), file=path,
                                   field='data')
            weights = _read_group(f['data'], path, dtype)
            d = _read_group(f['diff'], path, dtype) if 'diff' in f else None
    except OSError as exc:
        raise CrfGradError('cannot read HDF5 file (truncated or damaged?): %s' % exc,
                           file=path) from None
    return (weights, d) if diffs else weights


def _host(a):
    if hasattr(a, 'get') and not isinstance(a, np.ndarray):
        a = a.get()
    return np.asarray(a)


def save_hdf5_weights(weights, path, diffs=None, dtype=np.float32):
    """Write ``layer -> [arrays]`` (and optional ``diffs`` of the same form) as Caffe HDF5.

    Layers with no arrays get an empty group.  Written to a temporary file
    that is renamed into place.
    """
    h5py = _h5py()
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, 'w') as f:
            for group_name, content in (('data', weights), ('diff', diffs)):
                if content is None:
                    continue
                root = f.create_group(group_name)
                for layer, arrays in content.items():
                    g = root.create_group(layer)
                    for i, a in enumerate(arrays):
                        g.create_dataset(str(i), data=np.asarray(_host(a), dtype=dtype))


def load_weights(path):
    """LoadedWeights of a weights file, HDF5 or binary caffemodel, chosen by content."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CrfGradError('file not found', file=path)
    if is_hdf5(path):
        return load_hdf5_weights(path)
    return load_caffemodel_weights(path)
