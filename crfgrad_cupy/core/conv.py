"""2-D convolution (Caffe's cross-correlation), its transpose and their adjoints.

Pure functions over NumPy or CuPy arrays (the module is taken from the inputs).
Layout: images (N, C, H, W); convolution weights (O, C/G, kh, kw) with G groups
(output o ∈ [g·O/G, (g+1)·O/G) sees inputs c ∈ [g·C/G, (g+1)·C/G)).

    y[n, o, i, j] = Σ_{c ∈ grp(o), u, v} W[o, c - c0, u, v] · x[n, c, i·s_h - p_h + u·d_h, j·s_w - p_w + v·d_w]

with zeros outside the image.  The work is one matrix product per group and call
over an im2col matrix (G, C/G·kh·kw, N·Ho·Wo) that is a copy of a strided
window view of the padded input (no Python loop over pixels; the adjoint
"col2im" loops over the kh·kw taps only).

Geometry arguments ``stride``, ``pad``, ``dilation`` are (h, w) pairs.
"""
from .. import backend


def _pair(v):
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv_output_size(size, k, s, p, d):
    """Caffe's convolution output length: floor((size + 2p - (d(k-1)+1)) / s) + 1."""
    ext = d * (k - 1) + 1
    return (size + 2 * p - ext) // s + 1


def deconv_output_size(size, k, s, p, d):
    """Caffe's deconvolution output length: s(size-1) + d(k-1) + 1 - 2p."""
    return s * (size - 1) + d * (k - 1) + 1 - 2 * p


def _as_strided(xp, a, shape, strides):
    if xp.__name__ == 'numpy':
        from numpy.lib.stride_tricks import as_strided
    else:
        from cupy.lib.stride_tricks import as_strided
    return as_strided(a, shape=shape, strides=strides)


def _pad(xp, x, ph, pw):
    if ph == 0 and pw == 0:
        return xp.ascontiguousarray(x)
    n, c, h, w = x.shape
    out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def im2col(x, ksize, stride=1, pad=0, dilation=1, out_size=None):
    """(N, C, H, W) -> (C, kh, kw, N, Ho, Wo) contiguous copy of the (padded) windows:
    ``cols[c, u, v, n, i, j] = x[n, c, i·s_h - p_h + u·d_h, j·s_w - p_w + v·d_w]`` (0 outside).
    Channel-major so that one matrix product per group covers the whole batch.
    ``out_size`` (Ho, Wo) may be given to use only part of the padded input."""
    xp = backend.get_array_module(x)
    kh, kw = _pair(ksize)
    sh, sw = _pair(stride)
    ph, pw = _pair(pad)
    dh, dw = _pair(dilation)
    n, c, h, w = x.shape
    if out_size is None:
        ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    else:
        ho, wo = out_size
    if kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0 and (ho, wo) == (h, w):
        return xp.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(c, 1, 1, n, h, w)
    xpad = _pad(xp, x, ph, pw)
    s0, s1, s2, s3 = xpad.strides
    view = _as_strided(xp, xpad, (c, kh, kw, n, ho, wo),
                       (s1, dh * s2, dw * s3, s0, sh * s2, sw * s3))
    return xp.ascontiguousarray(view)


def col2im(cols, image_size, stride=1, pad=0, dilation=1):
    """Adjoint of :func:`im2col`: (C, kh, kw, N, Ho, Wo) -> (N, C, H, W), summing the
    windows' contributions (entries that fall into the padding are dropped)."""
    xp = backend.get_array_module(cols)
    c, kh, kw, n, ho, wo = cols.shape
    h, w = image_size
    sh, sw = _pair(stride)
    ph, pw = _pair(pad)
    dh, dw = _pair(dilation)
    if kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0 and (ho, wo) == (h, w):
        return xp.ascontiguousarray(cols.reshape(c, n, h, w).transpose(1, 0, 2, 3))
    # padded canvas large enough for every window (the ceil overhang is cut off below)
    hp = max(h + 2 * ph, (ho - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + 2 * pw, (wo - 1) * sw + (kw - 1) * dw + 1)
    out = xp.zeros((n, c, hp, wp), dtype=cols.dtype)
    for u in range(kh):
        hs = u * dh
        for v in range(kw):
            ws = v * dw
            out[:, :, hs:hs + (ho - 1) * sh + 1:sh, ws:ws + (wo - 1) * sw + 1:sw] += \
                cols[:, u, v].transpose(1, 0, 2, 3)
    return out[:, :, ph:ph + h, pw:pw + w]


def _group_weights(w, group):
    o, cg, kh, kw = w.shape
    return w.reshape(group, o // group, cg * kh * kw)


def _to_batch_major(y, n, o, ho, wo):
    """(G, O/G, N·P) -> (N, O, Ho, Wo)."""
    xp = backend.get_array_module(y)
    y = y.reshape(o, n, ho, wo)
    return y.reshape(n, o, ho, wo) if n == 1 else xp.ascontiguousarray(y.transpose(1, 0, 2, 3))


def _to_channel_major(dy, group):
    """(N, O, Ho, Wo) -> (G, O/G, N·P)."""
    xp = backend.get_array_module(dy)
    n, o, ho, wo = dy.shape
    if n > 1:
        dy = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3))
    return dy.reshape(group, o // group, n * ho * wo)


def conv2d(x, w, b=None, stride=1, pad=0, dilation=1, group=1):
    """Convolution forward. x (N, C, H, W), w (O, C/G, kh, kw), b (O,) or None
    -> y (N, O, Ho, Wo), Ho = floor((H + 2p - (d(kh-1)+1))/s) + 1."""
    xp = backend.get_array_module(x, w)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if c != cg * group or o % group:
        raise ValueError('conv2d: x has %d channels, weights %s, group %d' % (c, w.shape, group))
    cols = im2col(x, (kh, kw), stride, pad, dilation)
    ho, wo = cols.shape[4], cols.shape[5]
    cols = cols.reshape(group, cg * kh * kw, n * ho * wo)
    y = _to_batch_major(xp.matmul(_group_weights(w, group), cols), n, o, ho, wo)
    if b is not None:
        y += b.reshape(1, o, 1, 1)
    return y


def conv2d_backward_data(dy, w, x_shape, stride=1, pad=0, dilation=1, group=1):
    """dL/dx of :func:`conv2d`: dy (N, O, Ho, Wo), w (O, C/G, kh, kw) -> (N, C, H, W)."""
    xp = backend.get_array_module(dy, w)
    n, o, ho, wo = dy.shape
    _, cg, kh, kw = w.shape
    wg = _group_weights(w, group)                                        # (G, O/G, CgK)
    dcols = xp.matmul(wg.transpose(0, 2, 1), _to_channel_major(dy, group))  # (G, CgK, N·P)
    dcols = dcols.reshape(cg * group, kh, kw, n, ho, wo)
    return col2im(dcols, x_shape[2:], stride, pad, dilation)


def conv2d_backward_weight(dy, x, w_shape, stride=1, pad=0, dilation=1, group=1):
    """dL/dW of :func:`conv2d`: dy (N, O, Ho, Wo), x (N, C, H, W) -> (O, C/G, kh, kw)."""
    xp = backend.get_array_module(dy, x)
    n, o, ho, wo = dy.shape
    _, cg, kh, kw = w_shape
    cols = im2col(x, (kh, kw), stride, pad, dilation, out_size=(ho, wo))
    cols = cols.reshape(group, cg * kh * kw, n * ho * wo)
    dw = xp.matmul(_to_channel_major(dy, group), cols.transpose(0, 2, 1))   # (G, O/G, CgK)
    return dw.reshape(w_shape)


def conv2d_backward_bias(dy):
    """dL/db of :func:`conv2d`: dy (N, O, Ho, Wo) -> (O,)."""
    return dy.sum(axis=(0, 2, 3))


def deconv2d(x, w, b=None, stride=1, pad=0, dilation=1, group=1, out_size=None):
    """Transposed convolution (Caffe Deconvolution). x (N, C, H, W), w (C, O/G, kh, kw),
    b (O,) or None -> y (N, O, Ho, Wo), Ho = s(H-1) + d(kh-1) + 1 - 2p.
    Equals :func:`conv2d_backward_data` of a convolution from O to C channels."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(pad)
    dh, dw = _pair(dilation)
    if out_size is None:
        out_size = (deconv_output_size(h, kh, sh, ph, dh), deconv_output_size(wd, kw, sw, pw, dw))
    y = conv2d_backward_data(x, w, (n, og * group) + tuple(out_size), stride, pad, dilation, group)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def deconv2d_backward_data(dy, w, stride=1, pad=0, dilation=1, group=1):
    """dL/dx of :func:`deconv2d`: dy (N, O, Ho, Wo), w (C, O/G, kh, kw) -> (N, C, H, W)."""
    return conv2d(dy, w, None, stride, pad, dilation, group)


def deconv2d_backward_weight(dy, x, w_shape, stride=1, pad=0, dilation=1, group=1):
    """dL/dW of :func:`deconv2d`: dy (N, O, Ho, Wo), x (N, C, H, W) -> (C, O/G, kh, kw)."""
    return conv2d_backward_weight(x, dy, w_shape, stride, pad, dilation, group)
