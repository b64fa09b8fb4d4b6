"""crfgrad_cupy: Caffe-compatible CRF-Grad (Larsson et al.) on NumPy and CuPy, with a
pycaffe-style API::

    import crfgrad_cupy as cc
    net = cc.Net('deploy.prototxt', 'weights.caffemodel', cc.TEST)
"""
from . import backend
from .backend import set_mode_cpu, set_mode_gpu, set_device, set_default_dtype  # noqa: F401
from .blob import Blob  # noqa: F401
from .errors import CrfGradError  # noqa: F401

TRAIN = 0
TEST = 1

__version__ = '0.1.0'

backend._init_from_env()


def __getattr__(name):
    # Heavier parts are imported on first use, keeping `import crfgrad_cupy` light.
    if name in ('Net',):
        from .net import Net
        return Net
    if name in ('get_solver', 'SGDSolver', 'NesterovSolver', 'AdaGradSolver', 'RMSPropSolver',
                'AdaDeltaSolver', 'AdamSolver', 'Solver'):
        from . import solver
        return getattr(solver, name)
    raise AttributeError('module crfgrad_cupy has no attribute %r' % name)
