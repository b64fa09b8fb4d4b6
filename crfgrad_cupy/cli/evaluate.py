"""`crfgrad evaluate --model default|PROTOTXT [--weights W] --data DIR [--json OUT]`: mean IoU.

DIR holds images/ and masks/ (masks/<stem>.png; 0 = background, 1 = foreground, ... ;
255 = ignore).  The unary blob (score_pre) and the CRF blob (score_post) are both scored:
their class maps are taken back to each mask's FULL resolution (padding cropped away,
bilinear upsampling), the argmax is compared with the mask, and intersections/unions are
summed per class over the whole set; the mean IoU is the mean over the classes.
"""
import json
import sys


def register(sub):
    from .segment import add_preprocess_args
    p = sub.add_parser('evaluate', help='mean IoU of the unary and CRF outputs over images/ + masks/',
                       description=__doc__)
    p.add_argument('--model', default='default', help="'default' (the bundled horse model) or a deploy .prototxt")
    p.add_argument('--weights', help='weights for --model (default: the bundled ones with --model default)')
    p.add_argument('--data', required=True, help='folder with images/ and masks/')
    p.add_argument('--json', help='write the results as JSON here')
    p.add_argument('--unary-blob', default='score_pre', help='blob of the unary (pre-CRF) probabilities')
    p.add_argument('--crf-blob', default='score_post', help='blob of the CRF output')
    p.add_argument('--num-classes', type=int, help='classes to score (default: the blob\'s channels)')
    add_preprocess_args(p)
    p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=run)


def format_table(res):
    names = ['background', 'foreground'] if len(res['unary_iou_per_class']) == 2 else \
        ['class %d' % i for i in range(len(res['unary_iou_per_class']))]
    head = ['output', 'blob'] + ['IoU ' + n for n in names] + ['mean IoU']
    rows = [head]
    for key, label in (('unary', 'unary'), ('crf', 'CRF-Grad')):
        rows.append([label, res['blobs'][key]] + ['%.2f' % v for v in res['%s_iou_per_class' % key]]
                    + ['%.2f' % res['%s_miou' % key]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ['  '.join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    lines.append('%d images; IoU in percent, at full mask resolution, summed over the set' % res['images'])
    return '\n'.join(lines)


def run(args):
    from functools import partial

    from tqdm import tqdm

    from ..segment import evaluate_folder
    from .segment import segment_options
    progress = None if args.no_progress else partial(tqdm, desc='evaluate', unit='img', file=sys.stderr)
    res = evaluate_folder(args.model, args.weights, args.data, unary_blob=args.unary_blob,
                          crf_blob=args.crf_blob, num_classes=args.num_classes, progress=progress,
                          **segment_options(args))
    print(format_table(res))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)
    return 0
