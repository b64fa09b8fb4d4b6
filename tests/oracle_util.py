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
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, '%s: shape %s != %s' % (what, actual.shape, expected.shape)
    err = np.max(np.abs(actual - expected)) if actual.size else 0.0
    tol = rtol * (np.max(np.abs(expected)) if expected.size else 0.0) + atol
    assert err <= tol, '%s: max abs err %.3g > tol %.3g (max|ref| %.3g)' % (
        what, err, tol, np.max(np.abs(expected)) if expected.size else 0)
