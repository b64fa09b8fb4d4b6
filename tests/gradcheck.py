"""Finite-difference gradient checker for single layers (float64, central differences).

Usage from a test::

    from gradcheck import check_layer_gradients
    check_layer_gradients('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                          [(2, 3, 5, 6)])

The layer is built in float64, its bottoms (and, unless told otherwise, its
parameter blobs) are filled with seeded N(0, 1) numbers, and the scalar loss
``L = sum_k sum(top_k * R_k)`` with fixed random ``R_k`` is differentiated two
ways: by the layer's ``backward`` (top diffs = R) and by central differences
``(L(v + eps) - L(v - eps)) / (2 eps)`` for every element ``v`` of every checked
bottom and parameter blob.  Mismatches raise AssertionError naming the blob and
the worst element.
"""
import numpy as np
from google.protobuf import text_format

from crfgrad_cupy import backend
from crfgrad_cupy.blob import Blob
from crfgrad_cupy.layers.base import create_layer
from crfgrad_cupy.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def _as_layer_param(layer_param):
    if isinstance(layer_param, caffe_pb2.LayerParameter):
        out = caffe_pb2.LayerParameter()
        out.CopyFrom(layer_param)
    else:
        out = caffe_pb2.LayerParameter()
        text_format.Merge(layer_param, out)
    if not out.name:
        out.name = 'gradcheck'
    return out


def _pick(spec, i):
    """``spec`` is None, one item for all, or a list with one item per index."""
    if isinstance(spec, (list, tuple)):
        return spec[i] if i < len(spec) else None
    return spec


def _initial_array(entry, init, rng):
    is_shape = isinstance(entry, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in entry)
    if not is_shape:
        return np.array(backend.to_numpy(entry), dtype=np.float64)
    shape = tuple(int(s) for s in entry)
    if init is None:
        return rng.standard_normal(shape)
    if callable(init):
        return np.array(init(rng, shape), dtype=np.float64).reshape(shape)
    return np.array(init, dtype=np.float64).reshape(shape)


def check_layer_gradients(layer_param, bottoms, phase=TEST, seed=0, eps=1e-6, rtol=1e-5, atol=1e-7,
                          check_params=True, propagate_down=None, bottom_init=None,
                          param_init='normal', num_top=None, check_bottoms=None):
    """Compare a layer's analytic gradients with central finite differences in float64.

    layer_param: LayerParameter or its prototxt text (``type: "..." ...``).
    bottoms: list, one entry per bottom: a shape (tuple/list of ints, () = scalar blob,
        filled by ``bottom_init``) or an array (used as is, e.g. labels).
    bottom_init: None (N(0,1)), a callable ``f(rng, shape) -> array`` or a list of
        those / arrays per bottom (None entries = N(0,1)).
    param_init: 'normal' (replace every parameter blob by N(0,1) after setup),
        None (keep what the layer's fillers made), or a list with one entry per
        blob (array, callable ``f(rng, shape)``, or None = keep).
    propagate_down: list of bools per bottom (default: all True); bottoms with
        False are neither asked for nor checked.
    check_params: also check parameter diffs (blobs with param_propagate_down).
    num_top: number of top blobs (default: len(layer_param.top) or 1).
    Returns a dict {what: max abs error} for reporting.
    """
    param = _as_layer_param(layer_param)
    rng = np.random.default_rng(seed)
    n_top = num_top if num_top is not None else (len(param.top) or 1)
    with backend.dtype_scope(np.float64):
        xp = backend.xp()
        layer = create_layer(param, phase)
        bottom_blobs = []
        for i, entry in enumerate(bottoms):
            arr = _initial_array(entry, _pick(bottom_init, i), rng)
            b = Blob(arr.shape)
            b.data = xp.asarray(arr)
            bottom_blobs.append(b)
        top_blobs = [Blob(()) for _ in range(n_top)]
        layer.setup(bottom_blobs, top_blobs)

        # parameter values
        if param_init is not None:
            for j, blob in enumerate(layer.blobs):
                spec = 'normal' if param_init == 'normal' else _pick(param_init, j)
                if spec is None:
                    continue
                if isinstance(spec, str) and spec == 'normal':
                    arr = rng.standard_normal(blob.shape)
                elif callable(spec):
                    arr = np.array(spec(rng, blob.shape), dtype=np.float64).reshape(blob.shape)
                else:
                    arr = np.array(backend.to_numpy(spec), dtype=np.float64).reshape(blob.shape)
                blob.data = xp.asarray(arr)

        if propagate_down is None:
            propagate_down = [True] * len(bottom_blobs)
        propagate_down = list(propagate_down)
        if check_bottoms is None:
            check_bottoms = propagate_down

        bottom_values = [backend.to_numpy(b.data).copy() for b in bottom_blobs]
        param_values = [backend.to_numpy(b.data).copy() for b in layer.blobs]

        def restore():
            for b, v in zip(bottom_blobs, bottom_values):
                b.data = xp.asarray(v.copy())
            for b, v in zip(layer.blobs, param_values):
                b.data = xp.asarray(v.copy())

        layer.reshape(bottom_blobs, top_blobs)
        layer.forward(bottom_blobs, top_blobs)
        projections = [rng.standard_normal(t.shape) for t in top_blobs]

        def loss():
            layer.reshape(bottom_blobs, top_blobs)
            layer.forward(bottom_blobs, top_blobs)
            return float(sum(np.sum(backend.to_numpy(t.data) * r) for t, r in zip(top_blobs, projections)))

        # analytic gradients
        restore()
        loss()
        for t, r in zip(top_blobs, projections):
            t.diff = xp.asarray(r)
        for b in layer.blobs:
            b.diff = xp.zeros(b.shape, np.float64)
        for b in bottom_blobs:
            b.diff = xp.full(b.shape, np.nan)  # backward must overwrite
        layer.backward(top_blobs, propagate_down, bottom_blobs)
        analytic = {}
        for i, b in enumerate(bottom_blobs):
            if check_bottoms[i]:
                analytic[('bottom', i)] = backend.to_numpy(b.diff).copy()
        if check_params:
            for j, b in enumerate(layer.blobs):
                if j < len(layer.param_propagate_down) and layer.param_propagate_down[j]:
                    analytic[('param', j)] = backend.to_numpy(b.diff).copy()

        # numeric gradients
        report = {}
        for key, grad in analytic.items():
            kind, idx = key
            values = bottom_values[idx] if kind == 'bottom' else param_values[idx]
            numeric = np.zeros(values.shape)
            flat = numeric.reshape(-1)
            for e in range(values.size):
                for sign in (+1, -1):
                    restore()
                    target = bottom_blobs[idx] if kind == 'bottom' else layer.blobs[idx]
                    pert = values.copy().reshape(-1)
                    pert[e] += sign * eps
                    target.data = xp.asarray(pert.reshape(values.shape))
                    flat[e] += sign * loss()
            numeric /= 2 * eps
            what = '%s %s[%d] of layer %r (%s)' % (param.type, kind, idx, param.name, kind)
            assert grad.shape == numeric.shape, '%s: diff shape %s != %s' % (what, grad.shape, numeric.shape)
            assert np.all(np.isfinite(grad)), '%s: analytic diff has non-finite values' % what
            err = np.abs(grad - numeric)
            tol = atol + rtol * np.abs(numeric)
            report['%s%d' % (kind, idx)] = float(err.max()) if err.size else 0.0
            if err.size and np.any(err > tol):
                w = np.unravel_index(np.argmax(err - tol), err.shape)
                raise AssertionError('%s: analytic %r vs numeric %r at %s (max abs err %.3g, max|num| %.3g)' % (
                    what, grad[w], numeric[w], w, err.max(), np.abs(numeric).max()))
        restore()
    return report
