"""Layer base class and the registry of layer types by their Caffe type name.

Lifecycle as in Caffe: ``setup(bottom, top)`` (checks the blob counts, then
``layer_setup`` creates ``self.blobs`` unless they were given, then ``reshape``),
``reshape(bottom, top)``, ``forward(bottom, top)``, ``backward(top, propagate_down, bottom)``.
``bottom`` and ``top`` are lists of :class:`~crfgrad_cupy.blob.Blob`.

Rules every layer follows (they are Caffe's):
- ``forward`` writes ``top[i].data``; ``backward`` OVERWRITES ``bottom[i].diff`` for
  each ``i`` with ``propagate_down[i]`` true, and ACCUMULATES (+=) parameter diffs
  into ``self.blobs[j].diff`` when ``self.param_propagate_down[j]`` is true.
- In-place use (a top that is also a bottom) must work.
- Array module: ``self.xp`` (NumPy or CuPy); never import cupy directly.
"""
from .. import backend
from ..blob import Blob
from ..errors import CrfGradError

_REGISTRY = {}


def register(*type_names):
    """Class decorator: ``@register('Convolution')`` (several names allowed)."""
    def deco(cls):
        for name in type_names:
            _REGISTRY[name] = cls
        if cls.type is None:
            cls.type = type_names[0]
        return cls
    return deco


def layer_class(type_name):
    _ensure_loaded()
    return _REGISTRY.get(type_name)


def layer_types():
    _ensure_loaded()
    return sorted(_REGISTRY)


def create_layer(param, phase, source=None):
    """Instantiate the layer for a LayerParameter; unknown types are a CrfGradError."""
    _ensure_loaded()
    cls = _REGISTRY.get(param.type)
    if cls is None:
        raise CrfGradError('unknown layer type %r (known: %s)' % (param.type, ', '.join(sorted(_REGISTRY))),
                           file=source, layer=param.name, field='type')
    return cls(param, phase)


def _ensure_loaded():
    from . import _load_all  # noqa: F401  (imports every layer module once)


class Layer:
    type = None
    # blob-count constraints (None: unchecked)
    exact_num_bottom = None
    min_bottom = None
    max_bottom = None
    exact_num_top = None
    min_top = None
    max_top = None
    equal_num_bottom_top = False
    auto_top_blobs = False
    is_loss = False          # default loss weight 1 on top 0 (Caffe: type name ends in "Loss")

    def __init__(self, param, phase):
        self.param = param
        self.name = param.name
        self.phase = phase
        self.blobs = []
        self.param_propagate_down = []
        self.loss_weights = []

    # --- helpers ---------------------------------------------------------------
    @property
    def xp(self):
        return backend.xp()

    @property
    def dtype(self):
        return backend.default_dtype()

    def error(self, message, field=None):
        return CrfGradError(message, layer=self.name, field=field)

    def make_blob(self, shape):
        return Blob(shape)

    def filled_blob(self, shape, message, field):
        """A new parameter Blob of ``shape`` filled by the FillerParameter ``message.<field>``
        (zeros when the field is unset, as Caffe's default constant filler)."""
        from .fillers import fill
        blob = self.make_blob(shape)
        fill(blob, getattr(message, field) if message.HasField(field) else None, layer=self.name)
        return blob

    def allow_force_backward(self, bottom_index):
        return True

    def blobs_given(self):
        """True when the parameter blobs came from the LayerParameter / a weights file."""
        return len(self.blobs) > 0

    # --- lifecycle ---------------------------------------------------------------
    def check_blob_counts(self, bottom, top):
        nb, nt = len(bottom), len(top)

        def bad(what, want):
            return self.error('needs %s %s blob(s), got %d' % (want, what, nb if what == 'bottom' else nt),
                              field=what)
        if self.exact_num_bottom is not None and nb != self.exact_num_bottom:
            raise bad('bottom', 'exactly %d' % self.exact_num_bottom)
        if self.min_bottom is not None and nb < self.min_bottom:
            raise bad('bottom', 'at least %d' % self.min_bottom)
        if self.max_bottom is not None and nb > self.max_bottom:
            raise bad('bottom', 'at most %d' % self.max_bottom)
        if self.exact_num_top is not None and nt != self.exact_num_top:
            raise bad('top', 'exactly %d' % self.exact_num_top)
        if self.min_top is not None and nt < self.min_top:
            raise bad('top', 'at least %d' % self.min_top)
        if self.max_top is not None and nt > self.max_top:
            raise bad('top', 'at most %d' % self.max_top)
        if self.equal_num_bottom_top and nb != nt:
            raise self.error('needs as many tops as bottoms (%d vs %d)' % (nt, nb), field='top')

    def setup(self, bottom, top):
        self.check_blob_counts(bottom, top)
        self.layer_setup(bottom, top)
        if len(self.param_propagate_down) != len(self.blobs):
            self.param_propagate_down = [True] * len(self.blobs)
        self.reshape(bottom, top)
        self._set_loss_weights(top)

    def layer_setup(self, bottom, top):
        """Read parameters, create ``self.blobs`` (if empty). Default: nothing."""

    def reshape(self, bottom, top):
        raise TypeError('layer class %s defines no reshape' % type(self).__name__)

    def forward(self, bottom, top):
        raise TypeError('layer class %s defines no forward' % type(self).__name__)

    def backward(self, top, propagate_down, bottom):
        """Default: the layer has no gradient (data layers, Accuracy, ...)."""

    def _set_loss_weights(self, top):
        weights = list(self.param.loss_weight)
        if not weights and self.is_loss:
            weights = [1.0] + [0.0] * (len(top) - 1)
        weights += [0.0] * (len(top) - len(weights))
        self.loss_weights = weights[:len(top)]
        for t, w in zip(top, self.loss_weights):
            if w != 0:
                t.diff[...] = w
