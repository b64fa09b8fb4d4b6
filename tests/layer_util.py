"""Building one layer on bottoms that hold given arrays (for the layer unit tests)."""
import numpy as np
from google.protobuf import text_format

from crfgrad_cupy.blob import Blob
from crfgrad_cupy.layers.base import create_layer
from crfgrad_cupy.proto import caffe_pb2


def make_layer(text, arrays, n_top=1, phase=caffe_pb2.TEST, inplace=False):
    """Build and set up a layer (LayerParameter text) on bottoms holding ``arrays``;
    returns (layer, bottoms, tops).  ``inplace``: the top is bottom 0."""
    lp = caffe_pb2.LayerParameter()
    text_format.Merge(text, lp)
    lp.name = lp.name or 'L'
    layer = create_layer(lp, phase)
    bottoms = []
    for a in arrays:
        b = Blob(np.shape(a))
        b.data = np.asarray(a)
        bottoms.append(b)
    tops = [bottoms[0]] if inplace else [Blob(()) for _ in range(n_top)]
    layer.setup(bottoms, tops)
    return layer, bottoms, tops
