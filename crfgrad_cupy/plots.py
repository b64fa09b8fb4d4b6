"""Figures of the paper from our runs (matplotlib, Agg canvas; no pyplot state is touched).

* :func:`plot_spatial_filters` -- the learned spatial filters of a CrfGrad layer as a grid of
  class-pair images with one shared colour scale and the class names (paper Fig. 1 / 4);
* :func:`plot_intermediate_states` -- image, z (the CNN output), q^1 .. q^{T-1}, the CRF output
  and the ground truth for one class (Fig. 5 / 11);
* :func:`plot_energies` -- energy per iteration for a set of images, each normalised, with the
  mean (Fig. 6 / 9);
* :func:`plot_training_curves` -- loss, learning rate and test outputs of a Caffe-format log
  (ours or real Caffe's; parsed by :func:`crfgrad_cupy.training_log.parse_caffe_log`).

Each returns the :class:`matplotlib.figure.Figure` (and writes it when ``path`` is given);
the data helpers :func:`crf_states`, :func:`crf_energy_curves` and :func:`spatial_filter_blob`
get the arrays from a net or a weights file.
"""
import os

import numpy as np

from . import backend
from .errors import CrfGradError


def _figure(width, height, layout=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi=100):
    """Write ``fig`` (format from the extension), creating the folder; returns ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _np(a):
    return np.asarray(backend.to_numpy(a), dtype=np.float64)


# ----------------------------------------------------------------------------- Fig. 1 / 4

def plot_spatial_filters(filters, class_names=None, pairs=None, title=None, cmap='RdBu_r', path=None):
    """Grid of the spatial filters W[λ, μ] (k x k) of a CrfGrad layer, one shared colour scale.

    ``filters``: the layer's blobs[1], (L, L, k, k) indexed [λ (this pixel's class),
    μ (the other pixel's class), y-shift + k//2, x-shift + k//2]: the energy added when a
    pixel takes class λ and the pixel at that relative position takes class μ.
    ``pairs``: [(λ, μ), ...] to show (default all L x L, row λ, column μ); ``class_names``:
    L labels.  The colour scale is symmetric around 0 (blue < 0 attractive, red > 0)."""
    W = _np(filters)
    if W.ndim != 4 or W.shape[0] != W.shape[1] or W.shape[2] != W.shape[3]:
        raise CrfGradError('spatial filters must have shape (L, L, k, k), got %s' % (W.shape,))
    L, k = W.shape[0], W.shape[2]
    names = list(class_names) if class_names is not None else ['class %d' % i for i in range(L)]
    if len(names) != L:
        raise CrfGradError('%d class names for %d classes' % (len(names), L), field='class_names')
    if pairs is None:
        grid = [[(a, b) for b in range(L)] for a in range(L)]
    else:
        pairs = [(int(a), int(b)) for a, b in pairs]
        for a, b in pairs:
            if not (0 <= a < L and 0 <= b < L):
                raise CrfGradError('class pair (%d, %d) is out of range for %d classes' % (a, b, L),
                                   field='pairs')
        ncol = min(len(pairs), 4)
        grid = [pairs[i:i + ncol] for i in range(0, len(pairs), ncol)]
    nrow, ncol = len(grid), max(len(r) for r in grid)
    shown = [W[a, b] for row in grid for a, b in row]
    vmax = max(float(np.max(np.abs(shown))), 1e-12)
    fig = _figure(1.2 + 2.3 * ncol, 0.5 + 2.3 * nrow, layout='constrained')
    r = k // 2
    extent = (-r - 0.5, k - r - 0.5, k - r - 0.5, -r - 0.5)
    im = None
    axes = []
    for i, row in enumerate(grid):
        for j, (a, b) in enumerate(row):
            ax = fig.add_subplot(nrow, ncol, i * ncol + j + 1)
            im = ax.imshow(W[a, b], cmap=cmap, vmin=-vmax, vmax=vmax, extent=extent,
                           interpolation='nearest')
            ax.set_title('%s – %s' % (names[a], names[b]), fontsize=9)
            ax.set_xlabel('x-shift', fontsize=8)
            ax.set_ylabel('y-shift', fontsize=8)
            ax.tick_params(labelsize=7)
            axes.append(ax)
    cbar = fig.colorbar(im, ax=axes, shrink=0.85)
    cbar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    if path:
        save_figure(fig, path)
    return fig


def spatial_filter_blob(weights, layer=None, net_param=None):
    """(layer name, (L, L, k, k) spatial filters) of a CrfGrad layer in ``layer -> [blobs]``.

    With ``layer`` that layer; else the CrfGrad layer of ``net_param`` (a NetParameter), else
    the only layer whose blobs look like CrfGrad's ((1,1,1,1), (L,L,k,k), (L,L,1,F))."""
    if layer is not None:
        if layer not in weights or len(weights[layer]) < 2:
            raise CrfGradError('no CrfGrad parameters for layer %r in the weights (layers: %s)'
                               % (layer, ', '.join(n for n, b in weights.items() if len(b))), layer=layer)
        return layer, np.asarray(weights[layer][1])
    names = []
    if net_param is not None:
        names = [lp.name for lp in net_param.layer if lp.type == 'CrfGrad' and lp.name in weights]
    if not names:
        for name, blobs in weights.items():
            shapes = [tuple(np.shape(b)) for b in blobs]
            if len(shapes) == 3 and shapes[0] == (1, 1, 1, 1) and len(shapes[1]) == 4 and \
                    shapes[1][0] == shapes[1][1] and shapes[1][2] == shapes[1][3] and \
                    len(shapes[2]) == 4 and shapes[2][:3] == (shapes[1][0], shapes[1][0], 1):
                names.append(name)
    if not names:
        raise CrfGradError('no CrfGrad layer found in the weights (name one with --layer)')
    if len(names) > 1:
        raise CrfGradError('several CrfGrad layers (%s); choose one with --layer' % ', '.join(names))
    return names[0], np.asarray(weights[names[0]][1])


# ----------------------------------------------------------------------------- Fig. 5 / 11

def plot_intermediate_states(states, image=None, ground_truth=None, class_index=1, class_name=None,
                             cmap='gray', path=None):
    """One row: image, z, q^1 .. q^{T-1}, the output y = q^T, the ground truth.

    ``states``: [x_0 = z (the CNN output), x_1, ..., x_T] for one image, each (L, H, W) (or
    already one class, (H, W)); ``image``: (H, W, 3) uint8 RGB or None; ``ground_truth``:
    (H, W) labels (the panel shows label == class_index; 255 = ignore, shown grey) or None.
    The probability panels share the scale [0, 1]."""
    if len(states) < 2:
        raise CrfGradError('need at least the input and the output state, got %d' % len(states))
    maps = []
    for s in states:
        s = _np(s)
        if s.ndim == 4 and s.shape[0] == 1:
            s = s[0]
        if s.ndim == 3:
            if not 0 <= class_index < s.shape[0]:
                raise CrfGradError('class %d is out of range for %d classes' % (class_index, s.shape[0]),
                                   field='class_index')
            s = s[class_index]
        if s.ndim != 2:
            raise CrfGradError('each state must be (L, H, W) or (H, W), got %s' % (s.shape,))
        maps.append(s)
    T = len(maps) - 1
    cname = class_name or 'class %d' % class_index
    titles = ['$z_{\\mathrm{%s}}$' % cname.replace(' ', '\\ ')] + \
        ['$q^{%d}$' % t for t in range(1, T)] + ['$y$ (output)']
    panels = [('image', image)] if image is not None else []
    panels += list(zip(titles, maps))
    if ground_truth is not None:
        panels.append(('ground truth', ground_truth))
    n = len(panels)
    fig = _figure(1.9 * n, 2.3)
    for i, (title, data) in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        if title == 'image':
            ax.imshow(np.asarray(data))
        elif title == 'ground truth':
            gt = np.asarray(data)
            shown = np.where(gt == 255, 0.5, (gt == class_index).astype(np.float64))
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, interpolation='nearest')
        else:
            ax.imshow(np.clip(data, 0, 1), cmap=cmap, vmin=0, vmax=1, interpolation='nearest')
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.05)
    if path:
        save_figure(fig, path)
    return fig


def crf_states(net, layer_name=None, image_index=0, leak_factor=None):
    """[x_0 = p, x_1, ..., x_T] (each (L, h, w), NumPy) of a CrfGrad layer after ``net.forward()``.

    The steps are re-run from the layer's input with the layer's parameters (the maths of
    :func:`crfgrad_cupy.core.pgd.pgd_forward`); ``leak_factor`` overrides the layer's."""
    from .core.pgd import pgd_forward, state
    from .segment import crf_problem
    p, _, terms, _, layer = crf_problem(net, layer_name)
    leak = layer.leak_factor if leak_factor is None else float(leak_factor)
    x_T, cache, _ = pgd_forward(p, layer.blobs[0].data.reshape(()), terms, layer.num_iterations,
                                layer.step_size, leak, layer.log_eps)
    T = len(cache.pre)
    out = [state(cache, t) for t in range(T)] + [x_T]
    return [np.asarray(backend.to_numpy(s[image_index]), dtype=np.float32) for s in out]


# ----------------------------------------------------------------------------- Fig. 6 / 9

def normalize_energies(energies):
    """Each curve divided by the absolute value of its final energy (so all end at ±1);
    a curve whose final energy is 0 is left as it is."""
    E = _np(energies)
    if E.ndim == 1:
        E = E[None]
    final = np.abs(E[:, -1:])
    return np.where(final > 0, E / np.where(final > 0, final, 1), E)


def plot_energies(energies, normalize=True, labels=None, title=None, path=None):
    """CRF energy against the iteration: a thin blue line per image, the mean in thick red.

    ``energies``: (n_images, T + 1), E(q^0) .. E(q^T) per image (e.g. from
    :func:`crf_energy_curves`); ``normalize``: divide each by |its final energy|."""
    E = _np(energies)
    if E.ndim == 1:
        E = E[None]
    if E.ndim != 2 or E.shape[1] < 1 or E.shape[0] < 1:
        raise CrfGradError('energies must be (n_images, iterations), got %s' % (E.shape,))
    if normalize:
        E = normalize_energies(E)
    t = np.arange(E.shape[1])
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for i, row in enumerate(E):
        ax.plot(t, row, color='tab:blue', linewidth=0.7, alpha=0.6,
                label='images' if i == 0 else None)
    ax.plot(t, E.mean(axis=0), color='tab:red', linewidth=2.5, label='mean')
    ax.set_xlabel('iteration t')
    ax.set_ylabel('energy / |final energy|' if normalize else 'energy')
    ax.set_xticks(t)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or 'CRF energy per iteration (%d images)' % E.shape[0], fontsize=10)
    fig.tight_layout()
    if path:
        save_figure(fig, path)
    return fig


def crf_energy_curves(net, inputs, layer_name=None, input_name=None, leak_factor=None):
    """(n_images, T + 1) eq. (6) energies E(q^0) .. E(q^T) of a CrfGrad layer, one row per
    input (each (C, H, W) or (1, C, H, W), fed to ``input_name`` or the net's first input).
    ``leak_factor`` overrides the layer's (the paper uses 0 for its energy figures)."""
    from .core.pgd import energy_eq6, pgd_forward
    from .segment import crf_problem, run_net
    rows = []
    for x in inputs:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 4:
            if x.shape[0] != 1:
                raise CrfGradError('one input at a time: got a batch of %d' % x.shape[0])
            x = x[0]
        run_net(net, x, input_name=input_name)
        p, u, terms, x_T, layer = crf_problem(net, layer_name)
        leak = layer.leak_factor if leak_factor is None else float(leak_factor)
        xT, _, en = pgd_forward(p, layer.blobs[0].data.reshape(()), terms, layer.num_iterations,
                                layer.step_size, leak, layer.log_eps, energy='eq6')
        final = energy_eq6(xT, u, terms)
        rows.append(np.concatenate([_np(en)[0], _np(final)[:1]]))
    return np.stack(rows)


# ----------------------------------------------------------------------------- training curves

def _finite(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def plot_training_curves(tables, title=None, path=None):
    """Training curves of a parsed Caffe-format log: up to three panels.

    ``tables``: ``{'train': columns, 'test': columns}`` from
    :func:`crfgrad_cupy.training_log.parse_caffe_log` (or a log path).  Panels: loss (the
    smoothed train loss, the test loss when logged), learning rate, test outputs (one line
    per ``output/<name>`` / ``iou_accuracy`` column, per test net).  Panels without data are
    left out."""
    if isinstance(tables, (str, os.PathLike)):
        from .training_log import parse_caffe_log
        tables = parse_caffe_log(tables)
    train = tables.get('train', {})
    test = tables.get('test', {})
    panels = []
    loss_lines = []
    if 'iter' in train and 'loss' in train:
        x, y = _finite(train['iter'], train['loss'])
        if len(x):
            loss_lines.append(('train loss', x, y))
    nets = sorted(set(int(v) for v in test.get('net', []) if np.isfinite(v))) if test else []
    out_cols = [c for c in test if c.startswith('output/') or c.startswith('iou_accuracy')] if test else []
    loss_cols = [c for c in out_cols if 'loss' in c.split('/', 1)[-1]]
    if 'loss' in test:
        loss_cols = ['loss'] + loss_cols
    for c in loss_cols:
        for n in nets:
            sel = np.asarray(test['net']) == n
            x, y = _finite(np.asarray(test['iter'])[sel], np.asarray(test[c])[sel])
            if len(x):
                loss_lines.append(('test #%d %s' % (n, c.split('/', 1)[-1]), x, y))
    if loss_lines:
        panels.append(('loss', loss_lines))
    if 'lr' in train:
        x, y = _finite(train['iter'], train['lr'])
        if len(x):
            panels.append(('learning rate', [('lr', x, y)]))
    out_lines = []
    for c in out_cols:
        if c in loss_cols:
            continue
        for n in nets:
            sel = np.asarray(test['net']) == n
            x, y = _finite(np.asarray(test['iter'])[sel], np.asarray(test[c])[sel])
            if len(x):
                out_lines.append(('test #%d %s' % (n, c.split('/', 1)[-1]), x, y))
    if out_lines:
        panels.append(('test outputs', out_lines))
    if not panels:
        raise CrfGradError('the log has no training iterations or test results to plot')
    fig = _figure(4.2 * len(panels), 3.4)
    for i, (name, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, x, y in lines:
            ax.plot(x, y, marker='o' if len(x) < 30 else None, markersize=3, linewidth=1.2, label=label)
        ax.set_xlabel('iteration')
        ax.set_title(name, fontsize=10)
        if name == 'learning rate' and np.all(lines[0][2] > 0) and \
                lines[0][2].max() / max(lines[0][2].min(), 1e-300) > 50:
            ax.set_yscale('log')
        else:
            ax.ticklabel_format(axis='y', useOffset=False)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path:
        save_figure(fig, path)
    return fig


def training_curves_from_log(log_path, out_prefix):
    """Parse a Caffe-format log, write ``out_prefix``.train.csv / .test.csv and ``out_prefix``.png.

    Returns (figure, [csv paths], png path)."""
    from .training_log import parse_caffe_log, save_csv
    tables = parse_caffe_log(log_path)
    if not len(tables['train'].get('iter', [])) and not len(tables['test'].get('iter', [])):
        raise CrfGradError('no Caffe training lines found', file=os.fspath(log_path))
    out_prefix = os.fspath(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    csvs = save_csv(tables, out_prefix)
    fig = plot_training_curves(tables, title=os.path.basename(os.fspath(log_path)))
    png = save_figure(fig, out_prefix + '.png')
    return fig, csvs, png
