"""Caffe's weight fillers (FillerParameter): constant, uniform, gaussian, xavier, msra,
bilinear, positive_unitball.  Random numbers come from one NumPy generator that
:func:`set_random_seed` seeds (Caffe's ``random_seed``); values are made on the CPU
and moved to the current device."""
import numpy as np

from .. import backend
from ..errors import CrfGradError

_rng = {'gen': np.random.default_rng()}


def set_random_seed(seed):
    _rng['gen'] = np.random.default_rng(None if seed is None or seed < 0 else int(seed))


def rng():
    return _rng['gen']


def _fans(shape):
    count = int(np.prod(shape)) if shape else 1
    num = shape[0] if shape else 1
    fan_in = count // num if num else 0
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def make_filled(shape, filler, layer=None):
    """A NumPy array of ``shape`` filled as ``filler`` (a FillerParameter, or None = constant 0)."""
    shape = tuple(int(s) for s in shape)
    kind = filler.type if filler is not None else 'constant'
    g = rng()
    if kind == 'constant':
        out = np.full(shape, filler.value if filler is not None else 0.0)
    elif kind == 'uniform':
        out = g.uniform(filler.min, filler.max, shape)
    elif kind == 'gaussian':
        out = g.normal(filler.mean, filler.std, shape)
        if filler.sparse >= 0:
            num_outputs = shape[0] if len(shape) else 1
            p = filler.sparse / float(num_outputs)
            out = out * (g.random(shape) < p)
    elif kind in ('xavier', 'msra'):
        fan_in, fan_out = _fans(shape)
        norm = {0: fan_in, 1: fan_out, 2: (fan_in + fan_out) / 2.0}[filler.variance_norm]
        if kind == 'xavier':
            scale = np.sqrt(3.0 / norm)
            out = g.uniform(-scale, scale, shape)
        else:
            out = g.normal(0.0, np.sqrt(2.0 / norm), shape)
    elif kind == 'bilinear':
        if len(shape) != 4 or shape[2] != shape[3]:
            raise CrfGradError('bilinear filler needs a square 4-D blob, got %s' % (shape,),
                               layer=layer, field='weight_filler')
        k = shape[3]
        f = np.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        idx = np.arange(k)
        w1 = 1 - np.abs(idx / f - c)
        out = np.broadcast_to(w1[:, None] * w1[None, :], shape).copy()
    elif kind == 'positive_unitball':
        out = g.uniform(0, 1, shape)
        num = shape[0] if shape else 1
        flat = out.reshape(num, -1)
        flat /= flat.sum(axis=1, keepdims=True)
        out = flat.reshape(shape)
    else:
        raise CrfGradError('unknown filler type %r' % kind, layer=layer, field='filler.type')
    return out


def fill(blob, filler, layer=None):
    """Fill ``blob.data`` in place."""
    arr = make_filled(blob.shape, filler, layer)
    blob.data = backend.xp().asarray(arr.astype(blob.dtype))
