"""Upgrade of legacy Caffe nets and solvers to the current format.

The steps and their order are Caffe's (``UpgradeNetAsNeeded``):

1. V0 -> V1: ``layers { layer { type: "conv" ... } }`` (V0LayerParameter inside a
   V1 entry) becomes ``layers { type: CONVOLUTION convolution_param {...} }``;
   V0 ``padding`` layers disappear and their ``pad`` moves to the consuming
   convolution / pooling layer.
2. data transformation: scale/mean_file/crop_size/mirror of V1 DATA, IMAGE_DATA
   and WINDOW_DATA layers move into ``transform_param``.
3. V1 -> current: ``layers { type: ENUM }`` becomes ``layer { type: "String" }``;
   ``blobs_lr``/``weight_decay``/``param``/``blob_share_mode`` become ParamSpecs.
4. net inputs: ``input`` + ``input_dim``/``input_shape`` become a first layer
   ``{name: "input" type: "Input"}``.
5. BatchNorm with exactly three ParamSpecs: all get lr_mult 0, decay_mult 0.

On top of Caffe we turn DeepLab's ``convolution_param { hole: N }`` into
``dilation: N`` (the same operation under its later name).
"""
from ..errors import CrfGradError
from ..proto import caffe_pb2

V1 = caffe_pb2.V1LayerParameter

# V1 enum name -> current type string.  None: the enum exists (so old files
# parse) but there is no layer type for it.
V1_TYPE_NAMES = {
    'NONE': '',
    'ABSVAL': 'AbsVal',
    'ACCURACY': 'Accuracy',
    'ARGMAX': 'ArgMax',
    'BNLL': 'BNLL',
    'CONCAT': 'Concat',
    'CONTRASTIVE_LOSS': 'ContrastiveLoss',
    'CONVOLUTION': 'Convolution',
    'DECONVOLUTION': 'Deconvolution',
    'DATA': 'Data',
    'DROPOUT': 'Dropout',
    'DUMMY_DATA': 'DummyData',
    'EUCLIDEAN_LOSS': 'EuclideanLoss',
    'ELTWISE': 'Eltwise',
    'EXP': 'Exp',
    'FLATTEN': 'Flatten',
    'HDF5_DATA': 'HDF5Data',
    'HDF5_OUTPUT': 'HDF5Output',
    'HINGE_LOSS': 'HingeLoss',
    'IM2COL': 'Im2col',
    'IMAGE_DATA': 'ImageData',
    'INFOGAIN_LOSS': 'InfogainLoss',
    'INNER_PRODUCT': 'InnerProduct',
    'LRN': 'LRN',
    'MEMORY_DATA': 'MemoryData',
    'MULTINOMIAL_LOGISTIC_LOSS': 'MultinomialLogisticLoss',
    'MVN': 'MVN',
    'POOLING': 'Pooling',
    'POWER': 'Power',
    'RELU': 'ReLU',
    'SIGMOID': 'Sigmoid',
    'SIGMOID_CROSS_ENTROPY_LOSS': 'SigmoidCrossEntropyLoss',
    'SILENCE': 'Silence',
    'SOFTMAX': 'Softmax',
    'SOFTMAX_LOSS': 'SoftmaxWithLoss',
    'SPLIT': 'Split',
    'SLICE': 'Slice',
    'TANH': 'TanH',
    'WINDOW_DATA': 'WindowData',
    'THRESHOLD': 'Threshold',
    # forks whose V1 nets we read: CRF-as-RNN, DeepLab v1 (string names as
    # in DeepLab v2 / the CRF-as-RNN port to current Caffe)
    'CROP': 'Crop',
    'MULTI_STAGE_MEANFIELD': 'MultiStageMeanfield',
    'INTERP': 'Interp',
    'IMAGE_SEG_DATA': 'ImageSegData',
    'SEG_ACCURACY': 'SegAccuracy',
    'DENSE_CRF': 'DenseCRF',
    'MAT_WRITE': 'MatWrite',
    'MAT_READ': 'MatRead',
    'BIAS_CHANNEL': 'BiasChannel',
    'UNIQUE_LABEL': 'UniqueLabel',
    'ADAPTIVE_BIAS_CHANNEL': 'AdaptiveBiasChannel',
    # DeepLab v1's PADDING layer has no counterpart in current Caffe
    'PADDING': None,
}

# V0 type string -> V1 enum name.
V0_TYPE_NAMES = {
    'accuracy': 'ACCURACY', 'bnll': 'BNLL', 'concat': 'CONCAT', 'conv': 'CONVOLUTION',
    'data': 'DATA', 'dropout': 'DROPOUT', 'euclidean_loss': 'EUCLIDEAN_LOSS',
    'flatten': 'FLATTEN', 'hdf5_data': 'HDF5_DATA', 'hdf5_output': 'HDF5_OUTPUT',
    'im2col': 'IM2COL', 'images': 'IMAGE_DATA', 'infogain_loss': 'INFOGAIN_LOSS',
    'innerproduct': 'INNER_PRODUCT', 'lrn': 'LRN',
    'multinomial_logistic_loss': 'MULTINOMIAL_LOGISTIC_LOSS', 'pool': 'POOLING',
    'relu': 'RELU', 'sigmoid': 'SIGMOID', 'softmax': 'SOFTMAX', 'softmax_loss': 'SOFTMAX_LOSS',
    'split': 'SPLIT', 'tanh': 'TANH', 'window_data': 'WINDOW_DATA',
}

# V0 field -> {v0 type: (V1 sub-message, field in it, how)} where how is 'set',
# 'add' (repeated target) or 'copy' (message).
V0_FIELD_MAP = {
    'num_output': {'conv': ('convolution_param', 'num_output', 'set'),
                   'innerproduct': ('inner_product_param', 'num_output', 'set')},
    'biasterm': {'conv': ('convolution_param', 'bias_term', 'set'),
                 'innerproduct': ('inner_product_param', 'bias_term', 'set')},
    'weight_filler': {'conv': ('convolution_param', 'weight_filler', 'copy'),
                      'innerproduct': ('inner_product_param', 'weight_filler', 'copy')},
    'bias_filler': {'conv': ('convolution_param', 'bias_filler', 'copy'),
                    'innerproduct': ('inner_product_param', 'bias_filler', 'copy')},
    'pad': {'conv': ('convolution_param', 'pad', 'add'), 'pool': ('pooling_param', 'pad', 'set')},
    'kernelsize': {'conv': ('convolution_param', 'kernel_size', 'add'),
                   'pool': ('pooling_param', 'kernel_size', 'set')},
    'group': {'conv': ('convolution_param', 'group', 'set')},
    'stride': {'conv': ('convolution_param', 'stride', 'add'),
               'pool': ('pooling_param', 'stride', 'set')},
    'pool': {'pool': ('pooling_param', 'pool', 'set')},
    'dropout_ratio': {'dropout': ('dropout_param', 'dropout_ratio', 'set')},
    'local_size': {'lrn': ('lrn_param', 'local_size', 'set')},
    'alpha': {'lrn': ('lrn_param', 'alpha', 'set')},
    'beta': {'lrn': ('lrn_param', 'beta', 'set')},
    'k': {'lrn': ('lrn_param', 'k', 'set')},
    'source': {'data': ('data_param', 'source', 'set'),
               'hdf5_data': ('hdf5_data_param', 'source', 'set'),
               'images': ('image_data_param', 'source', 'set'),
               'window_data': ('window_data_param', 'source', 'set'),
               'infogain_loss': ('infogain_loss_param', 'source', 'set')},
    'batchsize': {'data': ('data_param', 'batch_size', 'set'),
                  'hdf5_data': ('hdf5_data_param', 'batch_size', 'set'),
                  'images': ('image_data_param', 'batch_size', 'set'),
                  'window_data': ('window_data_param', 'batch_size', 'set')},
    'rand_skip': {'data': ('data_param', 'rand_skip', 'set'),
                  'images': ('image_data_param', 'rand_skip', 'set')},
    'shuffle_images': {'images': ('image_data_param', 'shuffle', 'set')},
    'new_height': {'images': ('image_data_param', 'new_height', 'set')},
    'new_width': {'images': ('image_data_param', 'new_width', 'set')},
    'concat_dim': {'concat': ('concat_param', 'concat_dim', 'set')},
    'det_fg_threshold': {'window_data': ('window_data_param', 'fg_threshold', 'set')},
    'det_bg_threshold': {'window_data': ('window_data_param', 'bg_threshold', 'set')},
    'det_fg_fraction': {'window_data': ('window_data_param', 'fg_fraction', 'set')},
    'det_context_pad': {'window_data': ('window_data_param', 'context_pad', 'set')},
    'det_crop_mode': {'window_data': ('window_data_param', 'crop_mode', 'set')},
    'hdf5_output_param': {'hdf5_output': ('hdf5_output_param', None, 'copy')},
}
# V0 fields that go to transform_param whatever the layer type.
V0_TRANSFORM = {'scale': 'scale', 'meanfile': 'mean_file', 'cropsize': 'crop_size',
                'mirror': 'mirror'}
# V0 fields that are ignored by Caffe's upgrade (no V1 equivalent is written).
V0_IGNORED = {'name', 'type', 'blobs', 'blobs_lr', 'weight_decay', 'new_num', 'new_channels'}

V0_POOL = {0: 'MAX', 1: 'AVE', 2: 'STOCHASTIC'}

SOLVER_TYPES = {0: 'SGD', 1: 'Nesterov', 2: 'AdaGrad', 3: 'RMSProp', 4: 'AdaDelta', 5: 'Adam'}


def needs_upgrade(net):
    """True when ``net`` uses any legacy construct that ``upgrade_net_param`` rewrites."""
    if len(net.layers) or len(net.input):
        return True
    for layer in net.layer:
        if layer.type == 'BatchNorm' and len(layer.param) == 3:
            return True
        if layer.HasField('convolution_param') and _has_hole(layer.convolution_param):
            return True
    return False


def upgrade_net_param(net, source=None):
    """Upgraded copy of a NetParameter and the list of warnings (strings) it produced.

    ``source`` (a file name) only appears in messages.  Things Caffe refuses
    (``layer`` and ``layers`` both present, a V1/V0 type we cannot name)
    raise CrfGradError naming the layer and field.
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    warnings = []
    if any(l.HasField('layer') for l in out.layers):
        warnings.append('upgraded V0 layer definitions (layers { layer { ... } })')
        _v0_to_v1(out, source, warnings)
    if _needs_data_upgrade(out):
        warnings.append('moved data-layer transformation fields into transform_param')
        _upgrade_data_transform(out)
    if len(out.layers):
        if len(out.layer):
            raise CrfGradError("the net has both 'layer' and 'layers' (V1) entries; "
                               "use only 'layer'", file=source, field='layers')
        warnings.append('upgraded V1 layer definitions (layers { type: ENUM })')
        _v1_to_v2(out, source)
    if len(out.input):
        warnings.append('turned net inputs (input/input_dim/input_shape) into an Input layer')
        _upgrade_input(out, source)
    for layer in out.layer:
        if layer.type == 'BatchNorm' and len(layer.param) == 3:
            warnings.append('layer %r: BatchNorm ParamSpecs set to lr_mult 0, decay_mult 0'
                            % layer.name)
            for p in layer.param:
                p.lr_mult = 0.0
                p.decay_mult = 0.0
        if layer.HasField('convolution_param') and _has_hole(layer.convolution_param):
            warnings.append('layer %r: convolution_param hole -> dilation' % layer.name)
            _hole_to_dilation(layer, source)
    return out, warnings


# --------------------------------------------------------------------------- V0

def _v0_to_v1(net, source, warnings):
    entries = _drop_v0_padding(net, source)
    del net.layers[:]
    for old in entries:
        new = net.layers.add()
        _v0_layer_to_v1(old, new, source, warnings)


def _drop_v0_padding(net, source):
    """V1 entries without V0 'padding' layers; consumers get the pad and the padded input."""
    last_top = {name: None for name in net.input}
    kept = []
    for entry in net.layers:
        v0 = entry.layer
        ltype = v0.type
        copy = None
        if ltype != 'padding':
            copy = V1()
            copy.CopyFrom(entry)
            kept.append(copy)
        for j, bottom in enumerate(entry.bottom):
            # (an unknown bottom is left for the net to report: weights files
            # often lack the net inputs)
            producer = last_top.get(bottom)
            if producer is None or producer.layer.type != 'padding':
                continue
            if ltype not in ('conv', 'pool'):
                raise CrfGradError('a V0 padding layer feeds layer type %r (only conv and pool '
                                   'can absorb padding)' % ltype, file=source,
                                   layer=v0.name or None, field='type')
            if len(entry.bottom) != 1 or len(producer.bottom) != 1 or len(producer.top) != 1:
                raise CrfGradError('V0 padding needs one bottom and one top on both layers',
                                   file=source, layer=v0.name or None, field='bottom')
            copy.layer.pad = producer.layer.pad
            copy.bottom[j] = producer.bottom[0]
        for top in entry.top:
            last_top[top] = entry
    return kept


def _v0_layer_to_v1(old, new, source, warnings):
    new.bottom.extend(old.bottom)
    new.top.extend(old.top)
    if not old.HasField('layer'):
        return
    v0 = old.layer
    lname = v0.name or None
    if v0.HasField('name'):
        new.name = v0.name
    ltype = v0.type
    if v0.HasField('type'):
        if ltype not in V0_TYPE_NAMES:
            raise CrfGradError('unknown V0 layer type %r' % ltype, file=source, layer=lname,
                               field='type')
        new.type = V1.LayerType.Value(V0_TYPE_NAMES[ltype])
    new.blobs.extend(v0.blobs)
    new.blobs_lr.extend(v0.blobs_lr)
    new.weight_decay.extend(v0.weight_decay)
    for fd, value in v0.ListFields():
        name = fd.name
        if name in V0_IGNORED:
            continue
        if name in V0_TRANSFORM:
            setattr(new.transform_param, V0_TRANSFORM[name], value)
            continue
        targets = V0_FIELD_MAP.get(name)
        if targets is None or ltype not in targets:
            warnings.append('layer %r: V0 field %r is not used by type %r; dropped'
                            % (v0.name, name, ltype))
            continue
        sub_name, field, how = targets[ltype]
        sub = getattr(new, sub_name)
        if name == 'pool':
            value = caffe_pb2.PoolingParameter.PoolMethod.Value(V0_POOL[value])
        if how == 'set':
            setattr(sub, field, value)
        elif how == 'add':
            getattr(sub, field).append(value)
        elif field is None:
            sub.CopyFrom(value)
        else:
            getattr(sub, field).CopyFrom(value)


# ------------------------------------------------------------- data transform

_DATA_PARAMS = {'DATA': 'data_param', 'IMAGE_DATA': 'image_data_param',
                'WINDOW_DATA': 'window_data_param'}
_TRANSFORM_FIELDS = ('scale', 'mean_file', 'crop_size', 'mirror')


def _data_param_of(entry):
    name = V1.LayerType.Name(entry.type) if entry.type in V1.LayerType.values() else None
    pname = _DATA_PARAMS.get(name)
    if pname is None or not entry.HasField(pname):
        return None
    sub = getattr(entry, pname)
    fields = {f.name for f in sub.DESCRIPTOR.fields}
    return sub if all(f in fields for f in _TRANSFORM_FIELDS) else None


def _needs_data_upgrade(net):
    for entry in net.layers:
        sub = _data_param_of(entry)
        if sub is not None and any(sub.HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def _upgrade_data_transform(net):
    for entry in net.layers:
        sub = _data_param_of(entry)
        if sub is None:
            continue
        for f in _TRANSFORM_FIELDS:
            if sub.HasField(f):
                setattr(entry.transform_param, f, getattr(sub, f))
                sub.ClearField(f)


# --------------------------------------------------------------------------- V1

_V1_SPECIAL = {'bottom', 'top', 'name', 'type', 'include', 'exclude', 'blobs', 'param',
               'blob_share_mode', 'blobs_lr', 'weight_decay', 'loss_weight', 'layer'}


def v1_type_string(entry, source=None):
    """Current type string of a V1 entry; CrfGradError for enums without one."""
    value = entry.type
    try:
        enum_name = V1.LayerType.Name(value)
    except ValueError:
        enum_name = None
    if enum_name is None or V1_TYPE_NAMES.get(enum_name) is None:
        raise CrfGradError('V1 layer type %s has no current layer type; it cannot be upgraded'
                           % (enum_name or value), file=source, layer=entry.name or None,
                           field='type')
    return V1_TYPE_NAMES[enum_name]


def _repeated(fd):
    flag = getattr(fd, 'is_repeated', None)
    if flag is None:  # protobuf < 5.x
        return fd.label == fd.LABEL_REPEATED
    return flag() if callable(flag) else bool(flag)


def _v1_to_v2(net, source):
    entries = list(net.layers)
    del net.layers[:]
    for entry in entries:
        layer = net.layer.add()
        _v1_layer_to_v2(entry, layer, source)


def _param_spec(layer, i):
    while len(layer.param) <= i:
        layer.param.add()
    return layer.param[i]


def _v1_layer_to_v2(entry, layer, source):
    layer.bottom.extend(entry.bottom)
    layer.top.extend(entry.top)
    if entry.HasField('name'):
        layer.name = entry.name
    layer.include.extend(entry.include)
    layer.exclude.extend(entry.exclude)
    if entry.HasField('type'):
        layer.type = v1_type_string(entry, source)
    layer.blobs.extend(entry.blobs)
    for i, name in enumerate(entry.param):
        _param_spec(layer, i).name = name
    for i, mode in enumerate(entry.blob_share_mode):
        _param_spec(layer, i).share_mode = mode
    for i, v in enumerate(entry.blobs_lr):
        _param_spec(layer, i).lr_mult = v
    for i, v in enumerate(entry.weight_decay):
        _param_spec(layer, i).decay_mult = v
    layer.loss_weight.extend(entry.loss_weight)
    if entry.HasField('layer'):
        raise CrfGradError('a V1 entry still holds a V0 layer definition', file=source,
                           layer=entry.name or None, field='layer')
    target_fields = layer.DESCRIPTOR.fields_by_name
    for fd, value in entry.ListFields():
        if fd.name in _V1_SPECIAL:
            continue
        tfd = target_fields.get(fd.name)
        same = tfd is not None and tfd.type == fd.type and _repeated(tfd) == _repeated(fd) and (
            fd.message_type is None or tfd.message_type.full_name == fd.message_type.full_name)
        if not same:
            raise CrfGradError('V1 field %r has no counterpart in the current LayerParameter'
                               % fd.name, file=source, layer=entry.name or None, field=fd.name)
        if fd.message_type is not None:
            getattr(layer, fd.name).CopyFrom(value)
        else:
            setattr(layer, fd.name, value)
    # DeepLab v1 loss: softmaxloss_param { ignore_label: L } -> loss_param.ignore_label
    if layer.HasField('softmaxloss_param') and len(layer.softmaxloss_param.ignore_label) == 1 \
            and not layer.loss_param.HasField('ignore_label'):
        layer.loss_param.ignore_label = layer.softmaxloss_param.ignore_label[0]


# ------------------------------------------------------------------------ input

def _upgrade_input(net, source):
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        n = len(net.input)
        if has_shape and len(net.input_shape) != n:
            raise CrfGradError('%d inputs but %d input_shape entries'
                               % (n, len(net.input_shape)), file=source, field='input_shape')
        if not has_shape and len(net.input_dim) != 4 * n:
            raise CrfGradError('%d inputs need %d input_dim values, found %d'
                               % (n, 4 * n, len(net.input_dim)), file=source, field='input_dim')
        layer = caffe_pb2.LayerParameter(name='input', type='Input')
        for i, top in enumerate(net.input):
            layer.top.append(top)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layers = [layer] + list(net.layer)
        del net.layer[:]
        net.layer.extend(layers)
    net.ClearField('input')
    net.ClearField('input_shape')
    net.ClearField('input_dim')


# ------------------------------------------------------------------ DeepLab hole

def _has_hole(conv):
    fields = conv.DESCRIPTOR.fields_by_name
    return 'hole' in fields and conv.HasField('hole') or \
        any(f in fields and conv.HasField(f) for f in ('hole_h', 'hole_w'))


def _hole_to_dilation(layer, source):
    conv = layer.convolution_param
    fields = conv.DESCRIPTOR.fields_by_name
    hole = conv.hole if conv.HasField('hole') else None
    hh = conv.hole_h if 'hole_h' in fields and conv.HasField('hole_h') else hole
    hw = conv.hole_w if 'hole_w' in fields and conv.HasField('hole_w') else hole
    hh = 1 if hh is None else hh
    hw = 1 if hw is None else hw
    if len(conv.dilation):
        raise CrfGradError('both hole and dilation are set', file=source, layer=layer.name,
                           field='hole')
    if hh == hw:
        if hh != 1:
            conv.dilation.append(hh)
    else:
        conv.dilation.extend([hh, hw])
    for f in ('hole', 'hole_h', 'hole_w'):
        if f in fields:
            conv.ClearField(f)


# ----------------------------------------------------------------------- solver

def solver_needs_upgrade(sp):
    return sp.HasField('solver_type')


def upgrade_solver_param(sp, source=None):
    """Upgraded copy of a SolverParameter: deprecated ``solver_type`` enum -> ``type`` string."""
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(sp)
    if out.HasField('solver_type'):
        if out.HasField('type'):
            raise CrfGradError('both solver_type (deprecated enum) and type are set; keep only '
                               'type', file=source, field='solver_type')
        value = out.solver_type
        if value not in SOLVER_TYPES:
            raise CrfGradError('unknown solver_type %d' % value, file=source, field='solver_type')
        out.type = SOLVER_TYPES[value]
        out.ClearField('solver_type')
    return out
