"""Caffe weights -> MATLAB .mat (and back), in matcaffe's or MatConvNet's axis order.

Axis orders (NumPy shapes as MATLAB sees them; ``x`` is a Caffe blob):

* ``'matcaffe'``: every axis reversed, as matcaffe's ``net.params(name, i).get_data()``:
  conv (Cout, Cin, kh, kw) -> [kw kh Cin Cout]; InnerProduct (Nout, K) -> [K Nout];
  a 1-D blob (n,) -> n x 1; a scalar -> 1 x 1.
* ``'matconvnet'``: 4-D blobs as MatConvNet filters, (d0, d1, d2, d3) -> [d2 d3 d1 d0]
  (conv (Cout, Cin, kh, kw) -> [kh kw Cin Cout]; Deconvolution (Cin, Cout/g, kh, kw) ->
  [kh kw Cout/g Cin], which is vl_nnconvt's layout); other ranks as in matcaffe.

Variables written:

* ``weights``: a struct with one field per layer (name sanitised to a MATLAB identifier)
  holding a 1 x n cell of the layer's blobs (single);
* ``caffe_shapes``: the same fields, each a 1 x n cell of the blobs' Caffe shapes (row
  vectors; lets a reader restore trailing singleton dimensions MATLAB drops);
* ``caffe_names`` / ``matlab_names``: 1 x L cells, the original layer names and their
  field names, in net order (the name mapping);
* ``axis_order``: 'matcaffe' or 'matconvnet'.

MAT version '7.3' (HDF5, default), '7' (compressed v5) or '5'.
"""
import collections

import numpy as np

from ..errors import CrfGradError
from ..io.caffemodel import LoadedWeights
from .matfile import load_mat, sanitize_names, save_mat

AXIS_ORDERS = ('matcaffe', 'matconvnet')


def _check_order(order):
    if order not in AXIS_ORDERS:
        raise CrfGradError('axis order must be one of %s, got %r' % (', '.join(AXIS_ORDERS), order),
                           field='axis_order')


def caffe_to_matlab_array(x, order='matcaffe'):
    """A Caffe blob as the MATLAB array (NumPy with MATLAB indexing) of ``order``."""
    _check_order(order)
    x = np.asarray(x)
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x.reshape(-1, 1)
    if order == 'matconvnet' and x.ndim == 4:
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return np.ascontiguousarray(x.T)


def matlab_to_caffe_array(m, shape, order='matcaffe'):
    """Inverse of :func:`caffe_to_matlab_array` given the blob's Caffe ``shape``.

    MATLAB may have dropped trailing singleton dimensions of ``m``; they are restored."""
    _check_order(order)
    shape = tuple(int(d) for d in shape)
    m = np.asarray(m)
    if m.size != int(np.prod(shape, dtype=np.int64)):
        raise CrfGradError('array of %d values cannot have Caffe shape %s' % (m.size, shape))
    if len(shape) <= 1:
        return m.reshape(shape)
    if m.ndim > len(shape):
        if any(d != 1 for d in m.shape[len(shape):]):
            raise CrfGradError('MATLAB array %s does not match Caffe shape %s' % (m.shape, shape))
        m = m.reshape(m.shape[:len(shape)])
    m = m.reshape(m.shape + (1,) * (len(shape) - m.ndim))
    if order == 'matconvnet' and len(shape) == 4:
        out = m.transpose(3, 2, 0, 1)
    else:
        out = m.T
    if out.shape != shape:
        raise CrfGradError('MATLAB array %s does not match Caffe shape %s in %s order'
                           % (m.shape, shape, order))
    return out


def weights_to_mat_variables(weights, order='matcaffe'):
    """The .mat variables (see module doc) for ``layer -> [arrays]``; layers without blobs skipped."""
    _check_order(order)
    layers = [(name, blobs) for name, blobs in weights.items() if len(blobs)]
    mnames = sanitize_names([name for name, _ in layers], prefix='layer_')
    w = collections.OrderedDict()
    shapes = collections.OrderedDict()
    for mname, (name, blobs) in zip(mnames, layers):
        w[mname] = [caffe_to_matlab_array(np.asarray(_host(b), dtype=np.float32), order)
                    for b in blobs]
        shapes[mname] = [np.asarray([list(np.shape(b))], dtype=np.float64).reshape(1, -1)
                         for b in blobs]
    return collections.OrderedDict([
        ('weights', w), ('caffe_shapes', shapes),
        ('caffe_names', [name for name, _ in layers]), ('matlab_names', list(mnames)),
        ('axis_order', order)])


def save_mat_weights(weights, path, order='matcaffe', version='7.3'):
    """Write Caffe weights (``layer -> [arrays]``) as a MATLAB .mat file."""
    variables = weights_to_mat_variables(weights, order)
    save_mat(path, variables, version=version)
    return variables


def load_mat_weights(path):
    """LoadedWeights (Caffe order) of a .mat written by :func:`save_mat_weights`."""
    variables = load_mat(path)
    missing = [k for k in ('weights', 'caffe_names', 'matlab_names', 'axis_order')
               if k not in variables]
    if missing:
        raise CrfGradError('not a Caffe weights .mat file: variable(s) %s missing'
                           % ', '.join(missing), file=str(path))
    order = variables['axis_order']
    _check_order(order)
    w = variables['weights']
    shapes = variables.get('caffe_shapes') or {}
    out = LoadedWeights()
    out.source = str(path)
    for cname, mname in zip(variables['caffe_names'], variables['matlab_names']):
        if mname not in w:
            raise CrfGradError('field %r missing from weights' % mname, file=str(path), layer=cname)
        blobs = w[mname]
        if not isinstance(blobs, list):
            blobs = [blobs]
        layer_shapes = shapes.get(mname)
        if not isinstance(layer_shapes, list) or len(layer_shapes) != len(blobs):
            # no stored shapes: take MATLAB's (trailing singleton dims cannot be recovered)
            layer_shapes = [_guess_shape(b, order) for b in blobs]
        arrays = []
        for b, s in zip(blobs, layer_shapes):
            s = [int(d) for d in np.asarray(s).ravel()]
            try:
                arrays.append(np.asarray(matlab_to_caffe_array(b, s, order), dtype=np.float32))
            except CrfGradError as exc:
                raise CrfGradError(str(exc), file=str(path), layer=cname) from None
        out[cname] = arrays
    return out


def _guess_shape(m, order):
    m = np.asarray(m)
    if order == 'matconvnet' and m.ndim == 4:
        return m.transpose(3, 2, 0, 1).shape
    return m.T.shape


def _host(a):
    if hasattr(a, 'get') and not isinstance(a, np.ndarray):
        a = a.get()
    return np.asarray(a)
