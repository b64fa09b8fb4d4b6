"""MatConvNet models (SimpleNN and DagNN, MAT v5/v7/v7.3) -> Caffe prototxt + caffemodel.

    conv = matconvnet_to_caffe('net.mat')          # a ConvertedNet
    conv.save('out/net')                           # out/net.prototxt + out/net.caffemodel
    net = Net('out/net.prototxt', 'out/net.caffemodel', TEST)

The Caffe net's first input is the MatConvNet input and its last output the network output,
both N x C x H x W (MatConvNet's H x W x C x N data ``x`` maps to ``x.transpose(3, 2, 0, 1)``).
Channel order is kept as stored (MatConvNet nets usually take RGB; no BGR flip is made).
Training-loss layers (softmaxloss, loss, dagnn.Loss, custom ``*loss*`` blocks) are dropped.

How MatConvNet semantics become Caffe layers (see reference/matlab-conventions.md §3):

* conv: filters FH x FW x FC x K -> Caffe (K, FC, FH, FW); groups = C_in / FC.  An
  asymmetric pad [T B L R] becomes Caffe's symmetric pad max(T, B) with the filter extended
  by |B - T| / dilate zero rows (before the taps when B > T, after when T > B), which gives
  the same outputs and MatConvNet's floor output size.  If the difference is not a multiple
  of the dilation, the conv is computed with a larger pad and cropped (see pool).
* convt: vl_nnconvt filters FH x FW x K x FD -> Deconvolution (FD, K, FH, FW), stride =
  upsample, group = numGroups; crop [T B L R] -> pad max(T, B) with the filter extended by
  |B - T| zero rows (before when B > T), exact for every input size.
* pool: Caffe pools with ceil-rounded sizes and symmetric pad.  Per axis with MatConvNet
  pad (T, B), stride s: Caffe pad P = T + m s with m = max(0, ceil((B - T - s + 1) / s)) puts
  a Caffe window on every MatConvNet window (shifted by m) and covers all of them.  When the
  Caffe output can be larger (unless m = 0 and B = T + s - 1), a Crop (offset m) takes the
  MatConvNet windows; its size reference is a zero Convolution (1 output, no bias) of the
  pool's input whose floor size formula equals MatConvNet's.  Max pooling ignores padding in
  both.  Average pooling with P > 0 is corrected to MatConvNet's "in-image pixels only"
  divisor: avg_caffe(x) * 1 / avg_caffe(ones) (Power, Pooling, Power^-1, Eltwise PROD).
* bnorm: BatchNorm (use_global_stats, mean = mu, var = sigma^2 - eps, scale factor 1) and an
  in-place Scale (G, B) with bias.  (If some sigma^2 < eps the BatchNorm eps is lowered.)
* relu (leak -> negative_slope), sigmoid, softmax (axis 1), dropout (rate), normalize/LRN
  (odd N: local_size N, alpha = N * alpha_mcn, beta, k = kappa), concat (dim 3 -> axis 1),
  sum (Eltwise SUM), crop (dagnn.Crop -> Crop axis 2, offset = crop; MatConvNet clamps the
  offset to the size difference, Caffe does not), scale (channel-wise dagnn.Scale).

Anything else (e.g. custom non-loss layers) is refused with a CrfGradError naming the layer.
"""
import collections
import os

import numpy as np

from ..errors import CrfGradError
from ..proto import caffe_pb2
from .matfile import StructArray, as_list, load_mat

# canonical layer types of the intermediate form
_ELEMENTWISE = ('relu', 'sigmoid', 'softmax', 'dropout', 'bnorm', 'lrn', 'scale')

_SIMPLENN_TYPES = {
    'conv': 'conv', 'convt': 'convt', 'pool': 'pool', 'relu': 'relu', 'sigmoid': 'sigmoid',
    'softmax': 'softmax', 'dropout': 'dropout', 'bnorm': 'bnorm', 'normalize': 'lrn',
    'lrn': 'lrn', 'softmaxloss': 'loss', 'loss': 'loss', 'pdist': 'loss',
}
_DAGNN_TYPES = {
    'dagnn.Conv': 'conv', 'dagnn.ConvTranspose': 'convt', 'dagnn.Pooling': 'pool',
    'dagnn.ReLU': 'relu', 'dagnn.Sigmoid': 'sigmoid', 'dagnn.SoftMax': 'softmax',
    'dagnn.DropOut': 'dropout', 'dagnn.BatchNorm': 'bnorm', 'dagnn.LRN': 'lrn',
    'dagnn.Concat': 'concat', 'dagnn.Sum': 'sum', 'dagnn.Crop': 'crop', 'dagnn.Scale': 'scale',
    'dagnn.Loss': 'loss', 'dagnn.PDist': 'loss',
}


# ============================================================================= reading

class MCNLayer:
    """One MatConvNet layer in a wrapper-independent form."""

    def __init__(self, name, type, mcn_type, inputs, outputs, params, attrs, index):
        self.name = name
        self.type = type            # canonical: conv, convt, pool, relu, ... loss
        self.mcn_type = mcn_type    # as stored ('conv', 'dagnn.Conv', ...)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.params = list(params)  # arrays (MATLAB shapes) or None where absent
        self.attrs = attrs
        self.index = index

    def __repr__(self):
        return 'MCNLayer(%r, %r, %s -> %s)' % (self.name, self.type, self.inputs, self.outputs)


class MCNModel:
    """A MatConvNet network: ``kind`` 'simplenn' or 'dagnn', layers, ordered var names, meta."""

    def __init__(self, kind, layers, var_names, meta, source):
        self.kind = kind
        self.layers = layers
        self.var_names = var_names
        self.meta = meta if isinstance(meta, dict) else {}
        self.source = source


def _err(model_source, layer, msg, field=None):
    return CrfGradError(msg, file=model_source, layer=layer, field=field)


def _text(value, default=''):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, np.ndarray) and value.size == 0:
        return default
    return default if value is None else str(value)


def _vec(value, source, layer, field, allowed, default=None):
    """A MATLAB numeric hyper-parameter as a list of floats whose length is in ``allowed``."""
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        if default is None:
            raise _err(source, layer, '%s is missing' % field, field)
        return list(default)
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise _err(source, layer, '%s must be numeric, got %r' % (field, value), field) from None
    if arr.size not in allowed:
        raise _err(source, layer, '%s must have %s elements, got %d'
                   % (field, ' or '.join(map(str, allowed)), arr.size), field)
    return arr.tolist()


def _ints(values, source, layer, field, minimum=0):
    out = []
    for v in values:
        if v != int(v) or v < minimum:
            raise _err(source, layer, '%s must hold integers >= %d, got %s' % (field, minimum, values),
                       field)
        out.append(int(v))
    return out


def _pad4(value, source, layer, field='pad'):
    v = _vec(value, source, layer, field, (1, 2, 4), default=[0])
    if len(v) == 1:
        v = v * 4
    elif len(v) == 2:
        v = [v[0], v[0], v[1], v[1]]
    return _ints(v, source, layer, field, 0)


def _pair(value, source, layer, field, default=1, minimum=1):
    v = _vec(value, source, layer, field, (1, 2), default=[default])
    if len(v) == 1:
        v = v * 2
    return _ints(v, source, layer, field, minimum)


def _scalar(value, source, layer, field, default):
    v = _vec(value, source, layer, field, (1,), default=[default])
    return float(v[0])


def _bool(value, default):
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        return default
    return bool(np.asarray(value).ravel()[0])


def _layer_attrs(ctype, get, source, name, pool_field, has_bias):
    """Attributes of the layer kinds SimpleNN layers and DagNN blocks describe alike; ``get(field)``
    reads a field, ``pool_field`` names the pool size ('pool' / 'poolSize'), ``has_bias`` is decided
    by the caller (SimpleNN: a second weight, DagNN: hasBias)."""
    if ctype == 'conv':
        return dict(pad=_pad4(get('pad'), source, name),
                    stride=_pair(get('stride'), source, name, 'stride'),
                    dilate=_pair(get('dilate'), source, name, 'dilate'),
                    has_bias=has_bias)
    if ctype == 'convt':
        return dict(crop=_pad4(get('crop'), source, name, 'crop'),
                    upsample=_pair(get('upsample'), source, name, 'upsample'),
                    groups=int(_scalar(get('numGroups'), source, name, 'numGroups', 1)),
                    has_bias=has_bias)
    if ctype == 'pool':
        return dict(method=_text(get('method'), 'max') or 'max',
                    pool=_pair(get(pool_field), source, name, pool_field),
                    pad=_pad4(get('pad'), source, name),
                    stride=_pair(get('stride'), source, name, 'stride'))
    if ctype == 'relu':
        return {'leak': _scalar(get('leak'), source, name, 'leak', 0.0)}
    if ctype == 'dropout':
        return {'rate': _scalar(get('rate'), source, name, 'rate', 0.5)}
    if ctype == 'bnorm':
        return {'epsilon': _scalar(get('epsilon'), source, name, 'epsilon', 1e-5)}
    if ctype == 'lrn':
        return {'param': _vec(get('param'), source, name, 'param', (4,), default=[5, 1, 0.0001 / 5, 0.75])}
    return {}


def _array(value):
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        return value
    if isinstance(value, (list, dict, str)):
        return value
    return np.asarray(value)


def _find_net(variables, source, variable=None):
    """The net struct among the file's variables: ``net``, the top-level form, or ``variable``."""
    if variable is not None:
        if variable not in variables:
            raise CrfGradError('no variable %r in the file (variables: %s)'
                               % (variable, ', '.join(variables)), file=source)
        net = variables[variable]
    elif 'layers' in variables:
        net = variables
    elif isinstance(variables.get('net'), dict):
        net = variables['net']
    else:
        cands = [k for k, v in variables.items() if isinstance(v, dict) and 'layers' in v]
        if len(cands) != 1:
            raise CrfGradError('no MatConvNet network found (need a variable "net" or "layers"; '
                               'the file has: %s)' % ', '.join(variables), file=source)
        net = variables[cands[0]]
    if not isinstance(net, dict) or 'layers' not in net:
        raise CrfGradError('the MatConvNet network struct has no "layers" field', file=source,
                           field='layers')
    return net


def read_matconvnet(path, variable=None):
    """An :class:`MCNModel` of a MatConvNet .mat file (SimpleNN or DagNN, any MAT version)."""
    path = os.fspath(path)
    variables = load_mat(path)
    net = _find_net(variables, path, variable)
    layers = net['layers']
    meta = net.get('meta')
    if not isinstance(meta, dict):
        meta = {}
    if 'normalization' in net and 'normalization' not in meta and isinstance(net['normalization'], dict):
        meta = dict(meta, normalization=net['normalization'])
    is_dag = isinstance(layers, (StructArray, dict)) and all(
        isinstance(l, dict) and 'inputs' in l and 'outputs' in l for l in as_list(layers))
    if is_dag:
        return _read_dagnn(net, meta, path)
    if isinstance(layers, list) and not isinstance(layers, StructArray):
        return _read_simplenn(layers, meta, path)
    if isinstance(layers, (StructArray, dict)):
        # a SimpleNN saved as a struct array (all layers with the same fields)
        return _read_simplenn(as_list(layers), meta, path)
    raise CrfGradError('net.layers is neither a cell array (SimpleNN) nor a struct array (DagNN)',
                       file=path, field='layers')


def _read_simplenn(cells, meta, source):
    layers = []
    prev = 'data'
    used = {'data'}
    for i, l in enumerate(cells):
        if not isinstance(l, dict):
            raise CrfGradError('layer %d is not a struct' % (i + 1), file=source, layer='layer%d' % (i + 1),
                               field='layers')
        name = _text(l.get('name')) or 'layer%d' % (i + 1)
        mcn_type = _text(l.get('type'))
        if not mcn_type:
            raise _err(source, name, 'layer has no type', 'type')
        ctype = _SIMPLENN_TYPES.get(mcn_type)
        if ctype is None:
            raise _err(source, name, 'MatConvNet layer type %r has no Caffe equivalent (supported: %s)'
                       % (mcn_type, ', '.join(sorted(_SIMPLENN_TYPES))), 'type')
        params = []
        if ctype in ('conv', 'convt', 'bnorm'):
            if 'weights' in l and l['weights'] is not None and not (
                    isinstance(l['weights'], np.ndarray) and l['weights'].size == 0):
                w = as_list(l['weights'])
                params = [_array(p) for p in w]
            elif 'filters' in l:
                params = [_array(l.get('filters')), _array(l.get('biases'))]
            else:
                raise _err(source, name, '%s layer has no weights (fields: %s)'
                           % (mcn_type, ', '.join(l)), 'weights')
            if not params or params[0] is None:
                raise _err(source, name, '%s layer has empty weights' % mcn_type, 'weights')
        if ctype == 'pool' and l.get('pool') is None:
            raise _err(source, name, 'pool layer has no pool size', 'pool')
        attrs = _layer_attrs(ctype, l.get, source, name, 'pool', len(params) > 1 and params[1] is not None)
        out = name
        k = 1
        while out in used:
            out = '%s_%d' % (name, k)
            k += 1
        used.add(out)
        layers.append(MCNLayer(name, ctype, mcn_type, [prev], [out], params, attrs, i))
        prev = out
    var_names = ['data'] + [l.outputs[0] for l in layers]
    return MCNModel('simplenn', layers, var_names, meta, source)


def _read_dagnn(net, meta, source):
    params_raw = as_list(net.get('params'))
    by_name = {}
    for p in params_raw:
        if isinstance(p, dict) and 'name' in p:
            by_name[_text(p['name'])] = _array(p.get('value'))
    var_names = [_text(v.get('name')) for v in as_list(net.get('vars')) if isinstance(v, dict)]
    layers = []
    for i, l in enumerate(as_list(net['layers'])):
        name = _text(l.get('name')) or 'layer%d' % (i + 1)
        mcn_type = _text(l.get('type'))
        ctype = _DAGNN_TYPES.get(mcn_type)
        if ctype is None and 'loss' in mcn_type.lower():
            ctype = 'loss'
        if ctype is None:
            raise _err(source, name, 'MatConvNet layer type %r has no Caffe equivalent (supported: %s)'
                       % (mcn_type, ', '.join(sorted(_DAGNN_TYPES))), 'type')
        inputs = [_text(x) for x in as_list(l.get('inputs'))]
        outputs = [_text(x) for x in as_list(l.get('outputs'))]
        if not inputs or not outputs:
            raise _err(source, name, 'layer needs inputs and outputs', 'inputs' if not inputs else 'outputs')
        pnames = [_text(x) for x in as_list(l.get('params'))]
        block = l.get('block')
        block = block if isinstance(block, dict) else {}
        params = []
        if ctype != 'loss':
            for pn in pnames:
                if pn not in by_name:
                    raise _err(source, name, 'parameter %r is not in net.params' % pn, 'params')
                params.append(by_name[pn])
        attrs = _layer_attrs(ctype, block.get, source, name, 'poolSize', _bool(block.get('hasBias'), True))
        if ctype in ('conv', 'convt'):
            attrs['size'] = _array(block.get('size'))
        elif ctype == 'concat':
            attrs['dim'] = int(_scalar(block.get('dim'), source, name, 'dim', 3))
        elif ctype == 'crop':
            attrs['crop'] = _ints(_vec(block.get('crop'), source, name, 'crop', (2,), default=[0, 0]),
                                  source, name, 'crop')
        elif ctype == 'scale':
            attrs['has_bias'] = _bool(block.get('hasBias'), True)
        layers.append(MCNLayer(name, ctype, mcn_type, inputs, outputs, params, attrs, i))
    if not var_names:
        seen = []
        for l in layers:
            for v in l.inputs + l.outputs:
                if v not in seen:
                    seen.append(v)
        var_names = seen
    return MCNModel('dagnn', layers, var_names, meta, source)


# ============================================================================= conversion

class ConvertedNet:
    """The Caffe form of a MatConvNet model.

    ``net_param`` (deploy NetParameter, Input layer first, no blobs), ``weights``
    (layer -> [float32 arrays]), ``inputs``/``outputs`` (blob names; ``outputs[-1]`` is the
    network output), ``blob_of_var`` (MatConvNet variable -> Caffe blob; for SimpleNN the
    variables are 'data' and each layer's output, named after the layer), ``layer_outputs``
    (MatConvNet layer name -> output blob), ``dropped`` (loss layers left out)."""

    def __init__(self, net_param, weights, inputs, outputs, blob_of_var, layer_outputs, dropped,
                 kind, source):
        self.net_param = net_param
        self.weights = weights
        self.inputs = inputs
        self.outputs = outputs
        self.blob_of_var = blob_of_var
        self.layer_outputs = layer_outputs
        self.dropped = dropped
        self.kind = kind
        self.source = source

    def net_param_with_weights(self):
        from .weights import weights_to_net_param
        return weights_to_net_param(self.weights, template=self.net_param)

    def save(self, prefix):
        """Write ``prefix.prototxt`` and ``prefix.caffemodel``; returns the two paths."""
        from ..io.caffemodel import save_caffemodel
        from ..io.prototxt import write_prototxt
        prefix = os.fspath(prefix)
        folder = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(folder, exist_ok=True)
        proto, model = prefix + '.prototxt', prefix + '.caffemodel'
        write_prototxt(self.net_param, proto)
        save_caffemodel(self.net_param_with_weights(), model)
        return proto, model


def _ceil_div(a, b):
    return -((-a) // b)


class _Builder:
    def __init__(self, model):
        self.model = model
        self.src = model.source
        self.net = caffe_pb2.NetParameter()
        self.weights = collections.OrderedDict()
        self.layer_names = set()
        # names of the model's own layers and variables: helper layers/blobs avoid them
        self.reserved_layers = {L.name for L in model.layers}
        self.blob_names = set(model.var_names) | {v for L in model.layers for v in L.inputs + L.outputs}
        self.shapes = {}   # blob -> (C, H, W)

    # -- naming ----------------------------------------------------------------------------
    def unique_layer(self, name, aux=False):
        out, k = name, 1
        while out in self.layer_names or (aux and out in self.reserved_layers):
            out = '%s_%d' % (name, k)
            k += 1
        self.layer_names.add(out)
        return out

    def aux_blob(self, base):
        out, k = base, 1
        while out in self.blob_names:
            out = '%s_%d' % (base, k)
            k += 1
        self.blob_names.add(out)
        return out

    def add(self, name, type, bottoms, tops, blobs=None, aux=False):
        """Append a Caffe layer; helper layers (``aux``) avoid the model's own layer names."""
        lp = self.net.layer.add()
        lp.name = self.unique_layer(name, aux=aux)
        lp.type = type
        lp.bottom.extend(bottoms)
        lp.top.extend(tops)
        self.blob_names.update(tops)
        if blobs is not None:
            self.weights[lp.name] = [np.ascontiguousarray(b, dtype=np.float32) for b in blobs]
        return lp

    def error(self, layer, msg, field=None):
        return CrfGradError(msg, file=self.src, layer=layer.name, field=field)

    # -- emission --------------------------------------------------------------------------
    def size_reference(self, L, x, C, geom):
        """A zero Convolution of ``x`` whose output is (1, H', W') with
        H' = floor((H + D_h - 0) / s) + 1 for geom = [(D, s) per axis], D = T + B - extent."""
        kernel, pad, stride = [], [], []
        for D, s in geom:
            if D <= -1:
                p, k = 0, -D
            else:
                p = D // 2 + 1
                k = 2 * p - D
            kernel.append(k)
            pad.append(p)
            stride.append(s)
        ref = self.aux_blob(L.name + '__size_ref')
        lp = self.add(L.name + '__size_ref', 'Convolution', [x], [ref],
                      blobs=[np.zeros((1, C, kernel[0], kernel[1]), np.float32)], aux=True)
        cp = lp.convolution_param
        cp.num_output = 1
        cp.bias_term = False
        cp.kernel_h, cp.kernel_w = kernel
        cp.pad_h, cp.pad_w = pad
        cp.stride_h, cp.stride_w = stride
        lp.param.add().lr_mult = 0
        return ref

    def crop(self, L, big, ref, offsets, out):
        lp = self.add(L.name + '__crop', 'Crop', [big, ref], [out], aux=True)
        lp.crop_param.axis = 2
        lp.crop_param.offset.extend(int(o) for o in offsets)

    def emit_conv(self, L, x, out):
        C, H, W = self.shapes[x]
        F = self.filters(L)
        FH, FW, FC, K = F.shape
        if C % FC:
            raise self.error(L, 'input has %d channels, not a multiple of the filter depth %d'
                             % (C, FC), 'weights')
        group = C // FC
        if K % group:
            raise self.error(L, '%d filters cannot be split into %d groups' % (K, group), 'weights')
        Wt = F.transpose(3, 2, 0, 1)                  # (K, FC, FH, FW)
        bias = self.bias(L, K)
        T, B, Lp, R = L.attrs['pad']
        sy, sx = L.attrs['stride']
        dy, dx = L.attrs['dilate']
        axes = []
        need_crop = False
        for (t, b, s, d, k) in ((T, B, sy, dy, FH), (Lp, R, sx, dx, FW)):
            if t == b:
                axes.append(dict(pad=t, before=0, after=0, offset=0))
            elif (b - t) % d == 0:
                ext = abs(b - t) // d
                axes.append(dict(pad=max(t, b), before=ext if b > t else 0,
                                 after=ext if t > b else 0, offset=0))
            else:
                m = max(0, _ceil_div(b - t, s))
                axes.append(dict(pad=t + m * s, before=0, after=0, offset=m))
                need_crop = True
        pads = [(0, 0), (0, 0), (axes[0]['before'], axes[0]['after']),
                (axes[1]['before'], axes[1]['after'])]
        Wc = np.pad(Wt, pads)
        top = self.aux_blob(out + '__uncropped') if need_crop else out
        lp = self.add(L.name, 'Convolution', [x], [top],
                      blobs=[Wc] + ([bias] if bias is not None else []))
        cp = lp.convolution_param
        cp.num_output = K
        cp.bias_term = bias is not None
        cp.kernel_h, cp.kernel_w = int(Wc.shape[2]), int(Wc.shape[3])
        cp.pad_h, cp.pad_w = axes[0]['pad'], axes[1]['pad']
        cp.stride_h, cp.stride_w = sy, sx
        if dy != 1 or dx != 1:
            cp.dilation.extend([dy, dx])
        if group != 1:
            cp.group = group
        eh, ew = (FH - 1) * dy + 1, (FW - 1) * dx + 1
        Ho = (H + T + B - eh) // sy + 1
        Wo = (W + Lp + R - ew) // sx + 1
        if need_crop:
            ref = self.size_reference(L, x, C, [(T + B - eh, sy), (Lp + R - ew, sx)])
            self.crop(L, top, ref, [axes[0]['offset'], axes[1]['offset']], out)
        return (K, Ho, Wo)

    def emit_convt(self, L, x, out):
        C, H, W = self.shapes[x]
        F = self.filters(L)
        FH, FW, K, FD = F.shape
        g = L.attrs['groups']
        if FD != C:
            raise self.error(L, 'input has %d channels but the filters expect %d (4th dimension)'
                             % (C, FD), 'weights')
        if g < 1 or C % g:
            raise self.error(L, 'numGroups %d does not divide the %d input channels' % (g, C),
                             'numGroups')
        Wt = F.transpose(3, 2, 0, 1)                  # (FD, K, FH, FW)
        bias = self.bias(L, K * g)
        T, B, Lc, R = L.attrs['crop']
        uy, ux = L.attrs['upsample']
        pad = []
        ext = [(0, 0), (0, 0)]
        for i, (t, b) in enumerate(((T, B), (Lc, R))):
            pad.append(max(t, b))
            ext.append((b - t, 0) if b > t else (0, t - b))
        Wc = np.pad(Wt, ext)
        lp = self.add(L.name, 'Deconvolution', [x], [out],
                      blobs=[Wc] + ([bias] if bias is not None else []))
        cp = lp.convolution_param
        cp.num_output = K * g
        cp.bias_term = bias is not None
        cp.kernel_h, cp.kernel_w = int(Wc.shape[2]), int(Wc.shape[3])
        cp.pad_h, cp.pad_w = pad
        cp.stride_h, cp.stride_w = uy, ux
        if g != 1:
            cp.group = g
        Ho = uy * (H - 1) + FH - T - B
        Wo = ux * (W - 1) + FW - Lc - R
        return (K * g, Ho, Wo)

    def emit_pool(self, L, x, out):
        C, H, W = self.shapes[x]
        method = L.attrs['method'].lower()
        if method not in ('max', 'avg'):
            raise self.error(L, "pooling method must be 'max' or 'avg', got %r" % method, 'method')
        ph, pw = L.attrs['pool']
        T, B, Lp, R = L.attrs['pad']
        sy, sx = L.attrs['stride']
        axes = []
        need_crop = False
        for (t, b, s, k, field) in ((T, B, sy, ph, 'pad'), (Lp, R, sx, pw, 'pad')):
            if t >= k or b >= k:
                raise self.error(L, 'padding %s must be smaller than the pool size %d'
                                 % ([t, b], k), field)
            m = max(0, _ceil_div(b - t - s + 1, s))
            P = t + m * s
            axes.append((P, m))
            if not (m == 0 and b == t + s - 1):
                need_crop = True
        pool_top = self.aux_blob(out + '__uncropped') if need_crop else out
        Ph, Pw = axes[0][0], axes[1][0]

        def pooling(name, bottom, top, pool):
            lp = self.add(name, 'Pooling', [bottom], [top], aux=name != L.name)
            pp = lp.pooling_param
            pp.pool = pool
            pp.kernel_h, pp.kernel_w = ph, pw
            pp.stride_h, pp.stride_w = sy, sx
            pp.pad_h, pp.pad_w = Ph, Pw
            return lp

        if method == 'max':
            pooling(L.name, x, pool_top, caffe_pb2.PoolingParameter.MAX)
        elif Ph == 0 and Pw == 0:
            pooling(L.name, x, pool_top, caffe_pb2.PoolingParameter.AVE)
        else:
            # MatConvNet divides by the in-image pixel count: avg(x) / avg(ones)
            ones = self.aux_blob(L.name + '__ones')
            lp = self.add(L.name + '__ones', 'Power', [x], [ones], aux=True)
            lp.power_param.power = 1
            lp.power_param.scale = 0
            lp.power_param.shift = 1
            frac = self.aux_blob(L.name + '__inside_fraction')
            pooling(L.name + '__inside_fraction', ones, frac, caffe_pb2.PoolingParameter.AVE)
            inv = self.aux_blob(L.name + '__inv_fraction')
            lp = self.add(L.name + '__inv_fraction', 'Power', [frac], [inv], aux=True)
            lp.power_param.power = -1
            summed = self.aux_blob(L.name + '__caffe_avg')
            pooling(L.name, x, summed, caffe_pb2.PoolingParameter.AVE)
            lp = self.add(L.name + '__rescale', 'Eltwise', [summed, inv], [pool_top], aux=True)
            lp.eltwise_param.operation = caffe_pb2.EltwiseParameter.PROD
        Ho = (H + T + B - ph) // sy + 1
        Wo = (W + Lp + R - pw) // sx + 1
        if need_crop:
            ref = self.size_reference(L, x, C, [(T + B - ph, sy), (Lp + R - pw, sx)])
            self.crop(L, pool_top, ref, [axes[0][1], axes[1][1]], out)
        return (C, Ho, Wo)

    def emit_bnorm(self, L, x, out):
        C = self.shapes[x][0]
        if len(L.params) < 3 or any(p is None for p in L.params[:3]):
            raise self.error(L, 'bnorm needs 3 parameters (multipliers, biases, moments), got %d'
                             % sum(p is not None for p in L.params), 'params')
        G, Bb, M = (np.asarray(p, dtype=np.float64) for p in L.params[:3])
        if G.size != C or Bb.size != C:
            raise self.error(L, 'bnorm multipliers/biases have %d/%d values for %d channels'
                             % (G.size, Bb.size, C), 'params')
        if M.size != 2 * C:
            raise self.error(L, 'bnorm moments have %d values, expected %d x 2' % (M.size, C),
                             'params')
        if M.shape == (2, C) and C != 2:
            M = M.T                                   # stored as 2 x C
        else:
            M = M.reshape(C, 2, order='F')            # MatConvNet's C x 2: [mu, sigma]
        mu, sigma = M[:, 0], M[:, 1]
        eps = float(L.attrs['epsilon'])
        sig2 = sigma * sigma
        if np.any(sig2 < eps):
            eps = max(float(sig2.min()) * 0.5, 1e-20)
        var = sig2 - eps
        lp = self.add(L.name, 'BatchNorm', [x], [out],
                      blobs=[mu, var, np.ones((1,))])
        lp.batch_norm_param.use_global_stats = True
        lp.batch_norm_param.eps = eps
        lp = self.add(L.name + '__scale', 'Scale', [out], [out], blobs=[G.ravel(), Bb.ravel()], aux=True)
        lp.scale_param.bias_term = True
        return self.shapes[x]

    def filters(self, L):
        F = L.params[0] if L.params else None
        if F is None or not isinstance(F, np.ndarray):
            raise self.error(L, 'missing filter parameter', 'params')
        F = np.asarray(F, dtype=np.float32)
        if F.ndim > 4:
            raise self.error(L, 'filters must have at most 4 dimensions, got %s' % (F.shape,), 'params')
        F = F.reshape(F.shape + (1,) * (4 - F.ndim))
        size = L.attrs.get('size')
        if size is not None and isinstance(size, np.ndarray) and size.size == 4:
            want = tuple(int(v) for v in np.asarray(size, dtype=np.float64).ravel())
            if int(np.prod(want)) == F.size and want != F.shape:
                F = F.reshape(want, order='F')
        return F

    def bias(self, L, n):
        if not L.attrs.get('has_bias', True) or len(L.params) < 2 or L.params[1] is None:
            return None
        b = np.asarray(L.params[1], dtype=np.float32).ravel()
        if b.size != n:
            raise self.error(L, 'bias has %d values, expected %d' % (b.size, n), 'params')
        return b

    def emit(self, L):
        ins = L.inputs
        out = L.outputs[0]
        self.blob_names.add(out)
        t = L.type
        if t in ('conv', 'convt', 'pool', 'bnorm') or t in _ELEMENTWISE:
            if len(ins) != 1 or len(L.outputs) != 1:
                raise self.error(L, '%s layers take one input and one output' % L.mcn_type, 'inputs')
        x = ins[0]
        if t == 'conv':
            shape = self.emit_conv(L, x, out)
        elif t == 'convt':
            shape = self.emit_convt(L, x, out)
        elif t == 'pool':
            shape = self.emit_pool(L, x, out)
        elif t == 'bnorm':
            shape = self.emit_bnorm(L, x, out)
        elif t == 'relu':
            lp = self.add(L.name, 'ReLU', [x], [out])
            if L.attrs['leak']:
                lp.relu_param.negative_slope = L.attrs['leak']
            shape = self.shapes[x]
        elif t == 'sigmoid':
            self.add(L.name, 'Sigmoid', [x], [out])
            shape = self.shapes[x]
        elif t == 'softmax':
            lp = self.add(L.name, 'Softmax', [x], [out])
            lp.softmax_param.axis = 1
            shape = self.shapes[x]
        elif t == 'dropout':
            lp = self.add(L.name, 'Dropout', [x], [out])
            lp.dropout_param.dropout_ratio = L.attrs['rate']
            shape = self.shapes[x]
        elif t == 'lrn':
            N, kappa, alpha, beta = L.attrs['param']
            if N != int(N) or int(N) % 2 == 0:
                raise self.error(L, 'LRN window %g has no Caffe equivalent (Caffe needs an odd '
                                 'local_size)' % N, 'param')
            lp = self.add(L.name, 'LRN', [x], [out])
            lp.lrn_param.local_size = int(N)
            lp.lrn_param.alpha = alpha * N
            lp.lrn_param.beta = beta
            lp.lrn_param.k = kappa
            shape = self.shapes[x]
        elif t == 'scale':
            C = self.shapes[x][0]
            s = L.params[0] if L.params else None
            if s is None:
                raise self.error(L, 'scale layer has no multiplier parameter', 'params')
            s = np.asarray(s, dtype=np.float32)
            blobs = [self._channel_vector(L, s, C)]
            if L.attrs['has_bias']:
                if len(L.params) < 2 or L.params[1] is None:
                    raise self.error(L, 'scale layer has hasBias but no bias parameter', 'params')
                blobs.append(self._channel_vector(L, np.asarray(L.params[1], np.float32), C))
            lp = self.add(L.name, 'Scale', [x], [out], blobs=blobs)
            lp.scale_param.axis = 1
            lp.scale_param.num_axes = 1
            lp.scale_param.bias_term = len(blobs) == 2
            shape = self.shapes[x]
        elif t == 'concat':
            dim = L.attrs['dim']
            axis = {1: 2, 2: 3, 3: 1}.get(dim)
            if axis is None:
                raise self.error(L, 'concatenation along dimension %d is not supported' % dim, 'dim')
            shapes = [self.shapes[i] for i in ins]
            k = axis - 1
            for s in shapes[1:]:
                if any(a != b for j, (a, b) in enumerate(zip(s, shapes[0])) if j != k):
                    raise self.error(L, 'inputs %s have incompatible sizes %s' % (ins, shapes), 'inputs')
            shape = list(shapes[0])
            shape[k] = sum(s[k] for s in shapes)
            shape = tuple(shape)
            if len(ins) == 1:
                lp = self.add(L.name, 'Power', [x], [out])
            else:
                lp = self.add(L.name, 'Concat', list(ins), [out])
                lp.concat_param.axis = axis
        elif t == 'sum':
            shapes = [self.shapes[i] for i in ins]
            if any(s != shapes[0] for s in shapes):
                raise self.error(L, 'inputs %s have different sizes %s' % (ins, shapes), 'inputs')
            if len(ins) == 1:
                self.add(L.name, 'Power', [x], [out])
            else:
                lp = self.add(L.name, 'Eltwise', list(ins), [out])
                lp.eltwise_param.operation = caffe_pb2.EltwiseParameter.SUM
            shape = shapes[0]
        elif t == 'crop':
            if len(ins) != 2:
                raise self.error(L, 'crop takes two inputs (data, size reference)', 'inputs')
            a, b = self.shapes[ins[0]], self.shapes[ins[1]]
            cy, cx = L.attrs['crop']
            if a[1] - cy < b[1] or a[2] - cx < b[2]:
                raise self.error(L, 'crop %s of a %dx%d input cannot give %dx%d'
                                 % ([cy, cx], a[1], a[2], b[1], b[2]), 'crop')
            lp = self.add(L.name, 'Crop', list(ins), [out])
            lp.crop_param.axis = 2
            lp.crop_param.offset.extend([cy, cx])
            shape = (a[0], b[1], b[2])
        else:   # pragma: no cover - types are checked on reading
            raise self.error(L, 'layer type %r has no Caffe equivalent' % L.mcn_type, 'type')
        if shape[1] <= 0 or shape[2] <= 0:
            raise self.error(L, 'output would be empty (%d x %d) for the input size; pass a larger '
                             'input shape' % (shape[1], shape[2]), 'inputs')
        self.shapes[out] = tuple(int(s) for s in shape)

    def _channel_vector(self, L, v, C):
        if v.size == C:
            return v.ravel()
        if v.size == 1:
            return np.full((C,), float(v.ravel()[0]), np.float32)
        raise self.error(L, 'scale parameter of shape %s is not per channel (%d channels)'
                         % (v.shape, C), 'params')


# ============================================================================= graph logic

def _schedule(layers, main_output, source):
    """Layers in a topological order of their variables (stored order breaks ties), with the
    producer of ``main_output`` as late as possible."""
    produced = {}
    for L in layers:
        for v in L.outputs:
            if v in produced:
                raise CrfGradError('variable %r is produced by two layers (%s and %s)'
                                   % (v, produced[v].name, L.name), file=source, layer=L.name,
                                   field='outputs')
            produced[v] = L
    deps = {id(L): {id(produced[v]) for v in L.inputs if v in produced} for L in layers}
    done, order = set(), []
    pending = list(layers)
    main_id = id(produced[main_output]) if main_output in produced else None
    while pending:
        ready = [L for L in pending if deps[id(L)] <= done]
        if not ready:
            names = ', '.join(L.name for L in pending)
            raise CrfGradError('the layer graph has a cycle (involving %s)' % names, file=source,
                               layer=pending[0].name, field='inputs')
        pick = next((L for L in ready if id(L) != main_id), ready[0])
        order.append(pick)
        done.add(id(pick))
        pending.remove(pick)
    return order


def _meta_input_sizes(meta):
    """{name or None: [H, W, C]} from meta.inputs / normalization.imageSize / inputSize."""
    out = {}
    for item in as_list(meta.get('inputs')):
        if isinstance(item, dict) and 'size' in item:
            size = np.asarray(item['size'], dtype=np.float64).ravel().tolist()
            if len(size) >= 3:
                out[_text(item.get('name')) or None] = [int(s) for s in size[:3]]
    norm = meta.get('normalization')
    for candidate in ((norm or {}).get('imageSize') if isinstance(norm, dict) else None,
                      meta.get('inputSize')):
        if candidate is not None and None not in out:
            size = np.asarray(candidate, dtype=np.float64).ravel().tolist()
            if len(size) >= 3:
                out[None] = [int(s) for s in size[:3]]
    return out


def _input_channels(var, layers, consumers, source):
    """Channels of an input variable from the first layer that fixes them."""
    seen, queue = set(), [var]
    while queue:
        v = queue.pop(0)
        if v in seen:
            continue
        seen.add(v)
        for L in consumers.get(v, []):
            if L.type == 'conv' and L.params and isinstance(L.params[0], np.ndarray):
                F = L.params[0]
                return int(F.shape[2]) if F.ndim >= 3 else 1
            if L.type == 'convt' and L.params and isinstance(L.params[0], np.ndarray):
                F = L.params[0]
                return int(F.shape[3]) if F.ndim >= 4 else 1
            if L.type == 'bnorm' and L.params and L.params[0] is not None:
                return int(np.asarray(L.params[0]).size)
            if L.type in ('relu', 'sigmoid', 'softmax', 'dropout', 'lrn', 'pool', 'sum') or \
                    (L.type == 'crop' and L.inputs[0] == v):
                queue.extend(L.outputs)
    raise CrfGradError('cannot tell the number of channels of input %r; give the input shape'
                       % var, file=source, field='inputs')


def matconvnet_to_caffe(model, input_shape=None, variable=None, name=None):
    """Convert a MatConvNet model (path or :class:`MCNModel`) to a :class:`ConvertedNet`.

    ``input_shape``: (N, C, H, W) of the first input (or {input name: shape}); by default
    the size in ``meta`` (inputs / normalization.imageSize / inputSize) with N = 1, else
    the first of 64, 128, 256, 32, 512 square sizes the net accepts."""
    if not isinstance(model, MCNModel):
        model = read_matconvnet(model, variable=variable)
    src = model.source
    losses = [L for L in model.layers if L.type == 'loss']
    kept = [L for L in model.layers if L.type != 'loss']
    if not kept:
        raise CrfGradError('the network has no layers besides losses', file=src, field='layers')
    produced = {v for L in kept for v in L.outputs}
    consumed = {v for L in kept for v in L.inputs}
    main_output = None
    for L in losses:
        if L.inputs and L.inputs[0] in produced:
            main_output = L.inputs[0]
            break
    order = _schedule(kept, main_output, src)
    if main_output is None:
        main_output = order[-1].outputs[0]
    var_rank = {v: i for i, v in enumerate(model.var_names)}
    inputs = sorted({v for L in kept for v in L.inputs if v not in produced},
                    key=lambda v: (var_rank.get(v, len(var_rank)), v))
    if not inputs:
        raise CrfGradError('the network has no input variable', file=src, field='inputs')
    consumers = collections.defaultdict(list)
    for L in order:
        for v in L.inputs:
            consumers[v].append(L)

    meta_sizes = _meta_input_sizes(model.meta)
    if isinstance(input_shape, dict):
        given = {k: tuple(int(s) for s in v) for k, v in input_shape.items()}
    elif input_shape is not None:
        given = {inputs[0]: tuple(int(s) for s in input_shape)}
    else:
        given = {}
    for k, v in given.items():
        if k not in inputs:
            raise CrfGradError('%r is not an input of the network (inputs: %s)' % (k, ', '.join(inputs)),
                               file=src, field='inputs')
        if len(v) != 4 or min(v) <= 0:
            raise CrfGradError('input shape must be 4 positive numbers N,C,H,W, got %s' % (v,),
                               file=src, field='inputs')
    channels = {}
    for v in inputs:
        if v in given:
            channels[v] = given[v][1]
        elif v in meta_sizes or (v == inputs[0] and None in meta_sizes):
            channels[v] = (meta_sizes.get(v) or meta_sizes[None])[2]
        else:
            channels[v] = _input_channels(v, kept, consumers, src)

    def build(spatial):
        b = _Builder(model)
        shapes = {}
        for v in inputs:
            if v in given:
                shapes[v] = given[v]
            else:
                hw = (meta_sizes.get(v) or (meta_sizes.get(None) if v == inputs[0] else None))
                h, w = (hw[0], hw[1]) if hw else (spatial, spatial)
                shapes[v] = (1, channels[v], h, w)
        lp = b.add('input', 'Input', [], list(inputs), aux=True)
        for v in inputs:
            lp.input_param.shape.add().dim.extend(shapes[v])
            b.shapes[v] = tuple(shapes[v][1:])
        b.blob_names.update(inputs)
        for L in order:
            b.emit(L)
        return b

    fixed = all(v in given or v in meta_sizes or (v == inputs[0] and None in meta_sizes)
                for v in inputs)
    if fixed:
        builder = build(None)
    else:
        last_exc = None
        for spatial in (64, 128, 256, 32, 512):
            try:
                builder = build(spatial)
                break
            except CrfGradError as exc:
                if exc.field != 'inputs' or 'empty' not in str(exc):
                    raise
                last_exc = exc
        else:
            raise last_exc
    net = builder.net
    net.name = name or os.path.splitext(os.path.basename(str(src)))[0]
    outputs = [v for L in order for v in L.outputs if v not in consumed]
    if main_output in outputs:
        outputs.remove(main_output)
        outputs.append(main_output)
    blob_of_var = {v: v for v in model.var_names if v in builder.shapes}
    layer_outputs = collections.OrderedDict((L.name, L.outputs[0]) for L in model.layers
                                            if L.type != 'loss')
    return ConvertedNet(net, builder.weights, list(inputs), outputs, blob_of_var, layer_outputs,
                        [L.name for L in losses], model.kind, src)


def convert_matconvnet(in_path, out_prefix, input_shape=None, variable=None):
    """Read a MatConvNet .mat, write ``out_prefix``.prototxt/.caffemodel; returns the ConvertedNet."""
    conv = matconvnet_to_caffe(in_path, input_shape=input_shape, variable=variable)
    conv.save(out_prefix)
    return conv


def mcn_to_caffe_data(x):
    """MatConvNet data H x W x C [x N] -> Caffe N x C x H x W."""
    x = np.asarray(x)
    x = x.reshape(x.shape + (1,) * (4 - x.ndim))
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


def caffe_to_mcn_data(x):
    """Caffe N x C x H x W -> MatConvNet H x W x C x N."""
    return np.ascontiguousarray(np.asarray(x).transpose(2, 3, 1, 0))
