"""Convolution and Deconvolution layers (Caffe's, 2-D, axis 1), on :mod:`crfgrad_cupy.core.conv`."""
from ..core import conv as C
from .base import Layer, register


def _geometry(layer, p):
    """(kernel, stride, pad, dilation) as (h, w) pairs from a ConvolutionParameter, with
    Caffe's rules: repeated form (1 value = both dims, or one per dim) or the *_h/*_w form."""
    def repeated(name, values, default):
        values = [int(v) for v in values]
        if not values:
            return (default, default)
        if len(values) == 1:
            return (values[0], values[0])
        if len(values) == 2:
            return (values[0], values[1])
        raise layer.error('%s must be given 1 or 2 times for 2-D convolution, got %d values'
                          % (name, len(values)), field='convolution_param.' + name)

    if p.HasField('kernel_h') or p.HasField('kernel_w'):
        if len(p.kernel_size):
            raise layer.error('either kernel_size or kernel_h/kernel_w may be given, not both',
                              field='convolution_param.kernel_size')
        if not (p.HasField('kernel_h') and p.HasField('kernel_w')):
            raise layer.error('kernel_h and kernel_w must both be given',
                              field='convolution_param.kernel_h')
        kernel = (int(p.kernel_h), int(p.kernel_w))
    else:
        if not len(p.kernel_size):
            raise layer.error('kernel_size (or kernel_h and kernel_w) must be given',
                              field='convolution_param.kernel_size')
        kernel = repeated('kernel_size', p.kernel_size, 0)
    if p.HasField('stride_h') or p.HasField('stride_w'):
        if len(p.stride):
            raise layer.error('either stride or stride_h/stride_w may be given, not both',
                              field='convolution_param.stride')
        stride = (int(p.stride_h), int(p.stride_w))
    else:
        stride = repeated('stride', p.stride, 1)
    if p.HasField('pad_h') or p.HasField('pad_w'):
        if len(p.pad):
            raise layer.error('either pad or pad_h/pad_w may be given, not both',
                              field='convolution_param.pad')
        pad = (int(p.pad_h), int(p.pad_w))
    else:
        pad = repeated('pad', p.pad, 0)
    dilation = repeated('dilation', p.dilation, 1)
    for name, val in (('kernel_size', kernel), ('stride', stride), ('dilation', dilation)):
        if min(val) <= 0:
            raise layer.error('%s must be positive, got %s' % (name, val), field='convolution_param.' + name)
    if min(pad) < 0:
        raise layer.error('pad must be non-negative, got %s' % (pad,), field='convolution_param.pad')
    return kernel, stride, pad, dilation


class _BaseConvolution(Layer):
    exact_num_bottom = None
    min_bottom = 1
    min_top = 1
    equal_num_bottom_top = True
    transposed = False

    def layer_setup(self, bottom, top):
        if not self.param.HasField('convolution_param'):
            raise self.error('convolution_param with num_output and kernel_size is required',
                             field='convolution_param')
        p = self.param.convolution_param
        shape = bottom[0].shape
        axis = int(p.axis)
        if axis not in (1, -3) or len(shape) != 4:
            raise self.error('only 2-D convolution over 4-D (N, C, H, W) bottoms with axis 1 is '
                             'supported (bottom shape %s, axis %d)' % (shape, axis),
                             field='convolution_param.axis')
        self.kernel, self.stride, self.pad, self.dilation = _geometry(self, p)
        if not p.HasField('num_output') or p.num_output <= 0:
            raise self.error('num_output must be given and positive', field='convolution_param.num_output')
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        self.channels = int(shape[1])
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise self.error('group %d must divide the input channels (%d) and num_output (%d)'
                             % (self.group, self.channels, self.num_output), field='convolution_param.group')
        self.bias_term = bool(p.bias_term)
        kh, kw = self.kernel
        if self.transposed:
            wshape = (self.channels, self.num_output // self.group, kh, kw)
        else:
            wshape = (self.num_output, self.channels // self.group, kh, kw)
        if self.blobs:
            want = 2 if self.bias_term else 1
            if len(self.blobs) != want:
                raise self.error('expected %d parameter blobs (weights%s), got %d'
                                 % (want, ', bias' if self.bias_term else '', len(self.blobs)), field='blobs')
            if self.blobs[0].shape != wshape:
                raise self.error('weight blob has shape %s, expected %s' % (self.blobs[0].shape, wshape),
                                 field='blobs')
            if self.bias_term:
                if self.blobs[1].count != self.num_output:
                    raise self.error('bias blob has shape %s, expected (%d,)'
                                     % (self.blobs[1].shape, self.num_output), field='blobs')
                if self.blobs[1].shape != (self.num_output,):
                    self.blobs[1].reshape(self.num_output)
            return
        self.blobs = [self.filled_blob(wshape, p, 'weight_filler')]
        if self.bias_term:
            self.blobs.append(self.filled_blob((self.num_output,), p, 'bias_filler'))

    def _out_size(self, h, w):
        f = C.deconv_output_size if self.transposed else C.conv_output_size
        return (f(h, self.kernel[0], self.stride[0], self.pad[0], self.dilation[0]),
                f(w, self.kernel[1], self.stride[1], self.pad[1], self.dilation[1]))

    def reshape(self, bottom, top):
        first = bottom[0].shape
        for i, b in enumerate(bottom):
            if len(b.shape) != 4 or b.shape[1] != self.channels:
                raise self.error('bottom %d has shape %s; expected 4-D with %d channels'
                                 % (i, b.shape, self.channels), field='bottom')
            if b.shape != first:
                raise self.error('all bottoms must have the same shape (%s vs %s)' % (b.shape, first),
                                 field='bottom')
        ho, wo = self._out_size(first[2], first[3])
        if ho <= 0 or wo <= 0:
            raise self.error('output size %dx%d is not positive for input %dx%d'
                             % (ho, wo, first[2], first[3]), field='convolution_param')
        for t in top:
            t.reshape(first[0], self.num_output, ho, wo)

    def _geo(self):
        return dict(stride=self.stride, pad=self.pad, dilation=self.dilation, group=self.group)

    def forward(self, bottom, top):
        w = self.blobs[0].data
        b = self.blobs[1].data if self.bias_term else None
        for bt, tp in zip(bottom, top):
            if self.transposed:
                y = C.deconv2d(bt.data, w, b, out_size=tp.shape[2:], **self._geo())
            else:
                y = C.conv2d(bt.data, w, b, **self._geo())
            tp.data[...] = y

    def backward(self, top, propagate_down, bottom):
        w = self.blobs[0].data
        for i, (tp, bt) in enumerate(zip(top, bottom)):
            dy = tp.diff
            if self.bias_term and self.param_propagate_down[1]:
                self.blobs[1].diff += C.conv2d_backward_bias(dy)
            if self.param_propagate_down[0]:
                if self.transposed:
                    dw = C.deconv2d_backward_weight(dy, bt.data, w.shape, **self._geo())
                else:
                    dw = C.conv2d_backward_weight(dy, bt.data, w.shape, **self._geo())
                self.blobs[0].diff += dw
            if propagate_down[i]:
                if self.transposed:
                    dx = C.deconv2d_backward_data(dy, w, **self._geo())
                else:
                    dx = C.conv2d_backward_data(dy, w, bt.shape, **self._geo())
                bt.diff[...] = dx


@register('Convolution')
class ConvolutionLayer(_BaseConvolution):
    """Caffe Convolution: bottom (N, C, H, W) -> top (N, num_output, Ho, Wo),
    Ho = floor((H + 2p - (dil(k-1)+1))/s) + 1; weights (num_output, C/group, kh, kw),
    bias (num_output,). Several bottoms are convolved independently into as many tops."""


@register('Deconvolution')
class DeconvolutionLayer(_BaseConvolution):
    """Caffe Deconvolution (transposed convolution): (N, C, H, W) -> (N, num_output, Ho, Wo),
    Ho = s(H-1) + dil(k-1) + 1 - 2p; weights (C, num_output/group, kh, kw), bias (num_output,)."""
    transposed = True
