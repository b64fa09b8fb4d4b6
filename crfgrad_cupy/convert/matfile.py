"""MATLAB .mat files: read v4/v5/v7 (SciPy) and v7.3 (HDF5, h5py) into one Python form; write v5/v7/v7.3.

Python form of MATLAB values (the same for every file version):

* numeric array  -> ``np.ndarray`` with MATLAB's shape and indexing (at least 2-D; a
  scalar is (1, 1)); integer-valued doubles that MATLAB stored compactly come back with
  their stored integer dtype (cast hyper-parameters explicitly)
* logical        -> ``np.ndarray`` of bool
* char           -> ``str`` (a char matrix with several rows -> list of str)
* cell array     -> ``list`` of its elements in MATLAB's linear (column-major) order
* scalar struct  -> ``dict`` (field order kept)
* struct array   -> :class:`StructArray` (a list of dicts, column-major order, with ``shape``)
* empty ``[]``   -> an empty array of shape (0, 0) (``{}`` -> [], ``''`` -> '')

Writing takes the same form (plus Python scalars -> 1x1 double, ``None`` -> ``[]``,
1-D arrays -> row vectors).  v7.3 files follow MATLAB's HDF5 layout: a 512-byte user
block with the MAT header, every array stored with its axes reversed (MATLAB is
column-major), attributes ``MATLAB_class`` / ``MATLAB_int_decode`` / ``MATLAB_empty``
/ ``MATLAB_fields``, cells and struct-array fields as object references into ``#refs#``.
"""
import collections
import os
import time

import numpy as np

from ..errors import CrfGradError
from ..io.atomic import atomic_path

HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'

_CLASS_OF_DTYPE = {
    np.dtype(np.float64): 'double', np.dtype(np.float32): 'single',
    np.dtype(np.int8): 'int8', np.dtype(np.uint8): 'uint8',
    np.dtype(np.int16): 'int16', np.dtype(np.uint16): 'uint16',
    np.dtype(np.int32): 'int32', np.dtype(np.uint32): 'uint32',
    np.dtype(np.int64): 'int64', np.dtype(np.uint64): 'uint64',
}
_DTYPE_OF_CLASS = {v: k for k, v in _CLASS_OF_DTYPE.items()}
_DTYPE_OF_CLASS['logical'] = np.dtype(bool)
_DTYPE_OF_CLASS['char'] = np.dtype(np.uint16)


class StructArray(list):
    """A MATLAB struct array: a list of dicts (column-major order) with its MATLAB ``shape``."""

    def __init__(self, elements=(), shape=None):
        super().__init__(elements)
        self.shape = tuple(shape) if shape is not None else (1, len(self))

    @property
    def fields(self):
        return list(self[0].keys()) if len(self) else []


def as_list(value):
    """A struct array, a cell or a single struct as a list of its elements."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return list(value)
    if isinstance(value, np.ndarray) and value.size == 0:
        return []
    return [value]


# ----------------------------------------------------------------------------- detection

def mat_version(path):
    """'4', '5' (v5/v6/v7, SciPy-readable) or '7.3' (HDF5); CrfGradError if not a MAT file."""
    path = os.fspath(path)
    try:
        with open(path, 'rb') as f:
            head = f.read(128)
            f.seek(512)
            h5 = f.read(8) == HDF5_SIGNATURE
    except FileNotFoundError:
        raise CrfGradError('file not found', file=path) from None
    except IsADirectoryError:
        raise CrfGradError('is a directory, not a MAT file', file=path) from None
    if head[:8] == HDF5_SIGNATURE or h5:
        return '7.3'
    if len(head) == 128 and head[:6] == b'MATLAB' and head[126:128] in (b'IM', b'MI'):
        return '5'
    try:
        from scipy.io.matlab import matfile_version
        major, _ = matfile_version(path)
    except Exception:
        raise CrfGradError('not a MATLAB .mat file (no MAT-file header)', file=path) from None
    if major == 0:
        return '4'
    if major == 2:
        return '7.3'
    return '5'


# ----------------------------------------------------------------------------- reading v5

def _from_scipy(value, source):
    import scipy.io.matlab as sm
    if isinstance(value, np.ndarray):
        if value.dtype.names is not None:
            elements = [collections.OrderedDict((name, _from_scipy(el[name], source))
                                                for name in value.dtype.names)
                        for el in value.ravel(order='F')]
            if value.size == 1:
                return elements[0]
            return StructArray(elements, value.shape)
        if value.dtype == object:
            items = value.ravel(order='F')
            if items.size and all(v is None for v in items):
                # SciPy's view of a struct without fields
                if items.size == 1:
                    return collections.OrderedDict()
                return StructArray([collections.OrderedDict() for _ in items], value.shape)
            return [_from_scipy(v, source) for v in items]
        if value.dtype.kind == 'U':
            if value.size == 0:
                return ''
            if value.size == 1:
                return str(value.ravel()[0])
            return [str(v) for v in value.ravel()]
        return value
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, (sm.MatlabFunction, sm.MatlabOpaque)):
        raise CrfGradError('MATLAB objects and function handles cannot be read (a dagnn.DagNN '
                           'object? save net.saveobj() instead)', file=source)
    if hasattr(value, 'toarray'):  # sparse
        return np.asarray(value.toarray())
    return value


def _load_v5(path):
    import scipy.io
    try:
        raw = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=True,
                               chars_as_strings=True, mat_dtype=False)
    except NotImplementedError:
        raise CrfGradError('MAT v7.3 file could not be detected as HDF5', file=path) from None
    except Exception as exc:  # scipy raises many types for damaged files
        raise CrfGradError('cannot read MAT file: %s' % exc, file=path) from None
    return collections.OrderedDict((k, _from_scipy(v, path)) for k, v in raw.items()
                                   if not k.startswith('__'))


# ----------------------------------------------------------------------------- reading v7.3

def _attr_str(obj, name):
    v = obj.attrs.get(name)
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode('ascii', 'replace')
    if isinstance(v, np.ndarray) and v.dtype.kind == 'S':
        return b''.join(v.ravel().tolist()).decode('ascii', 'replace')
    return str(v)


def _field_names(group):
    raw = group.attrs.get('MATLAB_fields')
    if raw is None:
        return list(group.keys())
    names = []
    for item in raw:
        if isinstance(item, bytes):
            names.append(item.decode('ascii'))
        else:
            names.append(b''.join(np.asarray(item).ravel().tolist()).decode('ascii'))
    return names


def _decode_chars(codes):
    """MATLAB char array (MATLAB shape, UTF-16 code units) -> str or list of str."""
    if codes.ndim != 2:
        codes = codes.reshape(codes.shape[0], -1, order='F')
    rows = [''.join(chr(int(c)) for c in row) for row in codes]
    if len(rows) == 1:
        return rows[0]
    return rows


def _read_h5(f, obj, source, where):
    import h5py
    cls = _attr_str(obj, 'MATLAB_class')
    if isinstance(obj, h5py.Group):
        if cls != 'struct':
            if obj.attrs.get('MATLAB_sparse') is not None:
                raise CrfGradError('sparse matrices are not supported (%s)' % where, file=source)
            raise CrfGradError('unsupported MATLAB class %r in HDF5 group %s' % (cls, where),
                               file=source)
        names = _field_names(obj)
        members = [obj[n] for n in names if n in obj]
        is_array = members and all(
            isinstance(m, h5py.Dataset) and m.dtype == h5py.ref_dtype and
            m.attrs.get('MATLAB_class') is None for m in members)
        if not is_array:
            return collections.OrderedDict(
                (n, _read_h5(f, obj[n], source, where + '.' + n)) for n in names if n in obj)
        shape = tuple(reversed(members[0].shape))
        refs = collections.OrderedDict((n, obj[n][()].T.ravel(order='F')) for n in names)
        count = int(np.prod(shape))
        elements = []
        for i in range(count):
            elements.append(collections.OrderedDict(
                (n, _read_h5(f, f[refs[n][i]], source, '%s(%d).%s' % (where, i + 1, n)))
                for n in names))
        if count == 1:
            return elements[0]
        return StructArray(elements, shape)
    # a dataset
    if obj.attrs.get('MATLAB_empty') is not None and int(np.asarray(obj.attrs['MATLAB_empty'])):
        dims = tuple(int(d) for d in np.asarray(obj[()]).ravel())
        if cls == 'struct':
            return collections.OrderedDict() if int(np.prod(dims)) == 1 else StructArray([], dims)
        if cls == 'cell':
            return []
        if cls == 'char':
            return ''
        dtype = _DTYPE_OF_CLASS.get(cls, np.dtype(np.float64))
        return np.zeros(dims, dtype=dtype)
    data = obj[()]
    if cls == 'cell' or (cls is None and obj.dtype == h5py.ref_dtype):
        arr = np.asarray(data).T
        return [_read_h5(f, f[r], source, '%s{%d}' % (where, i + 1))
                for i, r in enumerate(arr.ravel(order='F'))]
    arr = np.asarray(data)
    if arr.dtype.names and set(arr.dtype.names) >= {'real', 'imag'}:
        arr = arr['real'] + 1j * arr['imag']
    arr = arr.T
    if arr.ndim < 2:
        arr = arr.reshape((1,) * (2 - arr.ndim) + arr.shape)
    if cls == 'char':
        return _decode_chars(arr)
    if cls == 'logical':
        return arr.astype(bool)
    if cls in ('function_handle',) or obj.attrs.get('MATLAB_object_decode') is not None:
        raise CrfGradError('MATLAB objects and function handles cannot be read (%s; a dagnn.DagNN '
                           'object? save net.saveobj() instead)' % where,
                           file=source)
    if cls in _DTYPE_OF_CLASS:
        return arr.astype(_DTYPE_OF_CLASS[cls], copy=False)
    return arr


def _load_v73(path):
    try:
        import h5py
    except ImportError:  # pragma: no cover - dependency
        raise CrfGradError('reading MAT v7.3 files needs h5py', file=path) from None
    out = collections.OrderedDict()
    try:
        with h5py.File(path, 'r') as f:
            for name in f.keys():
                if name.startswith('#'):
                    continue
                out[name] = _read_h5(f, f[name], path, name)
    except OSError as exc:
        raise CrfGradError('cannot read MAT v7.3 (HDF5) file: %s' % exc, file=path) from None
    return out


def load_mat(path):
    """OrderedDict ``variable name -> value`` (Python form above) of any MAT file version."""
    path = os.fspath(path)
    version = mat_version(path)
    if version == '7.3':
        return _load_v73(path)
    return _load_v5(path)


# ----------------------------------------------------------------------------- writing v5

def _check_fields(names):
    for n in names:
        if not is_valid_identifier(n):
            raise CrfGradError('%r is not a valid MATLAB struct field name' % (n,), field=str(n))


def _to_scipy(value):
    if isinstance(value, StructArray):
        fields = value.fields
        _check_fields(fields)
        if any(list(el.keys()) != fields for el in value):
            raise CrfGradError('the elements of a struct array have different fields')
        arr = np.empty(value.shape, dtype=[(n, object) for n in fields])
        flat = arr.reshape(-1, order='F')
        for i, el in enumerate(value):
            for n in fields:
                flat[i][n] = _to_scipy(el[n])
        return arr
    if isinstance(value, dict):
        _check_fields(value)
        return {k: _to_scipy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        cell = np.empty((1, len(value)), dtype=object)
        for i, v in enumerate(value):
            cell[0, i] = _to_scipy(v)
        return cell
    if value is None:
        return np.zeros((0, 0))
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return np.array([[bool(value)]])
    if isinstance(value, (int, float, np.integer, np.floating)):
        return np.array([[value]], dtype=np.float64 if isinstance(value, (int, float)) else None)
    arr = _host(value)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(1, -1)
    return arr


def _host(a):
    if hasattr(a, 'get') and not isinstance(a, np.ndarray):
        a = a.get()
    return np.asarray(a)


# ----------------------------------------------------------------------------- writing v7.3

def _matlab_header(version_text='7.3'):
    stamp = time.strftime('%a %b %d %H:%M:%S %Y', time.gmtime())
    text = 'MATLAB %s MAT-file, Platform: GLNXA64, Created on: %s HDF5 schema 1.00 .' % (
        version_text, stamp)
    text = text.encode('ascii')[:116].ljust(116, b' ')
    return text + b'\x00' * 8 + b'\x00\x02' + b'IM'


class _H5Writer:
    def __init__(self, f):
        import h5py
        self.h5py = h5py
        self.f = f
        self.refs = None
        self.count = 0

    def _refs_group(self):
        if self.refs is None:
            self.refs = self.f.create_group('#refs#')
        return self.refs

    def _next_name(self):
        digits = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
        n, s = self.count, ''
        self.count += 1
        while True:
            s = digits[n % len(digits)] + s
            n //= len(digits)
            if not n:
                return s

    def ref_to(self, value):
        group = self._refs_group()
        name = self._next_name()
        self.write(group, name, value)
        return group[name].ref

    @staticmethod
    def _set_class(obj, cls):
        obj.attrs.create('MATLAB_class', np.bytes_(cls.encode('ascii')))

    def _fields_attr(self, obj, names):
        vlen = self.h5py.vlen_dtype(np.dtype('S1'))
        data = np.empty(len(names), dtype=object)
        for i, n in enumerate(names):
            data[i] = np.frombuffer(n.encode('ascii'), dtype='S1')
        obj.attrs.create('MATLAB_fields', data, dtype=vlen)

    def _empty(self, parent, name, cls, dims):
        ds = parent.create_dataset(name, data=np.asarray(dims, dtype=np.uint64))
        self._set_class(ds, cls)
        ds.attrs.create('MATLAB_empty', np.uint8(1))
        return ds

    def write(self, parent, name, value):
        h5py = self.h5py
        if isinstance(value, StructArray):
            fields = value.fields
            _check_fields(fields)
            if any(list(el.keys()) != fields for el in value):
                raise CrfGradError('the elements of struct array %s have different fields' % name)
            if not len(value):
                return self._empty(parent, name, 'struct', (0, 0))
            group = parent.create_group(name)
            self._set_class(group, 'struct')
            self._fields_attr(group, fields)
            shape_h5 = tuple(reversed(value.shape))
            for n in fields:
                refs = np.empty(len(value), dtype=h5py.ref_dtype)
                for i, el in enumerate(value):
                    refs[i] = self.ref_to(el[n])
                # column-major element order -> HDF5 (reversed shape, C order)
                group.create_dataset(n, data=refs.reshape(shape_h5), dtype=h5py.ref_dtype)
            return group
        if isinstance(value, dict):
            _check_fields(value)
            if not value:
                return self._empty(parent, name, 'struct', (1, 1))
            group = parent.create_group(name)
            self._set_class(group, 'struct')
            self._fields_attr(group, list(value.keys()))
            for k, v in value.items():
                self.write(group, k, v)
            return group
        if isinstance(value, (list, tuple)):
            if not len(value):
                return self._empty(parent, name, 'cell', (0, 0))
            refs = np.empty((len(value), 1), dtype=h5py.ref_dtype)   # MATLAB 1 x n
            for i, v in enumerate(value):
                refs[i, 0] = self.ref_to(v)
            ds = parent.create_dataset(name, data=refs, dtype=h5py.ref_dtype)
            self._set_class(ds, 'cell')
            return ds
        if value is None:
            return self._empty(parent, name, 'double', (0, 0))
        if isinstance(value, str):
            if not value:
                return self._empty(parent, name, 'char', (0, 0))
            codes = np.frombuffer(value.encode('utf-16-le'), dtype='<u2').reshape(-1, 1)
            ds = parent.create_dataset(name, data=codes)
            self._set_class(ds, 'char')
            ds.attrs.create('MATLAB_int_decode', np.int32(2))
            return ds
        if isinstance(value, (bool, np.bool_)):
            value = np.array([[bool(value)]])
        elif isinstance(value, (int, float)):
            value = np.array([[float(value)]])
        arr = _host(value)
        if arr.ndim == 0:
            arr = arr.reshape(1, 1)
        elif arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.dtype == bool:
            cls, data = 'logical', arr.astype(np.uint8)
        elif arr.dtype in _CLASS_OF_DTYPE:
            cls, data = _CLASS_OF_DTYPE[arr.dtype], arr
        else:
            raise CrfGradError('cannot store %s arrays in a MAT file (variable %s)'
                               % (arr.dtype, name))
        if arr.size == 0:
            return self._empty(parent, name, cls, arr.shape)
        ds = parent.create_dataset(name, data=np.ascontiguousarray(data.T))
        self._set_class(ds, cls)
        if cls == 'logical':
            ds.attrs.create('MATLAB_int_decode', np.int32(1))
        return ds


def _check_names(variables, path):
    for name in variables:
        if not is_valid_identifier(name):
            raise CrfGradError('%r is not a valid MATLAB variable name' % name, file=path)


def save_mat(path, variables, version='7.3'):
    """Write ``{name: value}`` (Python form above) as MAT ``version`` '5', '7' (compressed) or '7.3'.

    Written to a temporary file renamed into place."""
    path = os.fspath(path)
    version = str(version)
    if version not in ('5', '7', '7.3'):
        raise CrfGradError('MAT version must be 5, 7 or 7.3, got %r' % version, file=path)
    _check_names(variables, path)
    with atomic_path(path) as tmp:
        if version == '7.3':
            import h5py
            with h5py.File(tmp, 'w', userblock_size=512, libver='earliest') as f:
                w = _H5Writer(f)
                for name, value in variables.items():
                    w.write(f, name, value)
            with open(tmp, 'r+b') as f:
                f.write(_matlab_header('7.3'))
        else:
            import scipy.io
            scipy.io.savemat(tmp, {k: _to_scipy(v) for k, v in variables.items()},
                             do_compression=(version == '7'), long_field_names=True,
                             oned_as='row')


# ----------------------------------------------------------------------------- identifiers

def is_valid_identifier(name):
    """A valid MATLAB variable / field name: letter first, then letters, digits, '_'; <= 63."""
    return (isinstance(name, str) and 0 < len(name) <= 63 and name[0].isascii()
            and name[0].isalpha() and all(c.isascii() and (c.isalnum() or c == '_') for c in name))


def sanitize_names(names, prefix='x'):
    """Map each name to a unique valid MATLAB identifier (invalid chars -> '_').

    Returns a list in the input order; names that are already valid and unique stay."""
    out, used = [], set()
    for name in names:
        s = ''.join(c if (c.isascii() and (c.isalnum() or c == '_')) else '_' for c in str(name))
        if not s or not s[0].isalpha():
            s = prefix + s
        s = s[:63]
        base, k = s, 1
        while s in used:
            suffix = '_%d' % k
            s = base[:63 - len(suffix)] + suffix
            k += 1
        used.add(s)
        out.append(s)
    return out
