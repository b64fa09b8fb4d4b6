"""Segmentation with a Caffe net: preprocess, forward, map outputs back to the image, score.

    seg = Segmenter.from_files('deploy.prototxt', 'weights.caffemodel')
    res = seg(load_image('horse.jpg'))    # res.probs (L, H, W) at the image's resolution
    res.labels                            # (H, W) uint8 argmax

Outputs are mapped back to the image's full resolution: the padding of the network input
is cropped away first (:class:`~crfgrad_cupy.preprocess.Placement`), then the class maps
are resized bilinearly (half-pixel centres) with two small interpolation matrices.

Scores: :func:`confusion` (accumulated per class), :func:`iou_from_confusion` (IoU per
class and their mean), :func:`evaluate_folder` (a folder with ``images/`` + ``masks/``).
"""
import collections
import contextlib
import logging
import os

import numpy as np

from . import backend
from .errors import CrfGradError
from .preprocess import IMAGE_EXTENSIONS, Preprocessor, load_mask, parse_size
from .proto import caffe_pb2

log = logging.getLogger('crfgrad_cupy')

MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models')


# --- the bundled model ------------------------------------------------------------------------

def default_model_dir(name='horse'):
    return os.path.join(MODELS_DIR, name)


def default_model(name='horse'):
    """(deploy prototxt, weights) of a bundled model; CrfGradError when it is absent."""
    d = default_model_dir(name)
    proto = os.path.join(d, 'deploy.prototxt')
    weights = os.path.join(d, '%s.caffemodel' % name)
    for path in (proto, weights):
        if not os.path.exists(path):
            raise CrfGradError('bundled model file missing (reinstall crfgrad_cupy or run '
                               'tools/train_default_model.py)', file=path)
    return proto, weights


def resolve_model(model, weights=None):
    """``model`` 'default' (or a bundled model's name) -> its files; else the paths as given."""
    if model in ('default', 'horse'):
        proto, w = default_model('horse')
        return proto, weights or w
    return model, weights


def sample_pairs(name='horse'):
    """[(image path, mask path)] of a bundled model's sample images."""
    return sample_pairs_in(default_model_dir(name))


def sample_pairs_in(model_dir):
    """[(image path, mask path)] under ``model_dir``/samples (images/ + masks/); [] if absent."""
    d = os.path.join(model_dir, 'samples')
    return image_mask_pairs(d) if os.path.isdir(d) else []


# --- nets -------------------------------------------------------------------------------------

def _net_param(model):
    from .io.prototxt import load_net_param
    return load_net_param(model)


def enable_energy(net_param):
    """Copy of a NetParameter whose CrfGrad layers also output their energy per step.

    Each CrfGrad layer without an energy top gets ``calculate_energy: true`` and a second
    top ``<layer name>_energy``.  Returns (NetParameter, {layer name: energy blob name})."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    names = collections.OrderedDict()
    for lp in out.layer:
        if lp.type != 'CrfGrad':
            continue
        lp.crfgrad_param.calculate_energy = True
        if len(lp.top) < 2:
            lp.top.append('%s_energy' % lp.name)
        names[lp.name] = lp.top[1]
    return out, names


def load_net(model, weights=None, energy=False):
    """A TEST-phase Net from a prototxt (+ weights).

    A weights file that holds none of the net's parameter layers (the weights of another
    net) is a CrfGradError naming the file; shape mismatches are too (from Net.copy_from).
    Net parameter layers missing from the file keep their initial values (as in Caffe) and
    are logged.  ``energy=True`` switches the CrfGrad energy tops on (:func:`enable_energy`);
    the net then has ``energy_blobs`` {layer: blob}."""
    from .net import Net
    from .io.hdf5_weights import load_weights
    model = os.fspath(model)
    if not os.path.exists(model):
        raise CrfGradError('model file not found', file=model)
    energy_blobs = {}
    if energy:
        param, energy_blobs = enable_energy(_net_param(model))
        try:
            net = Net(param, caffe_pb2.TEST)
        except CrfGradError as exc:
            if exc.file is None:
                raise CrfGradError(str(exc), file=model) from None
            raise
        net.source = model
    else:
        net = Net(model, caffe_pb2.TEST)
    if weights:
        weights = os.fspath(weights)
        held = load_weights(weights)
        with_params = [name for name, layer in net.layer_dict.items() if layer.blobs]
        matched = [name for name in with_params if held.get(name)]
        if with_params and not matched:
            names = [n for n, arrays in held.items() if len(arrays)]
            raise CrfGradError('the weights match none of the %d layers with parameters of %s (the file '
                               'holds %s); weights of another net?'
                               % (len(with_params), os.path.basename(model),
                                  ', '.join(names[:4]) + (' ...' if len(names) > 4 else '') or 'no weights'),
                               file=weights)
        missing = [n for n in with_params if n not in matched]
        if missing:
            log.warning('%s: no weights for layer(s) %s; they keep their initial values', weights,
                        ', '.join(missing))
        net.copy_from(weights, weights=held)
    net.energy_blobs = energy_blobs
    return net


def input_shape(net):
    """(name, shape) of the net's (first) data input."""
    if not net.inputs:
        raise CrfGradError('the net has no Input layer to feed images into', file=net.source)
    name = net.inputs[0]
    return name, net.blobs[name].shape


@contextlib.contextmanager
def compute_config(mode='cpu', dtype=np.float32):
    """Run a block in CPU/GPU mode with a default dtype, restoring both afterwards."""
    old_mode, old_dtype = backend.mode(), backend.default_dtype()
    if mode == 'gpu':
        backend.set_mode_gpu()
    else:
        backend.set_mode_cpu()
    backend.set_default_dtype(dtype)
    try:
        yield
    finally:
        backend.set_default_dtype(old_dtype)
        if old_mode == 'gpu':
            backend.set_mode_gpu()
        else:
            backend.set_mode_cpu()


def run_net(net, data, source=None, input_name=None):
    """Feed one preprocessed input (C, h, w) into the net (reshaping it when the size
    changes) and run forward.  A net that cannot take the input is a CrfGradError naming
    ``source`` (the image)."""
    name = input_name or input_shape(net)[0]
    blob = net.blobs[name]
    want = (1,) + tuple(data.shape)
    try:
        if blob.shape != want:
            blob.reshape(*want)
            net.reshape()
        blob.data[...] = backend.xp().asarray(data[None], dtype=blob.dtype)
        net.forward()
    except CrfGradError as exc:
        raise CrfGradError('the net cannot take this image as a %s input: %s'
                           % ('x'.join(map(str, want)), exc), file=source) from None
    except (ValueError, IndexError) as exc:
        raise CrfGradError('the net cannot take this image as a %s input: %s: %s'
                           % ('x'.join(map(str, want)), type(exc).__name__, exc), file=source) from None


# --- mapping outputs back -------------------------------------------------------------------

def interp_matrix(n_out, n_in, xp=np, dtype=np.float32):
    """(n_out, n_in) linear-interpolation matrix, half-pixel centres, edges clamped."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / float(n_out)) - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    m[rows, i0] += 1 - w1
    m[rows, i1] += w1
    return xp.asarray(m.astype(dtype))


def resize_bilinear(maps, out_hw):
    """(L, h, w) -> (L, H, W) bilinear (half-pixel centres), NumPy or CuPy."""
    xp = backend.get_array_module(maps)
    L, h, w = maps.shape
    H, W = out_hw
    if (h, w) == (H, W):
        return maps
    my = interp_matrix(H, h, xp, maps.dtype)
    mx = interp_matrix(W, w, xp, maps.dtype)
    return xp.matmul(xp.matmul(my, maps), mx.T)


def to_image_resolution(maps, placement):
    """Net-resolution maps (L, h, w) -> (L, H, W) at the image's size: crop padding, resize."""
    vh, vw = placement.valid_region(maps.shape[-2:])
    return resize_bilinear(maps[:, :vh, :vw], placement.orig_hw)


# --- scores -----------------------------------------------------------------------------------

def confusion(pred, gt, num_classes, ignore_label=255):
    """(L, L) int64 confusion (rows: ground truth, columns: prediction); ``ignore_label``
    pixels and ground-truth values >= L are skipped."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    ok = (gt != ignore_label) & (gt >= 0) & (gt < num_classes)
    idx = gt[ok] * num_classes + np.clip(pred[ok], 0, num_classes - 1)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf):
    """(IoU per class (L,), mean IoU): TP / (TP + FP + FN); classes with empty union are NaN
    and left out of the mean."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    valid = iou[~np.isnan(iou)]
    return iou, float(valid.mean()) if valid.size else float('nan')


# --- palettes and pictures --------------------------------------------------------------------

def voc_palette(n=256):
    """(n, 3) uint8 PASCAL VOC colour map (class c's colour from the bits of c)."""
    pal = np.zeros((n, 3), np.uint8)
    for c in range(n):
        r = g = b = 0
        v = c
        for j in range(8):
            r |= ((v >> 0) & 1) << (7 - j)
            g |= ((v >> 1) & 1) << (7 - j)
            b |= ((v >> 2) & 1) << (7 - j)
            v >>= 3
        pal[c] = (r, g, b)
    return pal


def save_label_png(labels, path):
    """Palette PNG (mode P, VOC colours) whose pixel values are the labels."""
    from PIL import Image
    im = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode='P')
    im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


def overlay(image, labels, alpha=0.5):
    """uint8 RGB picture: non-background labels blended over the image in VOC colours."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    col = voc_palette()[np.asarray(labels, dtype=np.uint8)].astype(np.float32)
    out = image.astype(np.float32)
    fg = np.asarray(labels) > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * col[fg]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_rgb_png(img, path):
    from PIL import Image
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)


# --- segmenting -------------------------------------------------------------------------------

Result = collections.namedtuple('Result', ['probs', 'labels', 'blobs', 'energy', 'placement', 'net_blobs'])
Result.__doc__ = """probs: (L, H, W) float32 NumPy of the output blob at the image's resolution;
labels: (H, W) uint8 argmax; blobs: {name: (L, H, W)} of every requested blob at image resolution;
energy: {CrfGrad layer: (T,) energies E(q_t), t = 0..T-1} (empty unless asked for);
placement: where the image went in the input; net_blobs: {name: (1, L, h, w) NumPy} as the net made them."""


class Segmenter:
    """Runs a net on one image at a time and maps its outputs back to the image.

    ``output_blob``: the blob whose argmax gives the labels (default: the net's last
    output); ``extra_blobs``: more blobs to return at image resolution."""

    def __init__(self, net, preprocessor=None, output_blob=None, extra_blobs=(), mode='cpu'):
        self.net = net
        self.input_name, shape = input_shape(net)
        if preprocessor is None:
            preprocessor = Preprocessor(input_size=tuple(shape[2:4]) if len(shape) == 4 else None,
                                        channels=shape[1] if len(shape) > 1 else 3)
        self.pre = preprocessor
        if output_blob is None:
            energy = set(getattr(net, 'energy_blobs', {}).values())
            outputs = [o for o in net.outputs if o not in energy]
            if not outputs:
                raise CrfGradError('the net has no output blob', file=net.source)
            output_blob = outputs[-1]
        for name in (output_blob,) + tuple(extra_blobs):
            if name not in net.blobs:
                raise CrfGradError('no blob named %r (blobs: %s)' % (name, ', '.join(net.blobs)),
                                   file=net.source, field='--output-blob')
        self.output_blob = output_blob
        self.extra_blobs = tuple(b for b in extra_blobs if b != output_blob)
        self.mode = mode

    @classmethod
    def from_files(cls, model, weights=None, output_blob=None, extra_blobs=(), energy=False,
                   mean='imagenet', scale=1.0, channel_swap=(2, 1, 0), input_size='net', resize='fit',
                   mode='cpu'):
        """Build the net and a Preprocessor from the usual options.

        ``mean``: 'imagenet' (B,G,R 104.008,116.669,122.675), None, numbers or a file;
        ``input_size``: 'net' (the Input layer's H x W), 'native' (per-image reshape), S or (H, W)."""
        from .preprocess import IMAGENET_BGR_MEAN
        if mode == 'gpu':
            backend.set_mode_gpu()
        net = load_net(model, weights, energy=energy)
        _, shape = input_shape(net)
        if isinstance(input_size, str) and input_size == 'net':
            size = tuple(shape[2:4]) if len(shape) == 4 and min(shape[2:4]) > 0 else None
        else:
            size = parse_size(input_size)
        pre = Preprocessor(mean=IMAGENET_BGR_MEAN if isinstance(mean, str) and mean == 'imagenet' else mean,
                           scale=scale, channel_swap=channel_swap, input_size=size,
                           resize=resize if size is not None else 'none',
                           channels=shape[1] if len(shape) > 1 else 3)
        return cls(net, pre, output_blob=output_blob, extra_blobs=extra_blobs, mode=mode)

    def forward(self, data, source=None):
        """Feed one preprocessed input (C, h, w) and run the net; errors name ``source``."""
        run_net(self.net, data, source, self.input_name)

    def __call__(self, image, source=None):
        """Segment a uint8 image (H, W, 3) RGB; returns a :class:`Result`."""
        data, placement = self.pre(image)
        self.forward(data, source)
        net = self.net
        names = (self.output_blob,) + self.extra_blobs
        net_blobs = collections.OrderedDict((n, backend.to_numpy(net.blobs[n].data).copy()) for n in names)
        full = collections.OrderedDict()
        for n in names:
            arr = net.blobs[n].data
            if arr.ndim != 4 or arr.shape[0] != 1:
                raise CrfGradError('blob %r has shape %s; want 1 x L x h x w class maps'
                                   % (n, tuple(arr.shape)), file=net.source, field='--output-blob')
            full[n] = backend.to_numpy(to_image_resolution(arr[0], placement)).astype(np.float32)
        energy = collections.OrderedDict()
        for layer, bname in getattr(net, 'energy_blobs', {}).items():
            T = int(net.layer_dict[layer].param.crfgrad_param.num_iterations)
            energy[layer] = backend.to_numpy(net.blobs[bname].data).reshape(-1)[:T].astype(np.float64)
        probs = full[self.output_blob]
        labels = np.argmax(probs, axis=0).astype(np.uint8)
        return Result(probs, labels, full, energy, placement, net_blobs)

    def segment_file(self, path):
        img = self.pre.load(path)
        return img, self(img, source=path)


# --- the CRF inside a net -------------------------------------------------------------------

def crf_layer_names(net):
    """Names of the net's CrfGrad layers, in order."""
    return [name for name, layer in net.layer_dict.items() if layer.type == 'CrfGrad']


def crf_problem(net, layer_name=None):
    """(p, u, terms, x_T, layer) of a CrfGrad layer after ``net.forward()``.

    p: its input probabilities (N, L, h, w); u: the unary potentials -w·log(p + eps); terms:
    the pairwise operators [spatial, bilateral] (:mod:`crfgrad_cupy.core.pgd`); x_T: its output.
    ``layer_name`` None: the last CrfGrad layer."""
    from .core.unary import unary
    names = crf_layer_names(net)
    if not names:
        raise CrfGradError('the net has no CrfGrad layer', file=net.source)
    name = layer_name or names[-1]
    if name not in names:
        raise CrfGradError('no CrfGrad layer named %r (CrfGrad layers: %s)' % (name, ', '.join(names)),
                           file=net.source, field='--layer')
    layer = net.layer_dict[name]
    bottoms, tops = net.bottom_names[name], net.top_names[name]
    p = net.blobs[bottoms[0]].data
    u = unary(p, layer.blobs[0].data.reshape(()), layer.log_eps)
    terms = layer.terms(net.blobs[bottoms[1]].data)
    return p, u, terms, net.blobs[tops[0]].data, layer


def crf_energies(net, layer_name=None):
    """Energies (eq. 6, per image) of a CrfGrad layer's states after ``net.forward()``.

    Returns (N, T + 1): E(q_0 = p), ..., E(q_{T-1}) as the layer's steps start, and E(q_T)
    of its output.  The steps are re-run from the layer's input (same maths as the layer)."""
    from .core.pgd import energy_eq6, pgd_forward
    p, u, terms, x_T, layer = crf_problem(net, layer_name)
    xp = backend.get_array_module(p)
    _, _, en = pgd_forward(p, layer.blobs[0].data.reshape(()), terms, layer.num_iterations,
                           layer.step_size, layer.leak_factor, layer.log_eps, energy='eq6')
    final = energy_eq6(x_T, u, terms)
    return backend.to_numpy(xp.concatenate([en, final[:, None]], axis=1)).astype(np.float64)


def crf_round(net, layer_name=None):
    """The rounded labelling of Prop. 2.1 (:func:`crfgrad_cupy.core.rounding.round_solution`) of
    a CrfGrad layer's output after ``net.forward()``: a RoundingResult (labels (N, h, w))."""
    from .core.rounding import round_solution
    _, u, terms, x_T, _ = crf_problem(net, layer_name)
    return round_solution(x_T, u, terms)


def labels_to_image_resolution(labels, placement):
    """Net-resolution labels (h, w) -> (H, W) at the image's size (crop padding, nearest)."""
    from .preprocess import resize_uint8
    labels = np.asarray(labels, dtype=np.uint8)
    vh, vw = placement.valid_region(labels.shape)
    return resize_uint8(np.ascontiguousarray(labels[:vh, :vw]), placement.orig_hw[0], placement.orig_hw[1],
                        resample='nearest')


# --- verification -----------------------------------------------------------------------------

class Verifier:
    """Runs inputs through two compute paths and compares the output blobs.

    With a usable GPU: CuPy float32 (first) against NumPy float32 (reference); otherwise
    NumPy float32 against NumPy float64.  Both nets are built once."""

    def __init__(self, model, weights, blobs=None):
        gpu = backend.cupy_available()
        self.configs = [('gpu', np.float32), ('cpu', np.float32)] if gpu else \
            [('cpu', np.float32), ('cpu', np.float64)]
        self.nets = []
        for mode, dtype in self.configs:
            with compute_config(mode, dtype):
                self.nets.append(load_net(model, weights))
        self.blobs = list(blobs or self.nets[0].outputs)
        self.description = '%s float32 vs NumPy %s' % ('CuPy (GPU)' if gpu else 'NumPy',
                                                        np.dtype(self.configs[1][1]).name)

    def compare(self, data, source=None):
        """{blob: (max |a - b|, max |b|)} for one preprocessed input (C, h, w)."""
        outs = []
        for (mode, dtype), net in zip(self.configs, self.nets):
            with compute_config(mode, dtype):
                run_net(net, np.asarray(data, dtype=dtype), source)
                outs.append({n: backend.to_numpy(net.blobs[n].data).astype(np.float64) for n in self.blobs})
        report = collections.OrderedDict()
        for n in self.blobs:
            a, b = outs[0][n], outs[1][n]
            report[n] = (float(np.max(np.abs(a - b))) if a.size else 0.0,
                         float(np.max(np.abs(b))) if b.size else 0.0)
        return report


# --- folders of images + masks ----------------------------------------------------------------

def image_mask_pairs(folder):
    """[(image, mask)] for a folder with ``images/`` and ``masks/`` (masks: <stem>.png),
    or with images ``<stem>.<ext>`` next to ``<stem>_mask.png`` / ``<stem>.png`` masks."""
    folder = os.fspath(folder)
    img_dir, mask_dir = os.path.join(folder, 'images'), os.path.join(folder, 'masks')
    if os.path.isdir(img_dir) and os.path.isdir(mask_dir):
        pairs = []
        for name in sorted(os.listdir(img_dir)):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            stem = os.path.splitext(name)[0]
            mask = os.path.join(mask_dir, stem + '.png')
            if not os.path.exists(mask):
                raise CrfGradError('no mask %s.png for this image' % stem, file=os.path.join(img_dir, name))
            pairs.append((os.path.join(img_dir, name), mask))
        return pairs
    if not os.path.isdir(folder):
        raise CrfGradError('data folder not found', file=folder)
    raise CrfGradError('want a folder with images/ and masks/ subfolders', file=folder)


def load_pairs(preprocessor, pairs):
    """Yield (input (C, h, w), Placement, mask (H, W), image path) for (image, mask) pairs."""
    for img_path, mask_path in pairs:
        img = preprocessor.load(img_path)
        mask = load_mask(mask_path)
        if mask.shape != img.shape[:2]:
            raise CrfGradError('mask is %dx%d but its image is %dx%d' % (mask.shape[1], mask.shape[0],
                               img.shape[1], img.shape[0]), file=mask_path)
        data, placement = preprocessor(img)
        yield data, placement, mask, img_path


def score_items(net, items, blobs, num_classes=None):
    """Confusion matrices of ``blobs`` over preprocessed items (data, placement, mask[, source]).

    Each blob's class maps are taken back to the mask's full resolution (padding cropped,
    bilinear upsampling) before the argmax.  Returns {blob: (L, L) int64}."""
    confs = collections.OrderedDict()
    for item in items:
        data, placement, mask = item[:3]
        run_net(net, data, item[3] if len(item) > 3 else None)
        for b in blobs:
            probs = to_image_resolution(net.blobs[b].data[0], placement)
            L = num_classes or probs.shape[0]
            pred = backend.to_numpy(probs.argmax(axis=0))
            c = confusion(pred, mask, L)
            confs[b] = c if b not in confs else confs[b] + c
    return confs


def evaluate_pairs(segmenter, pairs, blobs, num_classes=None, progress=None):
    """Confusion matrices of ``blobs`` (argmax at each mask's full resolution) over (image,
    mask) ``pairs``; masks use 255 for "ignore".  Returns {blob: (L, L) int64}."""
    items = load_pairs(segmenter.pre, pairs)
    if progress:
        items = progress(items, total=len(pairs))
    return score_items(segmenter.net, items, blobs, num_classes)


def evaluate_folder(model='default', weights=None, data=None, unary_blob='score_pre',
                    crf_blob='score_post', num_classes=None, progress=None, **seg_kwargs):
    """Mean IoU of the unary and the CRF output over a folder (see :func:`image_mask_pairs`).

    IoU per class from the confusion accumulated over the whole set, at each mask's full
    resolution.  Returns a dict with ``unary_miou``, ``crf_miou`` (percent), ``images``,
    per-class IoUs and the confusion matrices."""
    proto, weights = resolve_model(model, weights)
    pairs = image_mask_pairs(data)
    if not pairs:
        raise CrfGradError('no images found', file=os.path.join(os.fspath(data), 'images'))
    seg = Segmenter.from_files(proto, weights, output_blob=crf_blob, extra_blobs=(unary_blob,), **seg_kwargs)
    confs = evaluate_pairs(seg, pairs, (unary_blob, crf_blob), num_classes, progress=progress)
    out = collections.OrderedDict()
    for key, b in (('unary', unary_blob), ('crf', crf_blob)):
        iou, miou = iou_from_confusion(confs[b])
        out['%s_miou' % key] = 100.0 * miou
        out['%s_iou_per_class' % key] = [100.0 * v for v in iou.tolist()]
        out['%s_confusion' % key] = confs[b].tolist()
    out['images'] = len(pairs)
    out['model'] = os.path.abspath(proto)
    out['weights'] = os.path.abspath(weights) if weights else None
    out['blobs'] = {'unary': unary_blob, 'crf': crf_blob}
    return out


# --- CRF-Grad on a given probability map (refine) ---------------------------------------------

#: Defaults of :func:`refine` with Potts/Gaussian filters (see :func:`potts_filters`).  Chosen on
#: 10 Weizmann Horse val images (max side <= 400 px) refining the authors'-Caffe horse model's
#: unaries at full image resolution: mean IoU 85.4 -> 89.9 (bilateral weight 1: 86.6, 3: 88.1).
REFINE_DEFAULTS = collections.OrderedDict([
    ('num_iterations', 10), ('step_size', 0.5), ('leak_factor', 0.0), ('log_eps', 0.1),
    ('unary_weight', 1.0), ('kernel_size', 9), ('spatial_weight', 1.0), ('spatial_sigma', 2.0),
    ('bilateral_weight', 6.0), ('pos_scale', 0.01), ('color_scale', 0.3)])


def crf_layers_prototxt(prob, crf, pos_scale, color_scale, lr_mults=None, data='data', top='score_post'):
    """Prototxt text of PixelFeature (POSITION_AND_RGB on ``data``) -> ``features`` and a CrfGrad
    layer ``crf`` (bottoms ``prob``, ``features``) -> ``top``.  ``crf``: CrfGradParameter fields
    (dict, in order); ``lr_mults``: one per CrfGrad blob (decay_mult 0), None: no param specs."""
    fields = []
    for k, v in crf.items():
        if isinstance(v, bool):
            v = 'true' if v else 'false'
        elif isinstance(v, int):
            v = '%d' % v
        else:
            v = '%r' % float(v)
        fields.append('%s: %s' % (k, v))
    params = ''.join(' param { lr_mult: %r decay_mult: 0 }' % float(m) for m in (lr_mults or ()))
    return ('layer { name: "features" type: "PixelFeature" bottom: "%s" top: "features"\n'
            '  pixel_feature_param { type: POSITION_AND_RGB pos_scale: %r color_scale: %r } }\n'
            'layer { name: "crf" type: "CrfGrad" bottom: "%s" bottom: "features" top: "%s"%s\n'
            '  crfgrad_param { %s } }\n'
            % (data, float(pos_scale), float(color_scale), prob, top, params, ' '.join(fields)))


def crf_net_prototxt(num_classes, height, width, crf, pos_scale, color_scale, batch=1, lr_mults=None,
                     loss=False, prob='prob'):
    """Prototxt text of a CRF-only net: Input ``prob`` (N, L, H, W) and ``data`` (N, 3, H, W),
    then :func:`crf_layers_prototxt` -> ``score_post``; with ``loss`` also an Input ``label``
    and SoftmaxWithLoss (ignore 255, normalize false) on ``score_post``."""
    shapes = [(prob, (batch, num_classes, height, width)), ('data', (batch, 3, height, width))]
    if loss:
        shapes.append(('label', (batch, 1, height, width)))
    text = 'name: "crf"\nlayer { name: "input" type: "Input" %s input_param {%s } }\n' % (
        ' '.join('top: "%s"' % n for n, _ in shapes),
        ''.join(' shape { %s }' % ' '.join('dim: %d' % d for d in s) for _, s in shapes))
    text += crf_layers_prototxt(prob, crf, pos_scale, color_scale, lr_mults)
    if loss:
        text += ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score_post" bottom: "label" '
                 'top: "loss" loss_param { ignore_label: 255 normalize: false } }\n')
    return text


def potts_filters(num_classes, kernel_size, spatial_weight, spatial_sigma, bilateral_weight, num_taps,
                  feature_dim=5):
    """CrfGrad blobs [spatial (L, L, k, k), taps (L, L, 1, F)] of a Potts model with Gaussian kernels.

    Potts: only pairs of DIFFERENT labels interact (a positive weight penalises neighbours
    that disagree).  Spatial: ``spatial_weight`` times a Gaussian of std ``spatial_sigma``
    pixels normalised to sum 1, centre tap 0 (no self-interaction).  Bilateral:
    ``bilateral_weight`` times the permutohedral Gaussian taps (centre 1); with the layer's
    symmetric normalisation this is a weighted average over similar pixels."""
    from .core.lattice import gaussian_taps
    L, k = int(num_classes), int(kernel_size)
    r = np.arange(k, dtype=np.float64) - k // 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * float(spatial_sigma) ** 2))
    g[k // 2, k // 2] = 0
    if g.sum() > 0:
        g /= g.sum()
    off = 1.0 - np.eye(L)
    spatial = (float(spatial_weight) * off[:, :, None, None] * g[None, None]).astype(np.float32)
    taps = gaussian_taps(feature_dim, 1, xp=np, dtype=np.float64)
    if taps.size != num_taps:
        raise CrfGradError('%d taps expected, the Gaussian has %d' % (num_taps, taps.size))
    bil = (float(bilateral_weight) * off[:, :, None, None] * taps[None, None, None, :]).astype(np.float32)
    return spatial, bil


def learned_crf(weights, layer=None):
    """The parameters of a trained CrfGrad layer from a weights file.

    Returns a dict: ``blobs`` (3 arrays), and, when the file is a binary caffemodel that
    holds the layer definitions (ours and Caffe's snapshots do), ``crf`` (CrfGradParameter
    fields that matter for inference) and ``pos_scale`` / ``color_scale`` of the PixelFeature
    layer that makes its features.  ``layer`` None: the only CrfGrad layer (or the only
    layer with blobs of CrfGrad's shapes)."""
    from .io.hdf5_weights import is_hdf5, load_weights
    weights = os.fspath(weights)
    out = {}
    if not os.path.exists(weights):
        raise CrfGradError('weights file not found', file=weights)
    if not is_hdf5(weights):
        from .io.blobproto import blob_to_array
        from .io.caffemodel import load_caffemodel
        net = load_caffemodel(weights)
        crfs = [lp for lp in net.layer if lp.type == 'CrfGrad']
        if layer is not None:
            crfs = [lp for lp in net.layer if lp.name == layer]
            if not crfs:
                raise CrfGradError('no layer named %r (layers: %s)' % (layer, ', '.join(l.name for l in net.layer)),
                                   file=weights, field='--layer')
        if len(crfs) != 1:
            raise CrfGradError('%d CrfGrad layers in the file; name one with --layer (%s)'
                               % (len(crfs), ', '.join(lp.name for lp in crfs)), file=weights, field='--layer')
        lp = crfs[0]
        if len(lp.blobs) != 3:
            raise CrfGradError('layer %r has %d blobs, a CrfGrad layer has 3' % (lp.name, len(lp.blobs)),
                               file=weights, field='--layer')
        out['blobs'] = [blob_to_array(b, source=weights, layer=lp.name) for b in lp.blobs]
        p = lp.crfgrad_param
        out['crf'] = {'num_iterations': int(p.num_iterations), 'step_size': p.step_size,
                      'leak_factor': p.leak_factor, 'log_eps': p.log_eps}
        for other in net.layer:
            if other.type == 'PixelFeature' and len(lp.bottom) > 1 and lp.bottom[1] in other.top:
                out['pos_scale'] = other.pixel_feature_param.pos_scale
                out['color_scale'] = other.pixel_feature_param.color_scale
        out['layer'] = lp.name
        return out
    held = load_weights(weights)
    cands = [n for n, arrays in held.items() if (layer is None or n == layer) and len(arrays) == 3
             and np.asarray(arrays[0]).size == 1 and np.asarray(arrays[1]).ndim == 4]
    if len(cands) != 1:
        raise CrfGradError('cannot tell the CrfGrad layer (candidates: %s); name it with --layer'
                           % (', '.join(cands) or 'none'), file=weights, field='--layer')
    out['blobs'] = [np.asarray(a, np.float32) for a in held[cands[0]]]
    out['layer'] = cands[0]
    return out


def probs_layout(probs, image_hw=None, layout='auto'):
    """Probabilities as (L, H, W): accepts (L, H, W), (H, W, L) and (1, L, H, W).

    ``layout`` 'lhw' / 'hwl' forces one; 'auto' uses the image size when it tells, else
    takes the smaller of the first and last axis as the class axis."""
    a = np.asarray(probs)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise CrfGradError('probabilities must be L x H x W or H x W x L, got shape %s' % (a.shape,))
    if layout == 'lhw':
        return a
    if layout == 'hwl':
        return np.moveaxis(a, 2, 0)
    if image_hw is not None:
        if tuple(a.shape[1:]) == tuple(image_hw) and tuple(a.shape[:2]) != tuple(image_hw):
            return a
        if tuple(a.shape[:2]) == tuple(image_hw) and tuple(a.shape[1:]) != tuple(image_hw):
            return np.moveaxis(a, 2, 0)
    return a if a.shape[0] <= a.shape[2] else np.moveaxis(a, 2, 0)


def refine(image, probs, crf=None, blobs=None, size=None, mean=None):
    """CRF-Grad inference on a probability map.

    ``image`` uint8 (H, W, 3) RGB; ``probs`` (L, h, w) class probabilities (the image is
    resized to h x w when they differ).  ``crf``: options as in :data:`REFINE_DEFAULTS`;
    ``blobs``: learned CrfGrad blobs [w_u, spatial, taps] (default: the Potts/Gaussian filters
    of :func:`potts_filters`).  ``size``: run at the map fitted into size x size (aspect kept)
    and resize the result back.  Returns (refined (L, h, w) float32, labels (h, w) uint8)."""
    from .net import Net
    from .preprocess import IMAGENET_BGR_MEAN, resize_uint8
    opts = dict(REFINE_DEFAULTS, **(crf or {}))
    probs = np.asarray(probs, dtype=np.float32)
    L, h, w = probs.shape
    if not np.all(np.isfinite(probs)):
        raise CrfGradError('the probabilities hold NaN or infinite values')
    if probs.min() <= -opts['log_eps']:
        raise CrfGradError('probabilities must be > -log_eps (%g) (CRF-Grad takes log(p + eps)); got a '
                           'minimum of %g: pass probabilities, not scores (or use --softmax)'
                           % (opts['log_eps'], probs.min()))
    rh, rw = (h, w)
    if size:
        from .preprocess import fit_size
        rh, rw = fit_size(h, w, size, size)
    img = resize_uint8(np.asarray(image, dtype=np.uint8), rh, rw)
    p = resize_bilinear(probs, (rh, rw)) if (rh, rw) != (h, w) else probs
    mean = np.asarray(IMAGENET_BGR_MEAN if mean is None else mean, np.float32)
    data = img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) - mean[:, None, None]
    if blobs is not None:
        wu, spatial, taps = [np.asarray(b, np.float32) for b in blobs]
        if spatial.shape[:2] != (L, L):
            raise CrfGradError('the learned filters are for %d classes, the probabilities have %d'
                               % (spatial.shape[0], L))
        k = spatial.shape[-1]
    else:
        k = int(opts['kernel_size'])
        wu = np.full((1, 1, 1, 1), opts['unary_weight'], np.float32)
        spatial, taps = potts_filters(L, k, opts['spatial_weight'], opts['spatial_sigma'],
                                      opts['bilateral_weight'], 63)
    crf_param = collections.OrderedDict([
        ('num_classes', L), ('kernel_size', k), ('num_iterations', int(opts['num_iterations'])),
        ('step_size', opts['step_size']), ('leak_factor', opts['leak_factor']), ('log_eps', opts['log_eps'])])
    net = Net(crf_net_prototxt(L, rh, rw, crf_param, opts['pos_scale'], opts['color_scale']), caffe_pb2.TEST)
    for b, a in zip(net.params['crf'], (wu, spatial, taps)):
        if tuple(b.shape) != a.shape:
            raise CrfGradError('CrfGrad blob of shape %s given, the layer needs %s' % (a.shape, b.shape))
        b.data[...] = backend.xp().asarray(a.reshape(b.shape))
    net.blobs['prob'].data[...] = backend.xp().asarray(p[None])
    net.blobs['data'].data[...] = backend.xp().asarray(data[None])
    net.forward()
    out = net.blobs['score_post'].data[0]
    if (rh, rw) != (h, w):
        out = resize_bilinear(out, (h, w))
    out = backend.to_numpy(out).astype(np.float32)
    return out, np.argmax(out, axis=0).astype(np.uint8)
