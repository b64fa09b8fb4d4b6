"""Blob: a named array pair (data, diff) as in Caffe/pycaffe."""
import numpy as np

from . import backend


class Blob:
    """``data`` and ``diff`` are arrays of the current array module (NumPy or CuPy),
    shape N×C×H×W for images (any rank is allowed), dtype float32 by default."""

    def __init__(self, shape=(), dtype=None, xp=None):
        self._xp = xp or backend.xp()
        self._dtype = dtype or backend.default_dtype()
        self._shape = tuple(int(s) for s in shape)
        self._data = self._xp.zeros(self._shape, self._dtype)
        self._diff = None

    @property
    def xp(self):
        return self._xp

    @property
    def dtype(self):
        return self._dtype

    @property
    def shape(self):
        return self._shape

    @property
    def count(self):
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def num(self):
        return self._shape[0] if len(self._shape) > 0 else 1

    @property
    def channels(self):
        return self._shape[1] if len(self._shape) > 1 else 1

    @property
    def height(self):
        return self._shape[2] if len(self._shape) > 2 else 1

    @property
    def width(self):
        return self._shape[3] if len(self._shape) > 3 else 1

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        value = self._xp.asarray(value, dtype=self._dtype)
        if value.shape != self._shape:
            self._shape = tuple(value.shape)
            self._diff = None
        self._data = value

    @property
    def diff(self):
        if self._diff is None or self._diff.shape != self._shape:
            self._diff = self._xp.zeros(self._shape, self._dtype)
        return self._diff

    @diff.setter
    def diff(self, value):
        value = self._xp.asarray(value, dtype=self._dtype)
        if value.shape != self._shape:
            raise ValueError('diff shape %s does not match blob shape %s' % (value.shape, self._shape))
        self._diff = value

    def reshape(self, *shape):
        """Change the shape; contents are kept when the count is unchanged, else zeroed."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError('negative blob dimension in %s' % (shape,))
        if shape == self._shape:
            return
        if int(np.prod(shape, dtype=np.int64)) == self.count:
            self._data = self._data.reshape(shape)
            if self._diff is not None:
                self._diff = self._diff.reshape(shape)
        else:
            self._data = self._xp.zeros(shape, self._dtype)
            self._diff = None
        self._shape = shape

    def share_data(self, other):
        """Use ``other``'s data array (Caffe ShareData; for in-place layers and param sharing)."""
        self._data = other._data
        self._shape = other._shape

    def zero_diff(self):
        if self._diff is not None:
            self._diff[...] = 0

    def __repr__(self):
        return 'Blob(shape=%s, dtype=%s)' % (self._shape, np.dtype(self._dtype).name)
