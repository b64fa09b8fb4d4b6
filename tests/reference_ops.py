"""Straightforward float64 references shared by the tests (explicit sums, no tricks)."""
import numpy as np


def brute_conv(q, W):
    """Caffe convolution (cross-correlation, zero pad (k-1)/2, stride 1) by explicit sums over taps.
    q (N, C, H, W), W (O, C, k, k) -> (N, O, H, W)."""
    n, c, h, w = q.shape
    o, _, k, _ = W.shape
    p = k // 2
    qp = np.zeros((n, c, h + 2 * p, w + 2 * p))
    qp[:, :, p:p + h, p:p + w] = q
    out = np.zeros((n, o, h, w))
    for ky in range(k):
        for kx in range(k):
            out += np.einsum('oc,nchw->nohw', W[:, :, ky, kx], qp[:, :, ky:ky + h, kx:kx + w])
    return out


def brute_weight_grad(q, g, k):
    """d<g, brute_conv(q, W)>/dW: (O, C, k, k)."""
    n, c, h, w = q.shape
    p = k // 2
    qp = np.zeros((n, c, h + 2 * p, w + 2 * p))
    qp[:, :, p:p + h, p:p + w] = q
    out = np.zeros((g.shape[1], c, k, k))
    for ky in range(k):
        for kx in range(k):
            out[:, :, ky, kx] = np.einsum('nohw,nchw->oc', g, qp[:, :, ky:ky + h, kx:kx + w])
    return out
