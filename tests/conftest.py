import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import oracle_util  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_float32():
    """Every test starts in CPU mode, float32, with a fixed filler seed."""
    from crfgrad_cupy import backend
    from crfgrad_cupy.layers import fillers
    if os.environ.get('CRFGRAD_TEST_DEVICE', 'cpu') == 'gpu':
        backend.set_mode_gpu()      # tools/gpu_check.py runs the oracle subset on CuPy this way
    else:
        backend.set_mode_cpu()
    backend.set_default_dtype(np.float32)
    fillers.set_random_seed(0)
    yield
    backend.set_mode_cpu()
    backend.set_default_dtype(np.float32)


@pytest.fixture
def shared_dir():
    if not os.path.isdir(oracle_util.SHARED):
        pytest.skip('../shared is not present')
    return oracle_util.SHARED
