"""Data layers: HDF5Data, ImageData and the authors' ImageLabelData, with Caffe's
transform_param (crop_size, mirror, scale, mean_file, mean_value).

Batches are made on the host with NumPy and moved to the current device.  Paths in
prototxts and list files are taken relative to the working directory, as Caffe does; a
path inside a list file that is not found there is also looked up next to the list file.
Images are decoded with Pillow into OpenCV's layout: uint8 H x W x 3 in **BGR** order
(``is_color``) or H x W grey.  Resizing follows cv::resize's sampling (pixel centres,
``src = (dst + 0.5) / f - 0.5``; INTER_NEAREST, INTER_LINEAR, INTER_CUBIC (a = -0.75),
INTER_AREA) as separable weight matrices; uint8 results are rounded (OpenCV's fixed-point
arithmetic can differ by one grey level).  Random choices (shuffle, crop offsets, mirror,
scale, colour noise) come from a per-layer generator seeded from the filler seed
(the solver's ``random_seed``), so a run is repeatable.
"""
import logging
import os

import numpy as np

from ..errors import CrfGradError
from ..proto import caffe_pb2
from . import fillers
from .base import Layer, register

log = logging.getLogger('crfgrad_cupy')

_warned_palette = set()


# --- files --------------------------------------------------------------------------------------

def read_list_file(path, layer, field):
    """Lines of a list file (empty lines dropped); a missing file is a CrfGradError."""
    if not path:
        raise CrfGradError('no list file given', layer=layer, field=field)
    try:
        with open(path, 'r') as f:
            lines = [ln.rstrip('\r\n') for ln in f]
    except FileNotFoundError:
        raise CrfGradError('list file not found (paths are relative to the working directory %s)'
                           % os.getcwd(), file=path, layer=layer, field=field) from None
    except OSError as exc:
        raise CrfGradError('cannot read the list file: %s' % (exc.strerror or exc), file=path, layer=layer,
                           field=field) from None
    return [ln for ln in lines if ln.strip()]


def resolve_listed(path, list_file):
    """A path from a list file: as given (working directory), else next to the list file."""
    if os.path.isabs(path) or os.path.exists(path) or not list_file:
        return path
    alt = os.path.join(os.path.dirname(os.path.abspath(list_file)), path)
    return alt if os.path.exists(alt) else path


def read_image(path, color=True, layer=None):
    """uint8 image as OpenCV's imread gives it: H x W x 3 BGR (``color``) or H x W grey."""
    from PIL import Image
    if not os.path.isfile(path):
        raise CrfGradError('image file not found', file=path, layer=layer)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode.startswith('I;16'):
                # OpenCV reduces 16-bit images to 8 bits by dropping the low byte
                a = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                im = Image.fromarray(a, 'L')
            if not color and mode == 'P' and layer not in _warned_palette:
                _warned_palette.add(layer)
                log.warning('%s: palette image read as grey levels of its colours (as OpenCV does), '
                            'not as palette indices', path)
            if color:
                arr = np.asarray(im.convert('RGB'))[:, :, ::-1]
            else:
                arr = np.asarray(im.convert('L'))
    except CrfGradError:
        raise
    except Exception as exc:    # Pillow raises many kinds for broken files
        raise CrfGradError('cannot decode the image (%s: %s)' % (type(exc).__name__, exc), file=path,
                           layer=layer) from None
    return np.ascontiguousarray(arr)


def read_mean_file(path, layer):
    """The mean image of a .binaryproto (one BlobProto) as float32 (C, H, W)."""
    from google.protobuf.message import DecodeError
    from ..io.blobproto import blob_to_array
    field = 'transform_param.mean_file'
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise CrfGradError('mean file not found', file=path, layer=layer, field=field) from None
    bp = caffe_pb2.BlobProto()
    try:
        bp.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CrfGradError('not a BlobProto mean file: %s' % exc, file=path, layer=layer, field=field) from None
    mean = blob_to_array(bp, source=path, layer=layer)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise CrfGradError('mean file must hold a (1, C, H, W) blob, got shape %s' % (mean.shape,), file=path,
                           layer=layer, field=field)
    return mean.astype(np.float32)


# --- cv::resize ----------------------------------------------------------------------------------

NEAREST, LINEAR, CUBIC, AREA = 'nearest', 'linear', 'cubic', 'area'


def _cubic_coeffs(f):
    a = -0.75
    c0 = ((a * (f + 1) - 5 * a) * (f + 1) + 8 * a) * (f + 1) - 4 * a
    c1 = ((a + 2) * f - (a + 3)) * f * f + 1
    c2 = ((a + 2) * (1 - f) - (a + 3)) * (1 - f) * (1 - f) + 1
    return np.stack([c0, c1, c2, 1.0 - c0 - c1 - c2], axis=-1)


def resize_weights(n_in, n_out, scale, method):
    """(n_out, n_in) matrix mapping one axis as cv::resize does; ``scale`` = source pixels per
    destination pixel (1/fx)."""
    d = np.arange(n_out, dtype=np.float64)
    W = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if method == NEAREST:
        src = np.minimum(np.floor(d * scale).astype(np.int64), n_in - 1)
        W[rows, src] = 1.0
    elif method == LINEAR:
        fx = (d + 0.5) * scale - 0.5
        sx = np.floor(fx).astype(np.int64)
        f = fx - sx
        low = sx < 0
        f[low], sx[low] = 0.0, 0
        high = sx >= n_in - 1
        f[high], sx[high] = 0.0, n_in - 1
        np.add.at(W, (rows, sx), 1.0 - f)
        np.add.at(W, (rows, np.minimum(sx + 1, n_in - 1)), f)
    elif method == CUBIC:
        fx = (d + 0.5) * scale - 0.5
        sx = np.floor(fx).astype(np.int64)
        c = _cubic_coeffs(fx - sx)
        for k in range(4):
            np.add.at(W, (rows, np.clip(sx - 1 + k, 0, n_in - 1)), c[:, k])
    elif method == AREA:
        for dx in range(n_out):
            f1 = dx * scale
            f2 = f1 + scale
            cell = min(scale, n_in - f1)
            s1 = int(np.ceil(f1))
            s2 = min(int(np.floor(f2)), n_in - 1)
            s1 = min(s1, s2)
            if s1 - f1 > 1e-3:
                W[dx, s1 - 1] += (s1 - f1) / cell
            W[dx, s1:s2] += 1.0 / cell
            if f2 - s2 > 1e-3:
                W[dx, s2] += min(min(f2 - s2, 1.0), cell) / cell
    else:
        raise ValueError('unknown interpolation %r' % method)
    return W


def resize(img, out_h, out_w, method, fy=None, fx=None):
    """cv::resize of an H x W (x C) uint8 image to out_h x out_w.

    ``fy``/``fx``: the scale factors when the size came from them (cv::resize(..., Size(),
    fx, fy) maps with 1/f, not with the size ratio)."""
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img.copy()
    # OpenCV maps with 1/f, f = the given factor or out/in (computed in this order: the rounding
    # of these doubles decides ties of the nearest-neighbour floor)
    sy = 1.0 / (fy if fy else out_h / float(h))
    sx = 1.0 / (fx if fx else out_w / float(w))
    if method == LINEAR and abs(sy - 2) < 1e-15 and abs(sx - 2) < 1e-15:
        method = AREA                      # OpenCV takes its area path for exact 2x shrinking
    if method == AREA and (sy < 1 or sx < 1):
        method = LINEAR
    Wy = resize_weights(h, out_h, sy, method)
    Wx = resize_weights(w, out_w, sx, method)
    a = img.astype(np.float64)
    out = np.tensordot(Wy, a, axes=(1, 0))                       # (out_h, w, ...)
    out = np.moveaxis(np.tensordot(Wx, out, axes=(1, 1)), 0, 1)  # (out_h, out_w, ...)
    if method == NEAREST:
        return out.astype(img.dtype)
    # OpenCV: fixed-point linear/cubic round half up; the float area path rounds half to even
    out = np.rint(out) if method == AREA else np.floor(out + 0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def scaled_size(n, f):
    """cv::resize's destination size for a factor: round(n * f)."""
    return int(np.rint(n * f))


# --- padding -------------------------------------------------------------------------------

def reflect101_index(n, before, after):
    """Source indices of cv::BORDER_REFLECT_101 for an axis of length n grown by before/after."""
    i = np.arange(-before, n + after)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * n - 2
    m = np.mod(i, period)
    return np.where(m < n, m, period - m)


def pad(img, top, bottom, left, right, value=None):
    """cv::copyMakeBorder: BORDER_REFLECT_101 when ``value`` is None, else constant ``value``."""
    if top == bottom == left == right == 0:
        return img
    if value is None:
        h, w = img.shape[:2]
        out = np.take(img, reflect101_index(h, top, bottom), axis=0)
        return np.take(out, reflect101_index(w, left, right), axis=1)
    widths = [(top, bottom), (left, right)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, widths, mode='constant', constant_values=value)


def pad_to_min_size(img, min_size, value=None, centre=True):
    """The fork's PadImage: grow to at least min_size x min_size.  Centred: the top and the
    right get the smaller half; not centred: all padding at the bottom and the right."""
    h, w = img.shape[:2]
    if min_size <= 0 or (h >= min_size and w >= min_size):
        return img
    top = bottom = left = right = 0
    if h < min_size:
        top = (min_size - h) // 2 if centre else 0
        bottom = min_size - h - top
    if w < min_size:
        # the fork swaps left and right when it calls copyMakeBorder
        small = (min_size - w) // 2 if centre else 0
        right = small
        left = min_size - w - small
        if not centre:
            left, right = 0, min_size - w
    return pad(img, top, bottom, left, right, value)


# --- colour noise (OpenCV's 8-bit HSV) -----------------------------------------------------------

def bgr_to_hsv(img):
    """uint8 BGR -> uint8 HSV with H in [0, 180) (OpenCV's COLOR_BGR2HSV)."""
    a = img.astype(np.float64)
    b, g, r = a[..., 0], a[..., 1], a[..., 2]
    v = a.max(axis=-1)
    mn = a.min(axis=-1)
    diff = v - mn
    s = np.where(v > 0, diff * 255.0 / np.where(v > 0, v, 1), 0)
    safe = np.where(diff > 0, diff, 1)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe)) * 60
    h = np.where(diff > 0, h, 0)
    h = np.where(h < 0, h + 360, h)
    out = np.stack([np.rint(h / 2), np.rint(s), v], axis=-1)
    out[..., 0] = np.where(out[..., 0] >= 180, out[..., 0] - 180, out[..., 0])
    return np.clip(out, 0, 255).astype(np.uint8)


def hsv_to_bgr(img):
    """uint8 HSV (H in units of 2 degrees) -> uint8 BGR (OpenCV's COLOR_HSV2BGR)."""
    a = img.astype(np.float64)
    h = a[..., 0] / 30.0
    h = np.where(h >= 6, h - 6, h)
    s = a[..., 1] / 255.0
    v = a[..., 2] / 255.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.clip(np.rint(np.stack([b, g, r], axis=-1) * 255), 0, 255).astype(np.uint8)


def hsv_noise(img, dh, ds, dv):
    """Add (dh, ds, dv) to the HSV channels, each clamped to [0, 255] (the fork's ApplyHSVNoise)."""
    hsv = bgr_to_hsv(img).astype(np.int64) + np.array([dh, ds, dv])
    return hsv_to_bgr(np.clip(hsv, 0, 255).astype(np.uint8))


# --- transform_param --------------------------------------------------------------------------

class DataTransformer:
    """Caffe's DataTransformer for images: crop (random in TRAIN, centred in TEST), mirror
    (a coin flip, in both phases), then (pixel - mean) * scale, H x W x C -> C x H x W."""

    def __init__(self, tp, phase, rng, layer):
        self.layer = layer
        self.crop = int(tp.crop_size)
        self.mirror = bool(tp.mirror)
        self.scale = np.float32(tp.scale)
        self.phase = phase
        self.rng = rng
        self.mean = None
        self.mean_values = [np.float32(v) for v in tp.mean_value]
        if tp.HasField('mean_file'):
            if self.mean_values:
                raise CrfGradError('give either mean_file or mean_value, not both', layer=layer,
                                   field='transform_param.mean_file')
            self.mean = read_mean_file(tp.mean_file, layer)

    def out_size(self, h, w):
        return (self.crop, self.crop) if self.crop else (h, w)

    def __call__(self, img, label=None):
        """img: H x W x C (or H x W) uint8/float; label: H x W or None.  Returns (C x h x w float32,
        h x w label or None)."""
        if img.ndim == 2:
            img = img[:, :, None]
        h, w, c = img.shape
        do_mirror = self.mirror and bool(self.rng.integers(2))
        h_off = w_off = 0
        oh, ow = h, w
        if self.crop:
            if h < self.crop or w < self.crop:
                raise CrfGradError('image of %dx%d is smaller than crop_size %d' % (h, w, self.crop),
                                   layer=self.layer, field='transform_param.crop_size')
            oh = ow = self.crop
            if self.phase == caffe_pb2.TRAIN:
                h_off = int(self.rng.integers(h - self.crop + 1))
                w_off = int(self.rng.integers(w - self.crop + 1))
            else:
                h_off, w_off = (h - self.crop) // 2, (w - self.crop) // 2
        x = img[h_off:h_off + oh, w_off:w_off + ow].astype(np.float32)
        x = np.ascontiguousarray(x.transpose(2, 0, 1))          # C x h x w
        if self.mean is not None:
            if self.mean.shape != (c, h, w):
                raise CrfGradError('mean file has shape %s but the image is %s (C, H, W)'
                                   % (self.mean.shape, (c, h, w)), layer=self.layer,
                                   field='transform_param.mean_file')
            x -= self.mean[:, h_off:h_off + oh, w_off:w_off + ow]
        elif self.mean_values:
            if len(self.mean_values) not in (1, c):
                raise CrfGradError('give 1 mean_value or one per channel (%d)' % c, layer=self.layer,
                                   field='transform_param.mean_value')
            mv = np.array(self.mean_values * (c if len(self.mean_values) == 1 else 1), np.float32)
            x -= mv[:, None, None]
        if self.scale != 1:
            x *= self.scale
        lab = None
        if label is not None:
            lab = label[h_off:h_off + oh, w_off:w_off + ow].astype(np.float32)
        if do_mirror:
            x = x[:, :, ::-1]
            lab = lab[:, ::-1] if lab is not None else None
        return np.ascontiguousarray(x), (np.ascontiguousarray(lab) if lab is not None else None)


def _layer_rng():
    return np.random.default_rng(int(fillers.rng().integers(0, 2 ** 63 - 1)))


class _DataLayer(Layer):
    """No bottoms; tops are written by forward (one batch per call)."""
    exact_num_bottom = 0

    def allow_force_backward(self, bottom_index):
        return False

    def reshape(self, bottom, top):
        """Tops keep the shape of the last batch (set in setup and forward)."""

    def _put(self, top, arr):
        xp = self.xp
        if top.shape != tuple(arr.shape):
            top.reshape(*arr.shape)
        top.data[...] = xp.asarray(arr, dtype=top.dtype)

    # list-fed layers (ImageData, ImageLabelData): a cursor over self.items
    def _start_list(self, items, shuffle, rand_skip, field):
        """Caffe's start of a list: optional shuffle, then a random skip of up to rand_skip items."""
        self.items = list(items)
        self.rng = _layer_rng()
        self.shuffle = bool(shuffle)
        if self.shuffle:
            self._shuffle()
        self.pos = 0
        if rand_skip:
            skip = int(self.rng.integers(rand_skip))
            if skip >= len(self.items):
                raise self.error('rand_skip leaves no data', field=field)
            self.pos = skip

    def _shuffle(self):
        order = self.rng.permutation(len(self.items))
        self.items = [self.items[i] for i in order]

    def _next_item(self):
        """The item under the cursor; the cursor moves on, wrapping (and reshuffling) at the end."""
        item = self.items[self.pos]
        self.pos += 1
        if self.pos >= len(self.items):
            self.pos = 0
            if self.shuffle:
                self._shuffle()
        return item


# --- HDF5Data ---------------------------------------------------------------------------------

@register('HDF5Data')
class HDF5DataLayer(_DataLayer):
    """hdf5_data_param: source (a text file listing .h5 files), batch_size, shuffle.

    Each top is filled from the dataset of the same name (first axis = items); files are
    read one at a time in list order (shuffled with ``shuffle``, and the rows of each file
    too) and wrap around."""
    min_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.hdf5_data_param
        if self.param.HasField('transform_param'):
            raise self.error('HDF5Data does not transform data: remove transform_param', field='transform_param')
        self.batch_size = int(p.batch_size)
        if self.batch_size <= 0:
            raise self.error('batch_size must be positive', field='hdf5_data_param.batch_size')
        self.source = p.source
        self.files = [resolve_listed(ln.split()[0], p.source) for ln in
                      read_list_file(p.source, self.name, 'hdf5_data_param.source')]
        if not self.files:
            raise CrfGradError('no HDF5 file listed', file=p.source, layer=self.name, field='hdf5_data_param.source')
        log.info('Loading list of HDF5 filenames from: %s', p.source)
        log.info('Number of HDF5 files: %d', len(self.files))
        self.shuffle = bool(p.shuffle)
        self.rng = _layer_rng()
        self.tops = list(self.param.top)
        self.file_order = np.arange(len(self.files))
        if self.shuffle:
            self.rng.shuffle(self.file_order)
        self.current_file = 0
        self._load(self.files[self.file_order[0]])
        self.current_row = 0
        for t, name in zip(top, self.tops):
            t.reshape(self.batch_size, *self.arrays[name].shape[1:])

    def _load(self, path):
        import h5py
        if not os.path.isfile(path):
            raise CrfGradError('HDF5 data file not found (listed in %s)' % self.source, file=path,
                               layer=self.name)
        arrays = {}
        try:
            with h5py.File(path, 'r') as f:
                for name in self.tops:
                    if name not in f or not isinstance(f[name], h5py.Dataset):
                        raise CrfGradError('no dataset %r (the tops name the datasets; the file has %s)'
                                           % (name, sorted(f.keys())), file=path, layer=self.name, field='top')
                    ds = f[name]
                    if ds.dtype.kind not in 'fiub' or ds.ndim < 1:
                        raise CrfGradError('dataset %r must be a numeric array with at least 1 axis' % name,
                                           file=path, layer=self.name, field='top')
                    arrays[name] = np.asarray(ds[()], dtype=np.float64 if ds.dtype == np.float64 else np.float32)
        except OSError as exc:
            raise CrfGradError('cannot read the HDF5 file: %s' % exc, file=path, layer=self.name) from None
        n = arrays[self.tops[0]].shape[0]
        for name in self.tops[1:]:
            if arrays[name].shape[0] != n:
                raise CrfGradError('datasets %r and %r have different numbers of rows (%d, %d)'
                                   % (self.tops[0], name, n, arrays[name].shape[0]), file=path, layer=self.name)
        if n == 0:
            raise CrfGradError('the datasets have no rows', file=path, layer=self.name)
        self.arrays = arrays
        self.rows = n
        self.row_order = np.arange(n)
        if self.shuffle:
            self.rng.shuffle(self.row_order)

    def _next(self):
        self.current_row += 1
        if self.current_row == self.rows:
            if len(self.files) > 1:
                self.current_file += 1
                if self.current_file == len(self.files):
                    self.current_file = 0
                    if self.shuffle:
                        self.rng.shuffle(self.file_order)
                self._load(self.files[self.file_order[self.current_file]])
            self.current_row = 0
            if self.shuffle:
                self.rng.shuffle(self.row_order)

    def forward(self, bottom, top):
        idx = []
        batches = {name: [] for name in self.tops}
        for _ in range(self.batch_size):
            for name in self.tops:
                batches[name].append(self.arrays[name][self.row_order[self.current_row]])
            idx.append(self.current_row)
            self._next()
        for t, name in zip(top, self.tops):
            arr = np.stack(batches[name])
            if t.shape[1:] != arr.shape[1:]:
                raise CrfGradError('dataset %r has item shape %s here but %s in the first file'
                                   % (name, arr.shape[1:], t.shape[1:]), layer=self.name, field='top')
            self._put(t, arr)


# --- ImageData --------------------------------------------------------------------------------

@register('ImageData')
class ImageDataLayer(_DataLayer):
    """image_data_param: source (lines "path label"), root_folder, batch_size, shuffle,
    rand_skip, new_height/new_width (bilinear resize), is_color; transform_param.

    Tops: data (N, C, H, W) float, label (N,) float."""
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        p = self.param.image_data_param
        self.new_h, self.new_w = int(p.new_height), int(p.new_width)
        if (self.new_h == 0) != (self.new_w == 0):
            raise self.error('new_height and new_width must be set together', field='image_data_param.new_height')
        self.is_color = bool(p.is_color)
        self.root = p.root_folder
        self.batch_size = int(p.batch_size)
        if self.batch_size <= 0:
            raise self.error('batch_size must be positive', field='image_data_param.batch_size')
        self.source = p.source
        lines = []
        for k, ln in enumerate(read_list_file(p.source, self.name, 'image_data_param.source')):
            pos = ln.rfind(' ')
            name, lab = (ln[:pos], ln[pos + 1:]) if pos >= 0 else (ln, '0')
            try:
                label = int(lab)
            except ValueError:
                raise CrfGradError('line %d: the label %r is not an integer' % (k + 1, lab), file=p.source,
                                   line=k + 1, layer=self.name, field='image_data_param.source') from None
            lines.append((name, label))
        if not lines:
            raise CrfGradError('the list file is empty', file=p.source, layer=self.name,
                               field='image_data_param.source')
        self._start_list(lines, p.shuffle, p.rand_skip, 'image_data_param.rand_skip')
        self.transformer = DataTransformer(self.param.transform_param, self.phase, self.rng, self.name)
        img = self._read(self.items[self.pos][0])
        oh, ow = self.transformer.out_size(*img.shape[:2])
        top[0].reshape(self.batch_size, img.shape[2] if img.ndim == 3 else 1, oh, ow)
        top[1].reshape(self.batch_size)

    def _read(self, name):
        path = resolve_listed(self.root + name, self.source)
        img = read_image(path, self.is_color, self.name)
        if self.new_h:
            img = resize(img, self.new_h, self.new_w, LINEAR)
        return img

    def forward(self, bottom, top):
        data, labels = [], []
        for _ in range(self.batch_size):
            name, label = self._next_item()
            x, _ = self.transformer(self._read(name))
            if data and x.shape != data[0].shape:
                raise CrfGradError('image gives a %s blob but the first image of the batch gave %s '
                                   '(set new_height/new_width or crop_size)' % (x.shape, data[0].shape),
                                   file=self.root + name, layer=self.name)
            data.append(x)
            labels.append(label)
        self._put(top[0], np.stack(data))
        self._put(top[1], np.asarray(labels, dtype=np.float32))


# --- ImageLabelData (the authors' fork) -------------------------------------------------------

@register('ImageLabelData')
class ImageLabelDataLayer(_DataLayer):
    """image_label_data_param: image_list_path, label_list_path (one file name per line),
    image_dir/label_dir (or data_dir for both; prefixed as strings), batch_size, shuffle,
    rand_skip, rand_scale in [min_scale, max_scale] (labels nearest, images cubic up / area
    down), padding REFLECT or ZERO, pad_centre, label_slice (dim, stride, offset), hsv_noise
    (h_noise, s_noise, v_noise); transform_param crop_size, mirror, mean_value, mean_file, scale.

    Per image, as the fork: read (labels as grey), colour noise, random scale, widen by the
    label_slice offsets (image reflected or zero, label 255) and pad to crop_size (label 255),
    crop and mirror image and label together, then sample the label with label_slice.
    Tops: data (N, C, crop, crop), label (N, 1, dim0, dim1) with 255 kept as 'ignore'."""
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        p = self.param.image_label_data_param
        self.p = p
        self.image_dir, self.label_dir = p.image_dir, p.label_dir
        if not self.image_dir and not self.label_dir and p.data_dir:
            self.image_dir = self.label_dir = p.data_dir
        self.image_list = p.image_list_path
        self.label_list = p.label_list_path
        images = [ln.split()[0] for ln in read_list_file(p.image_list_path, self.name,
                                                         'image_label_data_param.image_list_path')]
        labels = [ln.split()[0] for ln in read_list_file(p.label_list_path, self.name,
                                                         'image_label_data_param.label_list_path')]
        if len(images) != len(labels):
            raise CrfGradError('%d images but %d labels in %s' % (len(images), len(labels), p.label_list_path),
                               file=p.image_list_path, layer=self.name, field='image_label_data_param.label_list_path')
        if not images:
            raise CrfGradError('the image list is empty', file=p.image_list_path, layer=self.name,
                               field='image_label_data_param.image_list_path')
        pairs = list(zip(images, labels))
        self.batch_size = int(p.batch_size)
        if self.batch_size <= 0:
            raise self.error('batch_size must be positive', field='image_label_data_param.batch_size')
        if p.rand_scale and not 0 < p.min_scale <= p.max_scale:
            raise self.error('need 0 < min_scale <= max_scale', field='image_label_data_param.min_scale')
        tp = self.param.transform_param
        self.crop = int(tp.crop_size) if tp.HasField('crop_size') else 0
        sl = p.label_slice
        if len(sl.dim) not in (0, 2) or len(sl.stride) not in (0, 2) or len(sl.offset) not in (0, 2):
            raise self.error('label_slice needs 2 values each of dim, stride and offset',
                             field='image_label_data_param.label_slice')
        self.slice_dim = [int(d) for d in sl.dim] or None
        self.slice_stride = [int(s) for s in sl.stride] or [1, 1]
        self.slice_offset = [int(o) for o in sl.offset] or [0, 0]
        if min(self.slice_stride) < 1:
            raise self.error('label_slice stride must be positive', field='image_label_data_param.label_slice')
        self._start_list(pairs, p.shuffle, p.rand_skip, 'image_label_data_param.rand_skip')
        self.transformer = DataTransformer(tp, self.phase, self.rng, self.name)
        img = pad_to_min_size(self._read_image(self.items[self.pos][0]), self.crop)
        h, w = self.transformer.out_size(*img.shape[:2])
        top[0].reshape(self.batch_size, img.shape[2], h, w)
        top[1].reshape(self.batch_size, 1, *self._label_dims(h, w))

    def _label_dims(self, h, w):
        return tuple(self.slice_dim) if self.slice_dim else (h, w)

    def _read_image(self, name):
        return read_image(resolve_listed(self.image_dir + name, self.image_list), True, self.name)

    def _read_label(self, name):
        return read_image(resolve_listed(self.label_dir + name, self.label_list), False, self.name)

    def load_item(self, image_name, label_name):
        """(C x h x w image, dim0 x dim1 label) for one list entry."""
        p = self.p
        img = self._read_image(image_name)
        lab = self._read_label(label_name)
        if img.shape[:2] != lab.shape:
            raise CrfGradError('image is %dx%d but its label %s is %dx%d' % (
                img.shape[0], img.shape[1], self.label_dir + label_name, lab.shape[0], lab.shape[1]),
                file=self.image_dir + image_name, layer=self.name)
        if p.hsv_noise:
            d = [int(self.rng.integers(-int(n), int(n) + 1)) for n in (p.h_noise, p.s_noise, p.v_noise)]
            img = hsv_noise(img, *d)
        if p.rand_scale:
            s = float(self.rng.uniform(p.min_scale, p.max_scale))
            h, w = lab.shape
            nh, nw = max(1, scaled_size(h, s)), max(1, scaled_size(w, s))
            lab = resize(lab, nh, nw, NEAREST, fy=s, fx=s)
            img = resize(img, nh, nw, CUBIC if s > 1 else AREA, fy=s, fx=s)
        mh, mw = self.slice_offset
        reflect = p.padding == caffe_pb2.ImageLabelDataParameter.REFLECT
        fill = None if reflect else 0
        img = pad(img, mh, mh, mw, mw, fill)
        img = pad_to_min_size(img, self.crop, fill, p.pad_centre)
        lab = pad(lab, mh, mh, mw, mw, 255)
        lab = pad_to_min_size(lab, self.crop, 255, p.pad_centre)
        x, t = self.transformer(img, lab)
        return x, self._slice_label(t)

    def _slice_label(self, t):
        h, w = t.shape
        dims = self._label_dims(h, w)
        (o0, o1), (s0, s1) = self.slice_offset, self.slice_stride
        rows = o0 + s0 * np.arange(dims[0])
        cols = o1 + s1 * np.arange(dims[1])
        if rows[-1] >= h or cols[-1] >= w:
            raise self.error('label_slice (dim %s, stride %s, offset %s) reaches outside the %dx%d label'
                             % (list(dims), self.slice_stride, self.slice_offset, h, w),
                             field='image_label_data_param.label_slice')
        return t[rows[:, None], cols[None, :]]

    def forward(self, bottom, top):
        data, labels = [], []
        for _ in range(self.batch_size):
            image_name, label_name = self._next_item()
            x, t = self.load_item(image_name, label_name)
            if data and x.shape != data[0].shape:
                raise CrfGradError('image gives a %s blob but the first image of the batch gave %s '
                                   '(set crop_size)' % (x.shape, data[0].shape), file=self.image_dir + image_name,
                                   layer=self.name)
            data.append(x)
            labels.append(t[None])
        self._put(top[0], np.stack(data))
        self._put(top[1], np.stack(labels))
