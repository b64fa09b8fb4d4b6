"""Array-module choice (NumPy or CuPy), device moves and dtype policy.

CuPy is imported lazily, only when the GPU is asked for, so ``import crfgrad_cupy``
never needs it.  Every numeric function takes its array module from its inputs
with :func:`get_array_module`, so the same code runs on NumPy and CuPy.
"""
import os

import numpy as np

from .errors import CrfGradError

_state = {'mode': 'cpu', 'device': 0, 'dtype': np.float32}
_cupy = None


def _import_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: F401
        except Exception as exc:  # ImportError, or a broken CUDA install
            raise CrfGradError('GPU mode needs CuPy (pip install crfgrad_cupy[gpu]); '
                               'importing cupy failed: %s' % exc)
        _cupy = cupy
    return _cupy


def cupy_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = _import_cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def set_mode_cpu():
    _state['mode'] = 'cpu'


def set_mode_gpu():
    cp = _import_cupy()
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise CrfGradError('GPU mode asked for but no CUDA device is usable: %s' % exc)
    if count < 1:
        raise CrfGradError('GPU mode asked for but no CUDA device was found')
    if _state['device'] >= count:
        raise CrfGradError('GPU device %d asked for but only %d found' % (_state['device'], count))
    cp.cuda.Device(_state['device']).use()
    _state['mode'] = 'gpu'


def set_device(device_id):
    _state['device'] = int(device_id)
    if _state['mode'] == 'gpu':
        set_mode_gpu()


def mode():
    return _state['mode']


def xp():
    """The array module of the current mode (numpy or cupy)."""
    return _import_cupy() if _state['mode'] == 'gpu' else np


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the arrays (numpy for plain Python values)."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith('cupy'):
            return _import_cupy()
    return np


def is_gpu_array(a):
    return type(a).__module__.startswith('cupy')


def to_numpy(a):
    """A NumPy copy/view of ``a`` (no-op for NumPy arrays)."""
    if is_gpu_array(a):
        return a.get()
    return np.asarray(a)


def to_device(a, dtype=None):
    """``a`` as an array of the current mode's module."""
    mod = xp()
    out = mod.asarray(a) if mod is np or not isinstance(a, np.ndarray) else mod.asarray(a)
    if dtype is not None:
        out = out.astype(dtype, copy=False)
    return out


def default_dtype():
    return _state['dtype']


def set_default_dtype(dtype):
    """float32 (default, as Caffe) or float64 (gradient checks)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise CrfGradError('dtype must be float32 or float64, got %s' % dtype)
    _state['dtype'] = dtype.type


class dtype_scope:
    """Context manager: ``with dtype_scope(np.float64): ...``."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = _state['dtype']
        set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        _state['dtype'] = self.old


def _init_from_env():
    dev = os.environ.get('CRFGRAD_DEVICE', '').strip().lower()
    if not dev or dev == 'cpu':
        return
    if dev.startswith('gpu') or dev.startswith('cuda') or dev.isdigit():
        num = ''.join(ch for ch in dev if ch.isdigit())
        if num:
            _state['device'] = int(num)
        set_mode_gpu()
    else:
        raise CrfGradError('CRFGRAD_DEVICE must be cpu, gpu or gpu:N, got %r' % dev)
