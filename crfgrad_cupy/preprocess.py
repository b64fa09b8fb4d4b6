"""Image loading and Caffe-style preprocessing (host side, NumPy + Pillow).

The network input is built the way Caffe's ``DataTransformer`` builds it from an
8-bit image::

    data[c, y, x] = (pixel[y, x, channel_swap[c]] - mean[c]) * scale      (float32)

with the pixels in 0..255, RGB as decoded, ``channel_swap = (2, 1, 0)`` turning RGB
into Caffe's BGR order and ``mean`` in the network's channel order (B, G, R).

Geometry (:class:`Preprocessor`, ``resize``):

- ``'fit'`` (default): scale the image so it fits into the input size keeping its
  aspect ratio (``s = min(H_in / H, W_in / W)``, ``nw = floor(W*s + 0.5)``,
  ``nh = floor(H*s + 0.5)``; Pillow's bilinear resize, which antialiases when
  shrinking), put it in the top-left corner and pad the bottom/right with
  ``pad_value`` (0, before the mean subtraction, so padded pixels hold ``-mean``).
  This is the preprocessing of the Weizmann Horse Caffe model
  (``shared/data/caffe_models/crfgrad_horse_caffe/README.md``).
- ``'stretch'``: resize to exactly the input size (aspect not kept).
- ``'none'``: keep the image size; the net is reshaped to every image.

:class:`Placement` remembers where the image went, so outputs can be cropped back
and upsampled to the image's full resolution (see :mod:`crfgrad_cupy.segment`).
"""
import os

import numpy as np

from .errors import CrfGradError

#: Caffe's ImageNet mean in B, G, R order (used by the authors' and the horse nets).
IMAGENET_BGR_MEAN = (104.008, 116.669, 122.675)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.pnm', '.tif', '.tiff',
                    '.gif', '.webp')


def _pil():
    from PIL import Image
    return Image


# --- files ------------------------------------------------------------------------------------

def load_image(path, mode='RGB'):
    """uint8 array (H, W, 3) RGB (``mode='L'``: (H, W)) of an image file.

    A missing or undecodable file is a CrfGradError naming the file."""
    Image = _pil()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CrfGradError('image not found', file=path)
    if os.path.isdir(path):
        raise CrfGradError('is a directory, not an image', file=path)
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert(mode), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        msg = 'not a format Pillow can read' if isinstance(exc, Image.UnidentifiedImageError) else \
            '%s: %s' % (type(exc).__name__, str(exc).replace(path, '<file>'))
        raise CrfGradError('cannot decode image (%s)' % msg, file=path) from None


def load_mask(path):
    """uint8 array (H, W) of a label PNG (values are class ids; 255 is "ignore")."""
    Image = _pil()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CrfGradError('mask not found', file=path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == 'P':              # palette PNG: the indices are the labels
                return np.asarray(im, dtype=np.uint8).copy()
            if im.mode not in ('L', 'I', 'I;16', '1'):
                im = im.convert('L')
            return np.asarray(im).astype(np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise CrfGradError('cannot decode mask: %s' % exc, file=path) from None


def read_list_file(path, root=None):
    """Image paths from a list file in Caffe's ImageData format (``path [label]`` per line).

    Blank lines and ``#`` comments are skipped; the label, if any, is ignored.
    Relative paths are taken relative to ``root`` (default: the list file's folder)."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path)) if root is None else root
    out = []
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise CrfGradError('neither an image (by its extension) nor a text list file', file=path) from None
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        parts = line.rsplit(None, 1)
        name = line
        if len(parts) == 2:
            try:
                int(parts[1])
                name = parts[0]
            except ValueError:
                name = line
        out.append(name if os.path.isabs(name) else os.path.join(root, name))
    return out


def collect_images(inputs, root=None):
    """Expand command-line inputs into a list of image paths.

    A folder gives its image files (by extension, sorted); a file with an image
    extension (or a missing path) is taken as an image; any other file is read as a
    Caffe list file (:func:`read_list_file`)."""
    out = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            names = sorted(n for n in os.listdir(item) if n.lower().endswith(IMAGE_EXTENSIONS))
            out.extend(os.path.join(item, n) for n in names)
        elif item.lower().endswith(IMAGE_EXTENSIONS) or not os.path.exists(item):
            out.append(item)
        else:
            out.extend(read_list_file(item, root))
    return out


def load_mean(spec, channels=3):
    """Mean from ``'B,G,R'`` numbers, a ``.npy`` file or a Caffe ``.binaryproto``.

    Returns float32 (C,) or (C, H, W).  File means of shape (1, C, H, W) are squeezed."""
    if spec is None:
        return None
    if isinstance(spec, (tuple, list, np.ndarray)):
        arr = np.asarray(spec, dtype=np.float32)
    else:
        spec = str(spec)
        if os.path.exists(spec):
            if spec.lower().endswith('.npy'):
                try:
                    arr = np.load(spec, allow_pickle=False)
                except (ValueError, OSError) as exc:
                    raise CrfGradError('cannot read mean .npy: %s' % exc, file=spec) from None
            else:
                from .io.blobproto import blob_to_array
                from .proto import caffe_pb2
                bp = caffe_pb2.BlobProto()
                try:
                    with open(spec, 'rb') as f:
                        bp.ParseFromString(f.read())
                except Exception as exc:   # protobuf DecodeError and friends
                    raise CrfGradError('not a BlobProto mean file: %s' % exc, file=spec) from None
                arr = blob_to_array(bp, source=spec)
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim == 4 and arr.shape[0] == 1:
                arr = arr[0]
        else:
            try:
                arr = np.asarray([float(v) for v in spec.split(',')], dtype=np.float32)
            except ValueError:
                raise CrfGradError('--mean wants B,G,R numbers or an existing .binaryproto/.npy file, '
                                   'got %r' % spec, field='--mean') from None
        if arr.ndim == 0:
            arr = arr.reshape(1)
    if arr.ndim == 1 and arr.size == 1 and channels > 1:
        arr = np.repeat(arr, channels)
    if arr.ndim not in (1, 3) or arr.shape[0] != channels:
        raise CrfGradError('mean has shape %s; the net input has %d channels' % (arr.shape, channels),
                           file=spec if isinstance(spec, str) else None, field='--mean')
    return arr.astype(np.float32)


def parse_size(spec):
    """``'128'`` -> (128, 128), ``'96x128'`` (H x W) -> (96, 128); ``'native'`` -> None."""
    if spec is None or str(spec).lower() in ('native', 'none', ''):
        return None
    if isinstance(spec, (tuple, list)):
        return int(spec[0]), int(spec[1])
    try:
        parts = [int(v) for v in str(spec).lower().replace(',', 'x').split('x')]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise CrfGradError('--input-size wants S, HxW or native, got %r' % spec, field='--input-size')
    return parts[0], parts[1]


# --- geometry ---------------------------------------------------------------------------------

def fit_size(height, width, target_h, target_w):
    """(nh, nw) of an H x W image scaled to fit into target_h x target_w, aspect kept.

    ``s = min(target_h / H, target_w / W)``, sides ``floor(side * s + 0.5)`` clamped to
    the target (for a square target this is the horse model's rule ``s = S / max(W, H)``)."""
    s = min(target_h / float(height), target_w / float(width))
    nh = min(target_h, max(1, int(np.floor(height * s + 0.5))))
    nw = min(target_w, max(1, int(np.floor(width * s + 0.5))))
    return nh, nw


def resize_uint8(img, height, width, resample='bilinear'):
    """Pillow resize of a uint8 (H, W[, C]) array to (height, width[, C])."""
    if img.shape[:2] == (height, width):
        return img
    Image = _pil()
    filt = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST, 'bicubic': Image.BICUBIC}[resample]
    return np.asarray(Image.fromarray(img).resize((width, height), filt))


class Placement:
    """Where an image went in the network input.

    ``orig_hw``: the image's size; ``input_hw``: the net input size; ``valid_hw``:
    the top-left region holding the (resized) image, the rest is padding."""

    def __init__(self, orig_hw, input_hw, valid_hw):
        self.orig_hw = tuple(int(v) for v in orig_hw)
        self.input_hw = tuple(int(v) for v in input_hw)
        self.valid_hw = tuple(int(v) for v in valid_hw)

    def valid_region(self, out_hw):
        """(h, w) of the valid region in an output map of size ``out_hw`` covering the input."""
        (ih, iw), (vh, vw) = self.input_hw, self.valid_hw
        oh, ow = out_hw
        if (oh, ow) == (ih, iw):
            return vh, vw
        return (max(1, min(oh, int(np.floor(vh * oh / float(ih) + 0.5)))),
                max(1, min(ow, int(np.floor(vw * ow / float(iw) + 0.5)))))

    def __repr__(self):
        return 'Placement(orig_hw=%s, input_hw=%s, valid_hw=%s)' % (self.orig_hw, self.input_hw,
                                                                     self.valid_hw)


def place_image(img, input_hw, resize='fit', pad_value=0):
    """Resize/pad a uint8 image for a net input of size ``input_hw`` (None: keep size).

    Returns (uint8 array of shape input_hw (+ channels), Placement)."""
    h, w = img.shape[:2]
    if input_hw is None or resize == 'none':
        return img, Placement((h, w), (h, w), (h, w))
    th, tw = input_hw
    if resize == 'stretch':
        return resize_uint8(img, th, tw), Placement((h, w), (th, tw), (th, tw))
    if resize != 'fit':
        raise CrfGradError("resize must be 'fit', 'stretch' or 'none', got %r" % resize, field='--resize')
    nh, nw = fit_size(h, w, th, tw)
    small = resize_uint8(img, nh, nw)
    out = np.full((th, tw) + img.shape[2:], pad_value, dtype=np.uint8)
    out[:nh, :nw] = small
    return out, Placement((h, w), (th, tw), (nh, nw))


# --- the transformer --------------------------------------------------------------------------

class Preprocessor:
    """Image (uint8 H x W x 3 RGB) -> network input (C, H_in, W_in) float32 (NumPy).

    ``mean``: (C,) or (C, H, W) in the net's channel order (None: no subtraction); a
    full mean image whose size differs from the input is reduced to its channel means
    (as pycaffe's classify.py does).  ``scale`` multiplies after the subtraction.
    ``channel_swap`` picks input channels from the RGB image (None: keep RGB).
    ``input_size`` (H, W) or None for per-image size; ``resize`` 'fit' | 'stretch' | 'none'.
    ``channels=1`` feeds a grey image."""

    def __init__(self, mean=IMAGENET_BGR_MEAN, scale=1.0, channel_swap=(2, 1, 0), input_size=None,
                 resize='fit', pad_value=0, channels=3):
        self.channels = int(channels)
        self.mean = load_mean(mean, self.channels) if mean is not None else None
        self.scale = float(scale)
        if self.channels == 1:
            channel_swap = None
        if channel_swap is not None:
            channel_swap = tuple(int(c) for c in channel_swap)
            if sorted(channel_swap) != list(range(self.channels)):
                raise CrfGradError('channel swap %s is not a permutation of %d channels'
                                   % (channel_swap, self.channels), field='--channel-swap')
        self.channel_swap = channel_swap
        self.input_size = input_size
        self.resize = resize
        self.pad_value = pad_value

    def load(self, path):
        return load_image(path, 'L' if self.channels == 1 else 'RGB')

    def __call__(self, img):
        """(data (C, H_in, W_in) float32, Placement)."""
        img = np.asarray(img, dtype=np.uint8)
        if self.channels == 1 and img.ndim == 3:
            img = np.asarray(_pil().fromarray(img).convert('L'))
        if self.channels == 3 and img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        placed, placement = place_image(img, self.input_size, self.resize, self.pad_value)
        if placed.ndim == 2:
            placed = placed[:, :, None]
        if self.channel_swap is not None:
            placed = placed[:, :, list(self.channel_swap)]
        data = np.ascontiguousarray(placed.transpose(2, 0, 1)).astype(np.float32)
        if self.mean is not None:
            mean = self.mean
            if mean.ndim == 3 and mean.shape[1:] != data.shape[1:]:
                mean = mean.reshape(mean.shape[0], -1).mean(axis=1)
            data -= mean[:, None, None] if mean.ndim == 1 else mean
        if self.scale != 1.0:
            data *= np.float32(self.scale)
        return data, placement
