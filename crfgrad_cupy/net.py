"""The layer-graph executor with pycaffe's API.

    net = Net('deploy.prototxt', 'weights.caffemodel', TEST)   # or Net(proto, TEST, weights=...)
    net.blobs['data'].data[...] = x
    out = net.forward()                 # {output name: array}
    grads = net.backward(**{'prob': g}) # {input name: diff}
    net.params['conv1'][0].data

Building follows Caffe's Net::Init: filter layers by the net state (phase, level, stages),
insert Split layers where a blob feeds several layers, set up each layer in order, share
parameters named alike, decide which layers need backward (Caffe's rule, or all of them
with ``force_backward``), and remember each parameter's lr_mult/decay_mult for the solver.
"""
import collections
import logging
import os

import numpy as np

from . import backend
from .blob import Blob
from .errors import CrfGradError
from .layers import create_layer
from .proto import caffe_pb2

log = logging.getLogger('crfgrad_cupy')

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


# --- net description transforms (pure, on NetParameter) ------------------------------------

def state_meets_rule(state, rule):
    """Caffe's StateMeetsRule: phase, level range, required stages and excluded stages."""
    if rule.HasField('phase') and rule.phase != state.phase:
        return False
    if rule.HasField('min_level') and state.level < rule.min_level:
        return False
    if rule.HasField('max_level') and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(net_param, state, source=None):
    """A copy of ``net_param`` holding only the layers the state includes."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    for lp in net_param.layer:
        if lp.include and lp.exclude:
            raise CrfGradError('specify either include or exclude rules, not both', file=source,
                               layer=lp.name, field='include')
        if lp.include:
            keep = any(state_meets_rule(state, r) for r in lp.include)
        else:
            keep = not any(state_meets_rule(state, r) for r in lp.exclude)
        if keep:
            out.layer.add().CopyFrom(lp)
    return out


def split_layer_name(blob, layer, top_index):
    return '%s_%s_%d_split' % (blob, layer, top_index)


def split_blob_name(blob, layer, top_index, split_index):
    return '%s_%s_%d_split_%d' % (blob, layer, top_index, split_index)


def insert_splits(net_param, source=None):
    """Caffe's InsertSplits: a Split layer after every top that several bottoms read."""
    last_top = {}                      # blob name -> (layer index, top index)
    source_of = {}                     # (layer, bottom) -> (layer, top)
    readers = collections.Counter()    # (layer, top) -> number of bottoms reading it
    loss_weighted = {}
    for i, lp in enumerate(net_param.layer):
        for j, name in enumerate(lp.bottom):
            if name not in last_top:
                raise CrfGradError('bottom blob %r is not produced by any earlier layer' % name,
                                   file=source, layer=lp.name, field='bottom')
            src = last_top[name]
            source_of[(i, j)] = src
            readers[src] += 1
        for j, name in enumerate(lp.top):
            last_top[name] = (i, j)
            if j < len(lp.loss_weight) and lp.loss_weight[j] != 0:
                loss_weighted[(i, j)] = lp.loss_weight[j]
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    used = collections.Counter()
    for i, lp in enumerate(net_param.layer):
        new = out.layer.add()
        new.CopyFrom(lp)
        for j, name in enumerate(lp.bottom):
            src = source_of[(i, j)]
            if readers[src] > 1:
                src_layer = net_param.layer[src[0]].name
                new.bottom[j] = split_blob_name(name, src_layer, src[1], used[src])
                used[src] += 1
        for j, name in enumerate(lp.top):
            n = readers[(i, j)]
            extra = 1 if (i, j) in loss_weighted else 0
            if n + extra > 1 and n > 0:
                split = out.layer.add()
                split.name = split_layer_name(name, lp.name, j)
                split.type = 'Split'
                split.bottom.append(name)
                for k in range(n + extra):
                    split.top.append(split_blob_name(name, lp.name, j, k))
                    if extra and k == 0:
                        split.loss_weight.append(loss_weighted[(i, j)])
                    elif extra:
                        split.loss_weight.append(0)
                if extra:
                    del new.loss_weight[:]
    return out


def _read_net_param(source):
    from .io.prototxt import load_net_param
    return load_net_param(source)


def _read_weights(path):
    """OrderedDict layer name -> list of NumPy arrays, from a caffemodel or Caffe HDF5 file."""
    from .io.hdf5_weights import load_weights
    return load_weights(path)


def fit_blob(*args, **kwargs):
    from .io.caffemodel import fit_blob as _fit
    return _fit(*args, **kwargs)


# --- the net ------------------------------------------------------------------------------

class Net:
    """A Caffe network on NumPy/CuPy.

    ``Net(network_file, phase, level=0, stages=None, weights=None)`` or
    ``Net(network_file, weights, phase)`` as in pycaffe.  ``network_file`` may also be a
    NetParameter or prototxt text.
    """

    def __init__(self, network, *args, phase=None, weights=None, level=0, stages=None):
        args = list(args)
        if args and isinstance(args[0], (str, os.PathLike)):
            weights = args.pop(0)
        if args:
            phase = args.pop(0)
        if args:
            raise TypeError('Net(network, [weights,] phase): too many positional arguments')
        if phase is None:
            phase = TEST
        if phase not in (TRAIN, TEST):
            raise CrfGradError('phase must be TRAIN (0) or TEST (1), got %r' % (phase,))
        self.source = network if isinstance(network, (str, os.PathLike)) and os.path.exists(str(network)) \
            else None
        param = _read_net_param(network)
        state = caffe_pb2.NetState()
        state.CopyFrom(param.state)
        state.phase = phase
        state.level = level
        if stages:
            del state.stage[:]
            state.stage.extend(stages)
        self.phase = phase
        self._init(param, state)
        if weights:
            self.copy_from(weights)

    # -- construction --------------------------------------------------------------------
    def _init(self, param, state):
        src = str(self.source) if self.source else None
        filtered = filter_net(param, state, src)
        self.net_param = insert_splits(filtered, src)
        self.name = param.name
        self.force_backward = param.force_backward
        self.blobs = collections.OrderedDict()
        self.layers = []
        self._layer_names = []
        self.layer_dict = collections.OrderedDict()
        self.bottom_names = collections.OrderedDict()
        self.top_names = collections.OrderedDict()
        self._bottom_blobs = []
        self._top_blobs = []
        self._inputs = []
        self._param_owner = {}          # shared param name -> (layer name, index)
        self.param_specs = collections.OrderedDict()   # layer name -> list of (lr_mult, decay_mult)
        self.learnable_params = []      # unique Blob objects, in Caffe's order
        self._learnable_ids = set()
        self.param_lr_mult = []
        self.param_decay_mult = []
        self.param_names = []           # "layer/index" of each learnable param (owner's)
        blob_need_backward = {}
        self._layer_need_backward = []
        self._bottom_need_backward = []
        available = collections.OrderedDict()

        for lp in self.net_param.layer:
            if lp.name in self.layer_dict:
                raise CrfGradError('duplicate layer name', file=src, layer=lp.name, field='name')
            layer = create_layer(lp, state.phase, src)
            if lp.blobs:
                from .io.blobproto import blob_to_array
                for bp in lp.blobs:
                    b = Blob(())
                    b.data = blob_to_array(bp, source=src, layer=lp.name)
                    layer.blobs.append(b)
            bottoms, tops = [], []
            need_backward = False
            bnb = []
            for j, name in enumerate(lp.bottom):
                if name not in self.blobs:
                    raise CrfGradError('unknown bottom blob %r' % name, file=src, layer=lp.name,
                                       field='bottom')
                bottoms.append(self.blobs[name])
                nb = blob_need_backward.get(name, False)
                if lp.propagate_down:
                    if len(lp.propagate_down) != len(lp.bottom):
                        raise CrfGradError('propagate_down must be given once per bottom', file=src,
                                           layer=lp.name, field='propagate_down')
                    nb = bool(lp.propagate_down[j])
                bnb.append(nb)
                need_backward |= nb
                available.pop(name, None)
            top_names = list(lp.top) + self._auto_top_names(layer, len(lp.top))
            for name in top_names:
                if name in lp.bottom:
                    tops.append(self.blobs[name])           # in place
                else:
                    if name in self.blobs:
                        log.warning('%s: layer %r overwrites blob %r', src or 'net', lp.name, name)
                    self.blobs[name] = Blob(())
                    tops.append(self.blobs[name])
                available[name] = True
            if lp.type == 'Input':
                self._inputs.extend(lp.top)
            try:
                layer.setup(bottoms, tops)
            except CrfGradError as exc:
                if exc.file is None and src and not str(exc).startswith(src):
                    raise CrfGradError(str(exc), file=src) from exc
                raise
            self._share_and_register_params(lp, layer, src)
            for j, spec_ok in enumerate(layer.param_propagate_down):
                lr = lp.param[j].lr_mult if j < len(lp.param) else 1.0
                layer.param_propagate_down[j] = lr != 0
                need_backward |= lr != 0
            for name in top_names:
                blob_need_backward[name] = blob_need_backward.get(name, False) or need_backward \
                    if name in lp.bottom else need_backward
            self.layers.append(layer)
            self._layer_names.append(lp.name)
            self.layer_dict[lp.name] = layer
            self.bottom_names[lp.name] = list(lp.bottom)
            self.top_names[lp.name] = top_names
            self._bottom_blobs.append(bottoms)
            self._top_blobs.append(tops)
            self._layer_need_backward.append(need_backward)
            self._bottom_need_backward.append(bnb)

        self._outputs = list(available)
        self._prune_backward(blob_need_backward)
        self.params = collections.OrderedDict(
            (name, layer.blobs) for name, layer in zip(self._layer_names, self.layers) if layer.blobs)

    def _auto_top_names(self, layer, given):
        """Caffe's AutoTopBlobs: anonymous tops for a layer given fewer than it needs."""
        if not layer.auto_top_blobs:
            return []
        needed = max(layer.exact_num_top or 0, layer.min_top or 0, 1 if layer.is_loss else 0)
        names = []
        for _ in range(given, needed):
            name, k = '(automatic)', 0
            while name in self.blobs or name in names:
                k += 1
                name = '(automatic)_%d' % k
            names.append(name)
        return names

    def _share_and_register_params(self, lp, layer, src):
        specs = []
        for j, blob in enumerate(layer.blobs):
            spec = lp.param[j] if j < len(lp.param) else caffe_pb2.ParamSpec()
            specs.append((spec.lr_mult, spec.decay_mult))
            pname = spec.name
            if pname and pname in self._param_owner:
                owner_layer, owner_idx = self._param_owner[pname]
                owner = self.layer_dict[owner_layer].blobs[owner_idx]
                if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
                    ok = owner.count == blob.count
                else:
                    ok = owner.shape == blob.shape
                if not ok:
                    raise CrfGradError('shared parameter %r has shape %s here but %s in layer %r'
                                       % (pname, blob.shape, owner.shape, owner_layer), file=src,
                                       layer=lp.name, field='param.name')
                layer.blobs[j] = owner
                # Caffe: a sharer's lr_mult, if set, must match the owner's; the owner's spec rules
                continue
            if pname:
                self._param_owner[pname] = (lp.name, j)
            if id(blob) not in self._learnable_ids:
                self._learnable_ids.add(id(blob))
                self.learnable_params.append(blob)
                self.param_lr_mult.append(spec.lr_mult)
                self.param_decay_mult.append(spec.decay_mult)
                self.param_names.append('%s/%d' % (lp.name, j))
        self.param_specs[lp.name] = specs

    def _prune_backward(self, blob_need_backward):
        """Caffe's rule: only layers under a loss do backward; force_backward makes all do it."""
        under_loss, skip = set(), set()
        for i in range(len(self.layers) - 1, -1, -1):
            layer, lp = self.layers[i], self.net_param.layer[i]
            contributes, skip_down = False, True
            for j, name in enumerate(self.top_names[lp.name]):
                if layer.loss_weights[j] != 0 or name in under_loss:
                    contributes = True
                if name not in skip:
                    skip_down = False
                if contributes and not skip_down:
                    break
            if self._layer_need_backward[i] and skip_down:
                self._layer_need_backward[i] = False
                self._bottom_need_backward[i] = [False] * len(lp.bottom)
            if not contributes:
                self._layer_need_backward[i] = False
            for j, name in enumerate(lp.bottom):
                if contributes:
                    under_loss.add(name)
                else:
                    self._bottom_need_backward[i][j] = False
                if not self._bottom_need_backward[i][j]:
                    skip.add(name)
        if self.force_backward:
            for i, layer in enumerate(self.layers):
                self._layer_need_backward[i] = True
                self._bottom_need_backward[i] = [
                    nb or layer.allow_force_backward(j) for j, nb in enumerate(self._bottom_need_backward[i])]
                layer.param_propagate_down = [True] * len(layer.blobs)

    # -- pycaffe surface -----------------------------------------------------------------
    @property
    def inputs(self):
        return list(self._inputs)

    @property
    def outputs(self):
        return list(self._outputs)

    @property
    def layer_names(self):
        return list(self._layer_names)

    @property
    def blob_loss_weights(self):
        out = collections.OrderedDict((name, 0.0) for name in self.blobs)
        for layer, tops in zip(self.layers, self.top_names.values()):
            for name, w in zip(tops, layer.loss_weights):
                out[name] = w
        return out

    def _index(self, layer_name, default):
        if layer_name is None:
            return default
        if layer_name not in self.layer_dict:
            raise CrfGradError('no layer named %r' % layer_name)
        return self._layer_names.index(layer_name)

    def _blob_and_value(self, name, value):
        """The blob ``name`` and ``value`` as an array of the current mode in the blob's dtype."""
        if name not in self.blobs:
            raise CrfGradError('no blob named %r' % name)
        blob = self.blobs[name]
        return blob, backend.xp().asarray(value, dtype=blob.dtype)

    def _set_inputs(self, kwargs):
        for name, value in kwargs.items():
            blob, value = self._blob_and_value(name, value)
            if value.shape != blob.shape:
                if name not in self._inputs:
                    raise CrfGradError('blob %r has shape %s, got %s' % (name, blob.shape, value.shape))
                blob.reshape(*value.shape)
            blob.data[...] = value

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """Run layers from ``start`` to ``end`` (names, inclusive); returns {output: data}.

        Keyword arguments set input blobs first (the net is reshaped when their shape changes)."""
        reshaped = False
        for name, value in kwargs.items():
            if name in self.blobs and tuple(np.shape(value)) != self.blobs[name].shape:
                reshaped = True
        self._set_inputs(kwargs)
        if reshaped:
            self.reshape()
        i0 = self._index(start, 0)
        i1 = self._index(end, len(self.layers) - 1)
        self._forward_range(i0, i1)
        outs = self._outputs if end is None else self.top_names[end]
        result = collections.OrderedDict((name, self.blobs[name].data) for name in outs)
        for name in (blobs or []):
            result[name] = self.blobs[name].data
        return result

    def _forward_range(self, i0, i1):
        loss = 0.0
        for i in range(i0, i1 + 1):
            layer = self.layers[i]
            layer.reshape(self._bottom_blobs[i], self._top_blobs[i])
            layer.forward(self._bottom_blobs[i], self._top_blobs[i])
            for top, w in zip(self._top_blobs[i], layer.loss_weights):
                if w != 0:
                    loss += w * float(top.data.sum())
        return loss

    def forward_loss(self):
        """Forward through the whole net; returns the weighted loss (Caffe's Net::Forward)."""
        return self._forward_range(0, len(self.layers) - 1)

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """Backward from ``start`` down to ``end``; kwargs set output diffs first.

        Returns {input name: diff} (plus the blobs named in ``diffs``)."""
        for name, value in kwargs.items():
            blob, value = self._blob_and_value(name, value)
            if value.shape != blob.shape:
                raise CrfGradError('diff for %r has shape %s, blob has %s' % (name, value.shape, blob.shape))
            blob.diff[...] = value
        i0 = self._index(start, len(self.layers) - 1)
        i1 = self._index(end, 0)
        self._backward_range(i0, i1)
        names = list(self._inputs) if end is None else list(self.bottom_names[end])
        result = collections.OrderedDict((name, self.blobs[name].diff) for name in names)
        for name in (diffs or []):
            result[name] = self.blobs[name].diff
        return result

    def _backward_range(self, i0, i1):
        for i in range(i0, i1 - 1, -1):
            if self._layer_need_backward[i]:
                self.layers[i].backward(self._top_blobs[i], self._bottom_need_backward[i],
                                        self._bottom_blobs[i])

    def forward_backward(self):
        loss = self.forward_loss()
        self._backward_range(len(self.layers) - 1, 0)
        return loss

    def reshape(self):
        for i, layer in enumerate(self.layers):
            layer.reshape(self._bottom_blobs[i], self._top_blobs[i])

    def clear_param_diffs(self):
        for blob in self.learnable_params:
            blob.zero_diff()
            blob.diff[...] = 0

    def layer_need_backward(self, name):
        return self._layer_need_backward[self._layer_names.index(name)]

    # -- weights -------------------------------------------------------------------------
    def copy_from(self, path, weights=None):
        """Copy parameters by layer name from a .caffemodel or Caffe HDF5 file.

        ``weights``: the file's contents when already loaded (io.hdf5_weights.load_weights), so
        the file is not read again.  Returns the names of layers in the file that match no layer
        here (they are logged)."""
        if weights is None:
            weights = _read_weights(path)
        unmatched = []
        for name, arrays in weights.items():
            layer = self.layer_dict.get(name)
            if layer is None:
                if arrays:
                    unmatched.append(name)
                continue
            if len(arrays) != len(layer.blobs):
                raise CrfGradError('%d parameter blobs in the file, %d in the net' % (len(arrays),
                                   len(layer.blobs)), file=str(path), layer=name, field='blobs')
            for j, arr in enumerate(arrays):
                target = layer.blobs[j]
                arr = fit_blob(np.asarray(arr), target.shape, (name, j) in getattr(weights, 'legacy', ()),
                               source=str(path), layer=name, index=j)
                target.data[...] = backend.xp().asarray(arr, dtype=target.dtype)
        if unmatched:
            log.info('%s: layers with weights that match no layer of the net: %s', path, ', '.join(unmatched))
        return unmatched

    def to_net_param(self, write_diff=False):
        """NetParameter of the instantiated net (Input and Split layers included) with its blobs."""
        from .io.blobproto import array_to_blob
        out = caffe_pb2.NetParameter()
        out.name = self.name
        for lp, layer in zip(self.net_param.layer, self.layers):
            new = out.layer.add()
            new.CopyFrom(lp)
            del new.blobs[:]
            for b in layer.blobs:
                new.blobs.add().CopyFrom(array_to_blob(backend.to_numpy(b.data),
                                                       backend.to_numpy(b.diff) if write_diff else None))
        return out

    def weights(self):
        """OrderedDict layer name -> list of NumPy arrays (every layer, blob-less ones with [])."""
        return collections.OrderedDict(
            (name, [backend.to_numpy(b.data) for b in layer.blobs])
            for name, layer in zip(self._layer_names, self.layers))

    def save(self, path, write_diff=False):
        """Binary .caffemodel (Caffe's Net::ToProto + WriteProtoToBinaryFile)."""
        from .io.caffemodel import save_caffemodel
        save_caffemodel(self.to_net_param(write_diff), path)

    def save_hdf5(self, path, write_diff=False):
        """Caffe HDF5 weights: /data/<layer>/<i> (and /diff/... with write_diff)."""
        from .io.hdf5_weights import save_hdf5_weights
        diffs = None
        if write_diff:
            diffs = collections.OrderedDict(
                (name, [backend.to_numpy(b.diff) for b in layer.blobs])
                for name, layer in zip(self._layer_names, self.layers))
        save_hdf5_weights(self.weights(), path, diffs=diffs)

    def share_with(self, other):
        """Use ``other``'s parameter blobs for layers of the same name (train/test nets)."""
        for name, layer in self.layer_dict.items():
            src = other.layer_dict.get(name)
            if src is None or not layer.blobs:
                continue
            for j, b in enumerate(layer.blobs):
                if j < len(src.blobs) and src.blobs[j].shape == b.shape:
                    layer.blobs[j] = src.blobs[j]
        self.params = collections.OrderedDict(
            (name, layer.blobs) for name, layer in zip(self._layer_names, self.layers) if layer.blobs)
