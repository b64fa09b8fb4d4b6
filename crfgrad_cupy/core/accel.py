"""The optional compiled CPU kernels (numba), chosen automatically.

:func:`kernels` returns the module :mod:`crfgrad_cupy.core._cpu_kernels` when the arrays
live on the CPU (NumPy), numba imports, and the environment variable ``CRFGRAD_NO_NUMBA``
is unset (or 0/false/no); otherwise None, and the callers use their vectorised NumPy/CuPy
code (the reference).  numba is imported here lazily, on the first call, never when the
package is imported.  The variable is read at every call, so it can be switched at run time.
"""
import os

_state = {'tried': False, 'module': None, 'error': None}


def enabled():
    """False when CRFGRAD_NO_NUMBA asks for the NumPy path."""
    return os.environ.get('CRFGRAD_NO_NUMBA', '').strip().lower() in ('', '0', 'false', 'no', 'off')


def available():
    """True when the compiled kernels import (numba installed and working).

    Before the first import, OMP_WAIT_POLICY defaults to PASSIVE (unless set): the kernels are
    many short parallel loops, and OpenMP threads that spin between them slow everything down
    (here by up to 1.5x) when other processes share the cores."""
    if not _state['tried']:
        _state['tried'] = True
        os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
        try:
            from . import _cpu_kernels
            _state['module'] = _cpu_kernels
        except Exception as exc:  # ImportError, or a numba that does not fit this NumPy
            _state['error'] = exc
    return _state['module'] is not None


def kernels(xp=None):
    """The compiled kernel module for arrays of ``xp`` (None: NumPy assumed), or None."""
    if xp is not None and getattr(xp, '__name__', '') != 'numpy':
        return None
    if not enabled() or not available():
        return None
    return _state['module']


_POOL = {}


def in_parallel(xp, n, fn, min_chunk=256):
    """fn(lo, hi) over a split of range(n): for NumPy arrays in one thread per CPU core (for work
    that releases the GIL but runs single-threaded: copies, sorts, batched small matrix products),
    else in one call."""
    workers = os.cpu_count() or 1
    if getattr(xp, '__name__', '') != 'numpy' or workers < 2 or n < 2 * min_chunk:
        fn(0, n)
        return
    if 'pool' not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL['pool'] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix='crfgrad')
    step = -(-n // workers)
    futures = [_POOL['pool'].submit(fn, lo, min(n, lo + step)) for lo in range(0, n, step)]
    for f in futures:
        f.result()
