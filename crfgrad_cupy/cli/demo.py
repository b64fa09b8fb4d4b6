"""`crfgrad demo [--out DIR]`: segment the bundled sample images with the bundled model.

No network needed.  Writes under --out, for each sample <stem>: <stem>_unary.png and
<stem>_crf.png (labels, VOC palette, at the image's resolution) and <stem>_overlay.png;
overview.png (rows: image | unary | CRF-Grad | ground truth), energy.png and energy_leak0.png
(the CRF energy E(q^t) = psi.q + 1/2 q'Kq per CRF-Grad step, one line per image); and prints the IoU of
both outputs on each sample.  With the leaky projection (leak > 0) the states leave the
simplex and the energy is not bounded below; energy_leak0.png re-runs the steps with leak 0,
as the paper's energy figures do.
"""
import os


def register(sub):
    p = sub.add_parser('demo', help='segment the bundled sample images (no network needed)',
                       description=__doc__)
    p.add_argument('--out', default='demo_out', help='output folder (default: demo_out)')
    p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
    p.set_defaults(func=run)


def overview_figure(rows, path):
    """rows: [(title, image, unary labels, crf labels, ground truth)]; writes a PNG grid."""
    import numpy as np

    from .. import plots
    from .. import segment as sg
    pal = sg.voc_palette()
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4 * 2.4, len(rows) * 2.0 + 0.3), dpi=100)
    heads = ['image', 'unary (score_pre)', 'CRF-Grad (score_post)', 'ground truth']
    for r, (title, img, unary, crf, gt) in enumerate(rows):
        shown = [img, sg.overlay(img, unary), sg.overlay(img, crf),
                 np.where((gt == 255)[:, :, None], 128, pal[np.where(gt == 255, 0, gt)])]
        for c, panel in enumerate(shown):
            ax = fig.add_subplot(len(rows), 4, r * 4 + c + 1)
            ax.imshow(np.asarray(panel, dtype=np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heads[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=0.93, wspace=0.04, hspace=0.08)
    plots.save_figure(fig, path)


def run(args):
    import numpy as np

    from .. import plots
    from .. import segment as sg
    from ..errors import CrfGradError
    from ..preprocess import load_mask
    proto, weights = sg.default_model()
    pairs = sg.sample_pairs()
    if not pairs:
        raise CrfGradError('no sample images', file=os.path.join(sg.default_model_dir(), 'samples'))
    seg = sg.Segmenter.from_files(proto, weights, output_blob='score_post', extra_blobs=('score_pre',),
                                  mode=args.device)
    os.makedirs(args.out, exist_ok=True)
    rows, inputs = [], []
    for img_path, mask_path in pairs:
        stem = os.path.splitext(os.path.basename(img_path))[0]
        img, res = seg.segment_file(img_path)
        gt = load_mask(mask_path)
        unary = res.blobs['score_pre'].argmax(axis=0).astype(np.uint8)
        base = os.path.join(args.out, stem)
        sg.save_label_png(unary, base + '_unary.png')
        sg.save_label_png(res.labels, base + '_crf.png')
        sg.save_rgb_png(sg.overlay(img, res.labels), base + '_overlay.png')
        ious = [100 * sg.iou_from_confusion(sg.confusion(lab, gt, 2))[1] for lab in (unary, res.labels)]
        print('%s: %d x %d, mean IoU unary %.1f, CRF-Grad %.1f' % (stem, img.shape[1], img.shape[0], *ious))
        rows.append((stem, img, unary, res.labels, gt))
        inputs.append(seg.pre(img)[0])
    overview_figure(rows, os.path.join(args.out, 'overview.png'))
    E = plots.crf_energy_curves(seg.net, inputs)
    plots.plot_energies(E, normalize=False, path=os.path.join(args.out, 'energy.png'),
                        title='CRF energy per step, as the model runs (leak %g)'
                              % seg.net.layer_dict[sg.crf_layer_names(seg.net)[-1]].leak_factor)
    E0 = plots.crf_energy_curves(seg.net, inputs, leak_factor=0.0)
    plots.plot_energies(E0, normalize=False, path=os.path.join(args.out, 'energy_leak0.png'),
                        title='CRF energy per step with leak 0 (exact simplex projection)')
    print('wrote %s: overview.png, energy.png, energy_leak0.png and the label maps' % args.out)
    return 0
