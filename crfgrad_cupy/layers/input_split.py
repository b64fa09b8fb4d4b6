"""Input (net inputs with fixed shapes) and Split (one blob fed to several layers)."""
from .base import Layer, register


@register('Input')
class InputLayer(Layer):
    """Tops get the shapes of ``input_param.shape`` (one per top, or one shared by all)."""
    min_top = 1
    exact_num_bottom = 0

    def layer_setup(self, bottom, top):
        shapes = list(self.param.input_param.shape)
        if len(shapes) not in (0, 1, len(top)):
            raise self.error('input_param.shape must be given once or once per top (%d tops, %d shapes)'
                             % (len(top), len(shapes)), field='input_param.shape')
        for i, t in enumerate(top):
            if shapes:
                t.reshape(*[int(d) for d in shapes[i if len(shapes) > 1 else 0].dim])

    def reshape(self, bottom, top):
        """Inputs keep whatever shape the user gave them."""

    def forward(self, bottom, top):
        """The user writes the input blobs."""


@register('Split')
class SplitLayer(Layer):
    """Every top shares the bottom's data; backward sums the top diffs."""
    exact_num_bottom = 1
    min_top = 1

    def reshape(self, bottom, top):
        for t in top:
            if t is not bottom[0]:
                t.reshape(*bottom[0].shape)
                t.share_data(bottom[0])

    def forward(self, bottom, top):
        for t in top:
            if t is not bottom[0]:
                t.share_data(bottom[0])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if len(top) == 1:
            if top[0] is not bottom[0]:
                bottom[0].diff[...] = top[0].diff
            return
        acc = top[0].diff + top[1].diff
        for t in top[2:]:
            acc += t.diff
        bottom[0].diff[...] = acc
