"""BlobProto <-> NumPy arrays.

A BlobProto holds one parameter (or mean image) as a flat row-major list of
values plus its shape.  The shape is either ``shape.dim`` (current Caffe) or
the legacy 4-D ``num, channels, height, width`` fields (used as soon as any of
the four is present).  Values come from ``double_data`` when it is non-empty,
else from ``data``.
"""
import numpy as np

from ..errors import CrfGradError
from ..proto import caffe_pb2

_LEGACY = ('num', 'channels', 'height', 'width')


def uses_legacy_shape(blob):
    """True when the BlobProto gives its shape with num/channels/height/width."""
    return any(blob.HasField(f) for f in _LEGACY)


def blob_shape(blob):
    """Shape tuple of a BlobProto (legacy 4-D fields win when present, as in Caffe)."""
    if uses_legacy_shape(blob):
        return tuple(int(getattr(blob, f)) for f in _LEGACY)
    return tuple(int(d) for d in blob.shape.dim)


def _values(blob, which):
    doubles = getattr(blob, 'double_' + which)
    floats = getattr(blob, which)
    if len(doubles):
        return np.asarray(doubles, dtype=np.float64), 'double_' + which
    return np.asarray(floats, dtype=np.float32), which


def blob_to_array(blob, source=None, layer=None, dtype=np.float32, diff=False):
    """Array of a BlobProto, shaped as the proto says, as ``dtype`` (float32 by default).

    ``diff=True`` reads ``diff``/``double_diff`` instead of the data.  A value
    count that differs from the product of the shape raises CrfGradError naming
    ``source`` (file) and ``layer``.
    """
    shape = blob_shape(blob)
    vals, field = _values(blob, 'diff' if diff else 'data')
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if any(d < 0 for d in shape):
        raise CrfGradError('negative blob dimension in shape %s' % (shape,), file=source,
                           layer=layer, field='shape')
    if vals.size != count:
        if not shape and vals.size == 0:
            return np.zeros((0,), dtype)
        raise CrfGradError('blob has %d values in %s but its shape %s needs %d'
                           % (vals.size, field, shape, count), file=source, layer=layer,
                           field=field)
    return vals.reshape(shape).astype(dtype, copy=False)


def blob_has_diff(blob):
    return len(blob.diff) > 0 or len(blob.double_diff) > 0


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _packed(field, values):
    """Wire bytes of a packed repeated field (``values``: a little-endian array)."""
    raw = values.tobytes()
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def array_to_blob(arr, diff=None, double=False):
    """BlobProto with ``shape`` and ``data`` (``double_data`` when ``double``) from an array.

    ``diff`` (same shape) is stored too when given.  Arrays from CuPy are moved
    to the host first.  The values are written as packed wire bytes and parsed
    once (fast for large blobs; the result is an ordinary BlobProto).
    """
    arr = _host(arr)
    if diff is not None:
        diff = _host(diff)
        if tuple(diff.shape) != tuple(arr.shape):
            raise CrfGradError('diff shape %s differs from data shape %s'
                               % (tuple(diff.shape), tuple(arr.shape)), field='diff')
    shape = caffe_pb2.BlobShape()
    shape.dim.extend(int(d) for d in arr.shape)
    shape_bytes = shape.SerializeToString()
    parts = [_varint(7 << 3 | 2) + _varint(len(shape_bytes)) + shape_bytes]
    dtype, data_field, diff_field = ('<f8', 8, 9) if double else ('<f4', 5, 6)
    parts.append(_packed(data_field, np.ascontiguousarray(arr, dtype=dtype).ravel()))
    if diff is not None:
        parts.append(_packed(diff_field, np.ascontiguousarray(diff, dtype=dtype).ravel()))
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(b''.join(parts))
    return blob


def legacy_shape_matches(blob, target_shape):
    """Caffe's Blob::ShapeEquals: legacy 4-D protos match right-aligned, padded with 1s."""
    target_shape = tuple(int(d) for d in target_shape)
    if uses_legacy_shape(blob):
        if len(target_shape) > 4:
            return False
        padded = (1,) * (4 - len(target_shape)) + target_shape
        return padded == blob_shape(blob)
    return blob_shape(blob) == target_shape


def _host(a):
    if hasattr(a, 'get') and not isinstance(a, np.ndarray):
        a = a.get()
    return np.asarray(a)
