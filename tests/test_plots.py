"""The paper's figures from real runs: the Caffe-trained Weizmann Horse CrfGrad model
(shared/data/caffe_models/crfgrad_horse_caffe) and its real `caffe train` logs."""
import csv
import os

import numpy as np
import pytest

from oracle_util import DATA, assert_close

from crfgrad_cupy.cli import main
from crfgrad_cupy.errors import CrfGradError

HORSE = os.path.join(DATA, 'caffe_models', 'crfgrad_horse_caffe')
PROTO = os.path.join(HORSE, 'deploy.prototxt')
WEIGHTS = os.path.join(HORSE, 'stage2_iter_1200.caffemodel')
VAL = [os.path.join(HORSE, 'val', n) for n in ('horse010.npz', 'horse015.npz', 'horse016.npz')]


@pytest.fixture(scope='module')
def horse():
    if not os.path.exists(WEIGHTS):
        pytest.skip('the Caffe-trained horse model is not present')
    from crfgrad_cupy.segment import load_net
    return load_net(PROTO, WEIGHTS)


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_spatial_filters_figure(tmp_path):
    if not os.path.exists(WEIGHTS):
        pytest.skip('model not present')
    from crfgrad_cupy.convert.weights import load_any_weights
    from crfgrad_cupy.plots import plot_spatial_filters, spatial_filter_blob
    layer, W = spatial_filter_blob(load_any_weights(WEIGHTS))
    assert layer == 'crf-grad' and W.shape == (2, 2, 9, 9)
    path = tmp_path / 'filters.png'
    fig = plot_spatial_filters(W, class_names=['background', 'horse'], path=str(path))
    assert path.stat().st_size > 1000
    panels = _image_axes(fig)
    assert len(panels) == 4 and len(fig.axes) == 5           # 2 x 2 class pairs + colour bar
    assert [ax.get_title() for ax in panels] == ['background – background', 'background – horse',
                                                 'horse – background', 'horse – horse']
    for ax, (a, b) in zip(panels, [(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.allclose(ax.images[0].get_array(), W[a, b])
    clims = {ax.images[0].get_clim() for ax in panels}
    assert len(clims) == 1                                    # one shared colour scale
    lo, hi = clims.pop()
    assert lo == -hi and hi == pytest.approx(np.abs(W).max())
    # the Caffe-trained pattern: attractive same-class (< 0), repulsive switches (> 0)
    assert W[0, 0].max() < 0 and W[1, 1].max() < 0 and W[0, 1].min() > 0 and W[1, 0].min() > 0
    fig = plot_spatial_filters(W, pairs=[(0, 1)])
    assert len(_image_axes(fig)) == 1
    with pytest.raises(CrfGradError, match='out of range'):
        plot_spatial_filters(W, pairs=[(0, 2)])


def test_intermediate_states_figure(horse, tmp_path):
    from crfgrad_cupy.plots import crf_states, plot_intermediate_states
    z = np.load(VAL[0])
    horse.forward(data=z['data'])
    states = crf_states(horse)
    assert len(states) == 6 and states[0].shape == (2, 128, 128)      # z, q^1..q^4, y (T = 5)
    assert_close(states[0], z['score_pre'][0], rtol=1e-4, atol=1e-5, what='z vs pycaffe')
    assert_close(states[-1], z['score_post'][0], rtol=1e-4, atol=1e-5, what='y vs pycaffe')
    image = np.zeros((128, 128, 3), np.uint8)
    path = tmp_path / 'states.png'
    fig = plot_intermediate_states(states, image=image, ground_truth=z['label'], class_index=1,
                                   class_name='horse', path=str(path))
    assert path.stat().st_size > 1000
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 8                                  # image, z, q^1..q^4, y, ground truth
    assert titles[0] == 'image' and titles[-1] == 'ground truth' and titles[-2].startswith('$y$')
    assert np.allclose(fig.axes[1].images[0].get_array(), np.clip(states[0][1], 0, 1))
    assert np.allclose(fig.axes[6].images[0].get_array(), np.clip(states[-1][1], 0, 1))


def test_energy_figure(horse, tmp_path):
    from crfgrad_cupy.plots import crf_energy_curves, normalize_energies, plot_energies
    inputs = [np.load(p)['data'] for p in VAL]
    E = crf_energy_curves(horse, inputs, leak_factor=0.0)
    assert E.shape == (3, 6)
    assert np.all(E[:, -1] < E[:, 0])                          # the descent lowers the energy
    path = tmp_path / 'energy.png'
    fig = plot_energies(E, path=str(path))
    assert path.stat().st_size > 1000
    lines = fig.axes[0].lines
    assert len(lines) == 4                                     # 3 images + the mean
    N = normalize_energies(E)
    assert np.allclose(np.abs(N[:, -1]), 1)
    assert np.allclose(lines[-1].get_ydata(), N.mean(axis=0))
    assert lines[-1].get_linewidth() > lines[0].get_linewidth()
    # the layer's own energy top (eq. 6, per image) gives the same first T values
    from crfgrad_cupy.segment import crf_energies
    horse.forward(data=inputs[0])
    assert_close(crf_energies(horse)[0], crf_energy_curves(horse, inputs[:1])[0], rtol=1e-5, what='E')


@pytest.mark.parametrize('log,train_rows,panels', [('train_stage1.log', None, 3), ('train_stage2.log', 61, 3)])
def test_training_curves_from_real_caffe_logs(log, train_rows, panels, tmp_path):
    path = os.path.join(HORSE, 'logs', log)
    if not os.path.exists(path):
        pytest.skip('logs not present')
    from crfgrad_cupy.plots import training_curves_from_log
    fig, csvs, png = training_curves_from_log(path, str(tmp_path / 'curves'))
    assert os.path.getsize(png) > 1000
    assert [ax.get_title() for ax in fig.axes] == ['loss', 'learning rate', 'test outputs'][:panels]
    loss = fig.axes[0]
    assert [l.get_label() for l in loss.lines] == ['train loss', 'test #0 loss']
    with open(csvs[0]) as f:
        rows = list(csv.DictReader(f))
    if train_rows:
        assert len(rows) == train_rows
    assert len(loss.lines[0].get_xdata()) == len(rows)
    assert np.allclose(loss.lines[0].get_ydata(), [float(r['loss']) for r in rows])
    with open(csvs[1]) as f:
        test_rows = list(csv.DictReader(f))
    acc = fig.axes[2].lines[0]
    assert acc.get_label() == 'test #0 accuracy'
    assert np.allclose(acc.get_ydata(), [float(r['output/accuracy']) for r in test_rows])
    if log == 'train_stage2.log':
        assert float(test_rows[-1]['output/accuracy']) == pytest.approx(0.934126)


def test_plot_cli_commands(tmp_path):
    if not os.path.exists(WEIGHTS):
        pytest.skip('model not present')
    out = tmp_path / 'cli'
    assert main(['plot', 'filters', WEIGHTS, '--class-names', 'background,horse',
                 '--out', str(out / 'f.png')]) == 0
    assert main(['plot', 'states', PROTO, WEIGHTS, VAL[0], '--class-name', 'horse',
                 '--out', str(out / 's.png')]) == 0
    assert main(['plot', 'energy', PROTO, WEIGHTS] + VAL[:2] + ['--leak-factor', '0',
                 '--out', str(out / 'e.png'), '--csv', str(out / 'e.csv')]) == 0
    assert main(['plot', 'training', os.path.join(HORSE, 'logs', 'train_stage2.log'),
                 '--out', str(out / 't')]) == 0
    for name in ('f.png', 's.png', 'e.png', 't.png', 't.train.csv', 't.test.csv', 'e.csv'):
        assert (out / name).stat().st_size > 100, name
    with open(out / 'e.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['input', 'E0', 'E1', 'E2', 'E3', 'E4', 'E5'] and len(rows) == 3
    # bad input is one line on stderr and exit code 2
    assert main(['plot', 'filters', PROTO, '--out', str(out / 'x.png')]) == 2
    assert main(['plot', 'training', str(out / 'f.png'), '--out', str(out / 'x')]) == 2


def test_image_states_from_a_picture(horse, tmp_path):
    """The states figure from an image file + mask (preprocessing of the model: fit 128, BGR, mean)."""
    img = os.path.join(DATA, 'weizmann_horse', 'val', 'images', 'horse010.jpg')
    mask = os.path.join(DATA, 'weizmann_horse', 'val', 'masks', 'horse010.png')
    if not os.path.exists(img):
        pytest.skip('weizmann horse not present')
    assert main(['plot', 'states', PROTO, WEIGHTS, img, '--mask', mask, '--out',
                 str(tmp_path / 's.png')]) == 0
    assert (tmp_path / 's.png').stat().st_size > 1000
