"""Loading the reference cases of ../shared/oracle (computed by the authors' Caffe)."""
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get('CRFGRAD_SHARED', os.path.normpath(os.path.join(HERE, os.pardir, os.pardir, 'shared')))
ORACLE = os.path.join(SHARED, 'oracle')
DATA = os.path.join(SHARED, 'data')


def manifest():
    with open(os.path.join(ORACLE, 'MANIFEST.json')) as f:
        return json.load(f)


def cases(prefix=None, layer_type=None):
    """Manifest entries, filtered by name prefix or by a layer type they use."""
    out = []
    for c in manifest()['cases']:
        if prefix and not c['name'].startswith(prefix):
            continue
        if layer_type and layer_type not in c['layer_types']:
            continue
        out.append(c)
    return out


def case_names(prefix=None, layer_type=None):
    if not os.path.isdir(ORACLE):
        return []
    return [c['name'] for c in cases(prefix, layer_type)]


def case(name):
    for c in manifest()['cases']:
        if c['name'] == name:
            return c
    raise KeyError(name)


def path(rel):
    return os.path.join(ORACLE, rel)


def load_npz(name):
    c = case(name)
    z = np.load(path(c['files']['npz']))  # our own reference data: no pickle
    return {k: z[k] for k in z.files}


def split_keys(arrays):
    """Group npz keys: {'input': {blob: a}, 'param': {layer: {i: a}}, 'output': ..., ...}."""
    out = {'input': {}, 'param': {}, 'output': {}, 'top_diff': {}, 'bottom_diff': {}, 'diff': {},
           'param_diff': {}}
    for k, v in arrays.items():
        kind, rest = k.split('/', 1)
        if kind in ('param', 'param_diff'):
            layer, i = rest.rsplit('/', 1)
            out[kind].setdefault(layer, {})[int(i)] = v
        else:
            out[kind][rest] = v
    return out


def assert_close(actual, expected, rtol=1e-4, atol=1e-5, what=''):
    """max|a-b| <= rtol*max|ref| + atol, as the oracle README suggests."""
    from crfgrad_cupy.backend import to_numpy
    actual = np.asarray(to_numpy(actual), dtype=np.float64)
    expected = np.asarray(to_numpy(expected), dtype=np.float64)
    if actual.size == expected.size and actual.ndim <= 1 and expected.ndim <= 1:
        actual = actual.reshape(expected.shape)   # Caffe's scalar loss blobs are stored as (1,)
    assert actual.shape == expected.shape, '%s: shape %s != %s' % (what, actual.shape, expected.shape)
    err = np.max(np.abs(actual - expected)) if actual.size else 0.0
    tol = rtol * (np.max(np.abs(expected)) if expected.size else 0.0) + atol
    assert err <= tol, '%s: max abs err %.3g > tol %.3g (max|ref| %.3g)' % (
        what, err, tol, np.max(np.abs(expected)) if expected.size else 0)


def prototxt_with_quirks(text, quirks):
    """Add `reproduce_caffe_quirks: true` to every crfgrad_param block of a prototxt."""
    if not quirks:
        return text
    return text.replace('crfgrad_param {', 'crfgrad_param { reproduce_caffe_quirks: true ')


def build_case_net(name, quirks=False, dtype=None, weights=None):
    """The case's net, with its inputs and parameters set; returns (net, grouped arrays)."""
    import crfgrad_cupy as cc
    from crfgrad_cupy import backend
    c = case(name)
    text = open(path(c['files']['prototxt'])).read()
    text = prototxt_with_quirks(text, quirks)
    arrays = split_keys(load_npz(name))
    net = cc.Net(text, cc.TRAIN if c.get('phase') == 'TRAIN' else cc.TEST, weights=weights)
    xp = backend.xp()
    for blob, a in arrays['input'].items():
        net.blobs[blob].reshape(*a.shape)
        net.blobs[blob].data[...] = xp.asarray(a)
    if weights is None:
        for layer, blobs in arrays['param'].items():
            for i, a in blobs.items():
                target = net.params[layer][i]
                assert target.shape == a.shape, '%s/%d: %s vs %s' % (layer, i, target.shape, a.shape)
                target.data[...] = xp.asarray(a)
    net.reshape()
    return net, arrays


def check_case(name, quirks=False, rtol=1e-4, atol=1e-5, skip=(), weights=None):
    """Run one oracle case end to end and compare everything it stores.

    ``skip``: keys (e.g. 'param_diff/crf/2') not compared. Returns the dict of max relative
    errors per key, for reports."""
    from crfgrad_cupy import backend
    net, arrays = build_case_net(name, quirks=quirks, weights=weights)
    errors = {}

    def cmp(actual, expected, key):
        if key in skip:
            return
        a = backend.to_numpy(actual)
        assert_close(a, expected, rtol=rtol, atol=atol, what='%s %s' % (name, key))
        ref = np.max(np.abs(expected)) if expected.size else 0
        errors[key] = float(np.max(np.abs(a - expected)) / ref) if ref else 0.0

    net.forward()
    for blob, ref in arrays['output'].items():
        cmp(net.blobs[blob].data, ref, 'output/' + blob)
    c = case(name)
    if not c.get('backward', True) or not arrays['top_diff']:
        return errors
    for blob, g in arrays['top_diff'].items():
        net.blobs[blob].diff[...] = backend.xp().asarray(g)
    net.backward()
    for blob, ref in arrays['bottom_diff'].items():
        cmp(net.blobs[blob].diff, ref, 'bottom_diff/' + blob)
    for blob, ref in arrays['diff'].items():
        cmp(net.blobs[blob].diff, ref, 'diff/' + blob)
    for layer, blobs in arrays['param_diff'].items():
        for i, ref in blobs.items():
            cmp(net.params[layer][i].diff, ref, 'param_diff/%s/%d' % (layer, i))
    return errors
