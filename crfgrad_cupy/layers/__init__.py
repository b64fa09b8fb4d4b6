"""Caffe layer types, registered by type name (see :mod:`.base`)."""
from .base import Layer, create_layer, layer_class, layer_types, register  # noqa: F401
