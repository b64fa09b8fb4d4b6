"""Caffe nets -> MatConvNet DagNN .mat (the struct ``dagnn.DagNN.saveobj`` produces).

    net = caffe_to_dagnn('deploy.prototxt', 'weights.caffemodel')   # a dict
    save_dagnn(net, 'net.mat')                                        # variable ``net``

In MATLAB: ``s = load('net.mat'); net = dagnn.DagNN.loadobj(s.net); net.mode = 'test';
net.eval({'data', x})`` with x H x W x C x N (channels in the Caffe net's order).

The Caffe net is instantiated (TEST phase) to know every blob's shape.  Layer, variable and
parameter names become valid MATLAB identifiers (DagNN keeps them as struct field names);
``meta.caffe`` stores the mapping (``layerNames`` / ``varNames``: structs with 1 x n cells
``matconvnet`` and ``caffe``) and ``meta.inputs`` the input sizes [H W C N].  An in-place Caffe top gets a new
variable (named after the layer).  Split layers are aliases.

Layer mapping (weights in MatConvNet order, see matlab-conventions.md):
Convolution -> dagnn.Conv (pad [p p q q]); Deconvolution -> dagnn.ConvTranspose (crop
[p p q q], upsample = stride; no dilation); InnerProduct -> dagnn.Conv whose filter covers the
input (the output is 1 x 1 x Nout x N); Pooling -> dagnn.Pooling, Caffe's ceil rounding
emulated by a bottom/right pad of p + s - 1 (exact for every input size when that is smaller
than the kernel; otherwise the pad for the instantiated size is used and a warning logged);
average pooling with padding is refused (Caffe divides by the padded window, MatConvNet by
the in-image pixels: no equivalent); BatchNorm (+ the Scale that follows it in place) ->
dagnn.BatchNorm with moments [mean, sqrt(var + eps)]; Scale -> dagnn.Scale; ReLU, Sigmoid,
Softmax (axis 1), Dropout, LRN (across channels), Concat, Eltwise SUM (unit coefficients),
Crop (axis 2).  Loss/Accuracy/Silence layers are left out.  Anything else is refused with a
CrfGradError naming the layer.
"""
import collections
import logging

import numpy as np

from .. import backend
from ..errors import CrfGradError
from ..proto import caffe_pb2
from .matfile import StructArray, save_mat

log = logging.getLogger('crfgrad_cupy')

_SKIPPED = ('Accuracy', 'Silence', 'IOUAccuracy')


class _Namer:
    def __init__(self):
        self.used = set()
        self.map = collections.OrderedDict()

    def new(self, name):
        s = ''.join(c if (c.isascii() and (c.isalnum() or c == '_')) else '_' for c in str(name))
        if not s or not s[0].isalpha():
            s = 'x' + s
        s = s[:63]
        base, k = s, 1
        while s in self.used:
            suffix = '_%d' % k
            s = base[:63 - len(suffix)] + suffix
            k += 1
        self.used.add(s)
        self.map[s] = name
        return s


def _row(values):
    return np.asarray([list(values)], dtype=np.float64)


def _col(v):
    return np.asarray(v, dtype=np.float32).reshape(-1, 1)


def _conv_geometry(cp):
    def rep(values, h, w, default):
        if cp.HasField(h) or cp.HasField(w):
            return [int(getattr(cp, h)), int(getattr(cp, w))]
        values = [int(v) for v in values]
        if not values:
            return [default, default]
        return values * 2 if len(values) == 1 else values[:2]
    kernel = rep(cp.kernel_size, 'kernel_h', 'kernel_w', 0)
    stride = rep(cp.stride, 'stride_h', 'stride_w', 1)
    pad = rep(cp.pad, 'pad_h', 'pad_w', 0)
    dil = [int(v) for v in cp.dilation] or [1]
    dil = dil * 2 if len(dil) == 1 else dil[:2]
    return kernel, stride, pad, dil


def _pool_geometry(pp, in_hw):
    if pp.global_pooling:
        return list(in_hw), [1, 1], [0, 0]
    if pp.HasField('kernel_h') or pp.HasField('kernel_w'):
        kernel = [int(pp.kernel_h), int(pp.kernel_w)]
    else:
        kernel = [int(pp.kernel_size)] * 2
    if pp.HasField('stride_h') or pp.HasField('stride_w'):
        stride = [int(pp.stride_h), int(pp.stride_w)]
    else:
        stride = [int(pp.stride)] * 2
    if pp.HasField('pad_h') or pp.HasField('pad_w'):
        pad = [int(pp.pad_h), int(pp.pad_w)]
    else:
        pad = [int(pp.pad)] * 2
    return kernel, stride, pad


def _caffe_pool_out(size, k, s, p):
    out = -(-(size + 2 * p - k) // s) + 1
    if p and (out - 1) * s >= size + p:
        out -= 1
    return out


def caffe_to_dagnn(network, weights=None, phase=None, name=None):
    """The DagNN struct (a dict for :func:`save_dagnn`) of a Caffe net.

    ``network``: a prototxt path/text, NetParameter or an instantiated :class:`~crfgrad_cupy.net.Net`;
    ``weights``: a .caffemodel / .h5 file (ignored for a Net instance)."""
    from ..net import Net, TEST
    if isinstance(network, Net):
        net = network
    else:
        net = Net(network, phase=TEST if phase is None else phase, weights=weights)
    source = str(net.source) if net.source else (name or 'net')

    var_namer, layer_namer, param_namer = _Namer(), _Namer(), _Namer()
    current = {}            # caffe blob -> matconvnet var
    vars_, params, layers = [], [], []
    inputs_meta = []

    def err(lp, msg, field=None):
        return CrfGradError(msg, file=source, layer=lp.name, field=field)

    def new_var(caffe_name, fallback):
        nm = var_namer.new(caffe_name if caffe_name not in current and not any(
            v['name'] == caffe_name for v in vars_) else fallback)
        var_namer.map[nm] = caffe_name          # the Caffe blob this variable's value is
        vars_.append(collections.OrderedDict([('name', nm), ('precious', False)]))
        current[caffe_name] = nm
        return nm

    def add_param(pname, value, spec):
        nm = param_namer.new(pname)
        lr, wd = (spec if spec is not None else (1.0, 1.0))
        params.append(collections.OrderedDict([
            ('name', nm), ('value', np.asarray(value, dtype=np.float32)),
            ('learningRate', float(lr)), ('weightDecay', float(wd))]))
        return nm

    def add_layer(lp, mtype, ins, outs, pnames, block, lname=None):
        layers.append(collections.OrderedDict([
            ('name', layer_namer.new(lname or lp.name)), ('type', mtype),
            ('inputs', list(ins)), ('outputs', list(outs)), ('params', list(pnames)),
            ('block', block)]))

    def shape(blob):
        return tuple(int(d) for d in net.blobs[blob].shape)

    nparams = list(net.net_param.layer)
    consumed_by = collections.defaultdict(list)
    for i, lp in enumerate(nparams):
        for b in lp.bottom:
            consumed_by[b].append(i)
    merged_scale = set()

    for i, (lp, layer) in enumerate(zip(nparams, net.layers)):
        t = lp.type
        blobs = [backend.to_numpy(b.data) for b in layer.blobs]
        specs = net.param_specs.get(lp.name, [])
        spec = lambda j: specs[j] if j < len(specs) else (1.0, 1.0)   # noqa: E731
        if i in merged_scale:
            continue
        if t == 'Input':
            for top in lp.top:
                v = new_var(top, top)
                s = shape(top)
                if len(s) != 4:
                    raise err(lp, 'input %r must be 4-D (N, C, H, W), got %s' % (top, s), 'input_param')
                inputs_meta.append(collections.OrderedDict([
                    ('name', v), ('size', _row([s[2], s[3], s[1], s[0]]))]))
            continue
        if t == 'Split':
            for top in lp.top:
                current[top] = current[lp.bottom[0]]
            continue
        if t.endswith('Loss') or t in _SKIPPED:
            log.info('%s: layer %r (%s) left out of the DagNN (training only)', source, lp.name, t)
            continue
        try:
            ins = [current[b] for b in lp.bottom]
        except KeyError as exc:
            raise err(lp, 'bottom %s comes from a layer that was left out' % exc, 'bottom') from None
        in_shapes = [shape(b) for b in lp.bottom]

        def outs():
            return [new_var(top, lp.name if top in lp.bottom else top + '_' + lp.name)
                    for top in lp.top]

        if t == 'Convolution':
            cp = lp.convolution_param
            k, s, p, d = _conv_geometry(cp)
            W = blobs[0]
            F = W.transpose(2, 3, 1, 0)
            pn = [add_param(lp.name + '_f', F, spec(0))]
            if cp.bias_term:
                pn.append(add_param(lp.name + '_b', _col(blobs[1]), spec(1)))
            block = collections.OrderedDict([
                ('size', _row(F.shape)), ('hasBias', bool(cp.bias_term)), ('opts', []),
                ('pad', _row([p[0], p[0], p[1], p[1]])), ('stride', _row(s)), ('dilate', _row(d))])
            add_layer(lp, 'dagnn.Conv', ins, outs(), pn, block)
        elif t == 'Deconvolution':
            cp = lp.convolution_param
            k, s, p, d = _conv_geometry(cp)
            if d != [1, 1]:
                raise err(lp, 'dilated deconvolution has no MatConvNet equivalent', 'convolution_param.dilation')
            W = blobs[0]                                        # (Cin, Cout/g, kh, kw)
            F = W.transpose(2, 3, 1, 0)                         # (kh, kw, Cout/g, Cin)
            pn = [add_param(lp.name + '_f', F, spec(0))]
            if cp.bias_term:
                pn.append(add_param(lp.name + '_b', _col(blobs[1]), spec(1)))
            block = collections.OrderedDict([
                ('size', _row(F.shape)), ('hasBias', bool(cp.bias_term)),
                ('upsample', _row(s)), ('crop', _row([p[0], p[0], p[1], p[1]])),
                ('numGroups', float(cp.group)), ('opts', [])])
            add_layer(lp, 'dagnn.ConvTranspose', ins, outs(), pn, block)
        elif t == 'InnerProduct':
            ip = lp.inner_product_param
            xs = in_shapes[0]
            if ip.axis not in (1, -len(xs) + 1) or ip.transpose:
                raise err(lp, 'only InnerProduct over axis 1 without transpose is supported', 'inner_product_param')
            dims = tuple(xs[1:]) + (1,) * (4 - len(xs))
            C, H, Wd = dims[0], dims[1], dims[2]
            Wm = blobs[0].reshape(-1, C, H, Wd)
            F = Wm.transpose(2, 3, 1, 0)
            pn = [add_param(lp.name + '_f', F, spec(0))]
            if ip.bias_term:
                pn.append(add_param(lp.name + '_b', _col(blobs[1]), spec(1)))
            block = collections.OrderedDict([
                ('size', _row(F.shape)), ('hasBias', bool(ip.bias_term)), ('opts', []),
                ('pad', _row([0, 0, 0, 0])), ('stride', _row([1, 1])), ('dilate', _row([1, 1]))])
            add_layer(lp, 'dagnn.Conv', ins, outs(), pn, block)
        elif t == 'Pooling':
            pp = lp.pooling_param
            xs = in_shapes[0]
            k, s, p = _pool_geometry(pp, xs[2:4])
            if pp.pool == caffe_pb2.PoolingParameter.MAX:
                method = 'max'
            elif pp.pool == caffe_pb2.PoolingParameter.AVE:
                method = 'avg'
                if p[0] or p[1]:
                    raise err(lp, 'average pooling with padding has no MatConvNet equivalent (Caffe '
                              'divides by the padded window, MatConvNet by the in-image pixels)',
                              'pooling_param.pad')
            else:
                raise err(lp, 'stochastic pooling has no MatConvNet equivalent', 'pooling_param.pool')
            extra = []
            for ax in range(2):
                e = s[ax] - 1
                if p[ax] + e >= k[ax]:
                    size = xs[2 + ax]
                    out = _caffe_pool_out(size, k[ax], s[ax], p[ax])
                    e = max(0, (out - 1) * s[ax] + k[ax] - (size + 2 * p[ax]))
                    if p[ax] + e >= k[ax]:
                        raise err(lp, 'Caffe\'s ceil-rounded output size needs a padding of %d, not '
                                  'smaller than the kernel %d (MatConvNet refuses that)'
                                  % (p[ax] + e, k[ax]), 'pooling_param')
                    log.warning('%s: pooling layer %r matches Caffe only for inputs of size %s',
                                source, lp.name, xs[2:4])
                extra.append(e)
            block = collections.OrderedDict([
                ('method', method), ('poolSize', _row(k)), ('opts', []),
                ('pad', _row([p[0], p[0] + extra[0], p[1], p[1] + extra[1]])),
                ('stride', _row(s))])
            add_layer(lp, 'dagnn.Pooling', ins, outs(), [], block)
        elif t == 'ReLU':
            block = collections.OrderedDict([('leak', float(lp.relu_param.negative_slope)),
                                             ('useShortCircuit', True), ('opts', [])])
            add_layer(lp, 'dagnn.ReLU', ins, outs(), [], block)
        elif t == 'Sigmoid':
            add_layer(lp, 'dagnn.Sigmoid', ins, outs(), [], collections.OrderedDict())
        elif t == 'Softmax':
            axis = lp.softmax_param.axis
            if axis not in (1, -3) or len(in_shapes[0]) not in (2, 4):
                raise err(lp, 'only softmax over the channel axis (1) is supported', 'softmax_param.axis')
            add_layer(lp, 'dagnn.SoftMax', ins, outs(), [], collections.OrderedDict())
        elif t == 'Dropout':
            block = collections.OrderedDict([('rate', float(lp.dropout_param.dropout_ratio)),
                                             ('frozen', False)])
            add_layer(lp, 'dagnn.DropOut', ins, outs(), [], block)
        elif t == 'LRN':
            q = lp.lrn_param
            if q.norm_region != caffe_pb2.LRNParameter.ACROSS_CHANNELS:
                raise err(lp, 'LRN within channels has no MatConvNet equivalent', 'lrn_param.norm_region')
            n = int(q.local_size)
            block = collections.OrderedDict([
                ('param', _row([n, q.k, q.alpha / n, q.beta]))])
            add_layer(lp, 'dagnn.LRN', ins, outs(), [], block)
        elif t == 'BatchNorm':
            q = lp.batch_norm_param
            C = in_shapes[0][1]
            sf = float(blobs[2].ravel()[0])
            factor = 0.0 if sf == 0 else 1.0 / sf
            mean = blobs[0].astype(np.float64) * factor
            var = blobs[1].astype(np.float64) * factor
            sigma = np.sqrt(var + float(np.float32(q.eps)))
            G, Bb = np.ones(C), np.zeros(C)
            top0 = lp.top[0]
            readers = [j for j in consumed_by[top0] if j > i]
            out_blob = top0
            if readers:
                j = readers[0]
                nxt = nparams[j]
                if nxt.type == 'Scale' and list(nxt.bottom) == [top0] and \
                        nxt.scale_param.axis in (1, -3) and nxt.scale_param.num_axes == 1 and \
                        (nxt.top[0] == top0 or len(readers) == 1):
                    sblobs = [backend.to_numpy(b.data) for b in net.layers[j].blobs]
                    G = sblobs[0].astype(np.float64)
                    if nxt.scale_param.bias_term:
                        Bb = sblobs[1].astype(np.float64)
                    merged_scale.add(j)
                    out_blob = nxt.top[0]
            pn = [add_param(lp.name + '_g', _col(G), spec(0)),
                  add_param(lp.name + '_b', _col(Bb), spec(1)),
                  add_param(lp.name + '_m', np.stack([mean, sigma], axis=1), spec(2))]
            block = collections.OrderedDict([('numChannels', float(C)),
                                             ('epsilon', float(np.float32(q.eps))), ('opts', [])])
            o = [new_var(out_blob, lp.name)]
            current[top0] = o[0]
            add_layer(lp, 'dagnn.BatchNorm', ins, o, pn, block)
        elif t == 'Scale':
            q = lp.scale_param
            if len(lp.bottom) != 1 or q.axis not in (1, -3) or q.num_axes != 1:
                raise err(lp, 'only a channel-wise Scale with its own parameters is supported', 'scale_param')
            pn = [add_param(lp.name + '_f', blobs[0].reshape(1, 1, -1), spec(0))]
            if q.bias_term:
                pn.append(add_param(lp.name + '_b', blobs[1].reshape(1, 1, -1), spec(1)))
            block = collections.OrderedDict([('size', _row([1, 1, blobs[0].size])),
                                             ('hasBias', bool(q.bias_term))])
            add_layer(lp, 'dagnn.Scale', ins, outs(), pn, block)
        elif t == 'Concat':
            q = lp.concat_param
            axis = q.concat_dim if q.HasField('concat_dim') else q.axis
            axis = axis + len(in_shapes[0]) if axis < 0 else axis
            dim = {0: 4, 1: 3, 2: 1, 3: 2}.get(axis)
            if dim is None or len(in_shapes[0]) != 4:
                raise err(lp, 'concat along axis %d has no MatConvNet equivalent' % axis, 'concat_param.axis')
            add_layer(lp, 'dagnn.Concat', ins, outs(), [], collections.OrderedDict([('dim', float(dim))]))
        elif t == 'Eltwise':
            q = lp.eltwise_param
            if q.operation != caffe_pb2.EltwiseParameter.SUM or any(c != 1 for c in q.coeff):
                raise err(lp, 'only Eltwise SUM with unit coefficients has a MatConvNet equivalent '
                          '(dagnn.Sum)', 'eltwise_param')
            add_layer(lp, 'dagnn.Sum', ins, outs(), [], collections.OrderedDict())
        elif t == 'Crop':
            q = lp.crop_param
            nd = len(in_shapes[0])
            axis = q.axis + nd if q.axis < 0 else q.axis
            if axis != 2 or nd != 4:
                raise err(lp, 'only Crop over the spatial axes (axis 2) has a MatConvNet equivalent',
                          'crop_param.axis')
            off = [int(o) for o in q.offset] or [0]
            off = off * 2 if len(off) == 1 else off
            add_layer(lp, 'dagnn.Crop', ins, outs(), [], collections.OrderedDict([('crop', _row(off))]))
        else:
            raise err(lp, 'Caffe layer type %r has no MatConvNet DagNN equivalent' % t, 'type')

    if not layers:
        raise CrfGradError('the net has no convertible layers', file=source)
    produced = {o for l in layers for o in l['outputs']}
    consumed = {v for l in layers for v in l['inputs']}
    for v in vars_:
        if v['name'] in produced and v['name'] not in consumed:
            v['precious'] = True
    meta = collections.OrderedDict([
        ('inputs', StructArray(inputs_meta)),
        ('caffe', collections.OrderedDict([
            ('name', net.name or ''),
            ('layerNames', _pairs(layer_namer.map)),
            ('varNames', _pairs(var_namer.map)),
        ])),
    ])
    return collections.OrderedDict([
        ('vars', StructArray(vars_)), ('params', StructArray(params)),
        ('layers', StructArray(layers)), ('meta', meta)])


def _pairs(mapping):
    """struct {matconvnet: 1 x n cell, caffe: 1 x n cell} of a name mapping."""
    return collections.OrderedDict([('matconvnet', list(mapping.keys())),
                                    ('caffe', list(mapping.values()))])


def save_dagnn(dag, path, version='7.3', variable='net'):
    """Write the DagNN struct as ``variable`` (default ``net``; None: its fields at top level)."""
    variables = dict(dag) if variable is None else {variable: dag}
    save_mat(path, variables, version=version)


def convert_caffe_to_dagnn(proto, weights, out_path, version='7.3'):
    """Read a Caffe net (+ weights) and write the DagNN .mat; returns the struct."""
    dag = caffe_to_dagnn(proto, weights)
    save_dagnn(dag, out_path, version=version)
    return dag
