"""IOUAccuracy (the authors' fork): mean intersection-over-union accumulated over a test run.

bottom[0]: scores or probabilities (N, C, H, W); bottom[1]: labels (N, 1, H, W) (any shape
with N*H*W values).  Each forward adds the confusion of argmax(bottom[0]) against the labels
(pixels labelled ``ignore_label`` skipped) to running counts; on the ``test_iterations``-th
call the layer logs ``IOU Accuracy <m>`` with

    m = 100/C * sum_c I_c / (G_c + P_c - I_c + 1e-10)

(I: correct pixels of class c, G: ground-truth pixels of c, P: predicted pixels of c; every
class counts, also classes that never occur) and starts counting afresh.

top[0] is what the fork outputs: a softmax cross-entropy over bottom[0],
-sum log(max(softmax_label, FLT_MIN)) over non-ignored pixels (ignored only when
ignore_label is set), divided by their number (``normalize``, default) or by N.  Like every
loss layer it has loss weight 1 unless told otherwise.  An optional top[1] (an extension)
holds the mean IoU of the counts so far in this cycle, this call included; on the
``test_iterations``-th call it is the logged value.  ``last_mean_iou`` keeps the last
logged value.  The fork counts only the first image of a batch (it assumes N = 1); here
every image counts.  No gradient: a backward through it is an error (the fork aborts).
"""
import logging

import numpy as np

from .. import backend
from .base import Layer, register
from .softmax import FLT_MIN, softmax

log = logging.getLogger('crfgrad_cupy')


def confusion_counts(pred, label, num_classes, ignore_label):
    """(I, G, P): per-class intersections, ground-truth and predicted pixel counts (int64)."""
    xp = backend.get_array_module(pred)
    valid = label != ignore_label
    p = pred[valid]
    g = label[valid]
    inter = xp.bincount(g[p == g], minlength=num_classes)[:num_classes]
    gt = xp.bincount(g, minlength=num_classes)[:num_classes]
    pr = xp.bincount(p, minlength=num_classes)[:num_classes]
    return inter, gt, pr


def mean_iou(inter, gt, pred):
    """100 * mean_c I_c / (G_c + P_c - I_c + 1e-10) in float64 (the fork's formula)."""
    inter = np.asarray(inter, np.float64)
    union = np.asarray(gt, np.float64) + np.asarray(pred, np.float64) - inter
    return float(np.mean(100.0 * inter / (union + 1e-10)))


@register('IOUAccuracy')
class IOUAccuracyLayer(Layer):
    exact_num_bottom = 2
    min_top = 0
    max_top = 2
    auto_top_blobs = True
    is_loss = True

    def allow_force_backward(self, bottom_index):
        return False

    def layer_setup(self, bottom, top):
        p = self.param.iou_accuracy_param
        self.ignore_label = int(p.ignore_label)
        self.has_ignore = p.HasField('ignore_label')
        self.normalize = bool(p.normalize)
        self.test_iterations = int(p.test_iterations)
        if self.test_iterations <= 0:
            raise self.error('test_iterations must be positive (the number of forward calls to '
                             'accumulate)', field='iou_accuracy_param.test_iterations')
        self.current_count = 0
        self.last_mean_iou = None
        self._counts = None

    def reshape(self, bottom, top):
        s0 = bottom[0].shape
        if len(s0) < 2:
            raise self.error('bottom[0] needs a channel axis (N, C, ...), got %s' % (s0,), field='bottom')
        self.num, self.channels = s0[0], s0[1]
        self.spatial = int(np.prod(s0[2:], dtype=np.int64))
        if bottom[1].count != self.num * self.spatial:
            raise self.error('labels have %d values, need N*H*W = %d' % (bottom[1].count, self.num * self.spatial),
                             field='bottom')
        if self._counts is None or self._counts[0].shape[0] != self.channels:
            self._counts = [np.zeros(self.channels, np.int64) for _ in range(3)]
        if top:
            top[0].reshape(())
        if len(top) > 1:
            top[1].reshape(())

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data.reshape(self.num, self.channels, self.spatial)
        lab = bottom[1].data.reshape(self.num, self.spatial).astype(np.int64)   # C++ truncation
        valid_iou = lab != self.ignore_label
        bad = valid_iou & ((lab < 0) | (lab >= self.channels))
        if bool(bad.any()):
            raise self.error('labels must be in [0, %d) or the ignore_label %d; found %d outside'
                             % (self.channels, self.ignore_label, int(bad.sum())), field='bottom[1]')
        if self.current_count == 0:
            for c in self._counts:
                c[...] = 0
        pred = xp.argmax(x, axis=1)        # first maximum, as the fork's strict '>' scan
        counts = confusion_counts(pred.ravel(), lab.ravel(), self.channels, self.ignore_label)
        for acc, c in zip(self._counts, counts):
            acc += np.asarray(c.get() if hasattr(c, 'get') else c, np.int64)
        self.current_count += 1
        running = mean_iou(*self._counts)
        if self.current_count == self.test_iterations:
            log.info('IOU Accuracy %g', running)
            self.last_mean_iou = running
            self.current_count = 0
        if top:
            if not self.has_ignore and bool(((lab < 0) | (lab >= self.channels)).any()):
                raise self.error('labels outside [0, %d) for the loss: set ignore_label to skip them'
                                 % self.channels, field='iou_accuracy_param.ignore_label')
            t = x.dtype.type
            prob = softmax(x, 1)
            valid = valid_iou if self.has_ignore else xp.ones(lab.shape, dtype=bool)
            safe = xp.where(valid, lab, 0)
            p_lab = xp.take_along_axis(prob, safe[:, None, :], axis=1)[:, 0, :]
            nll = xp.where(valid, -xp.log(xp.maximum(p_lab, t(FLT_MIN))), t(0)).sum()
            norm = max(int(valid.sum()), 1) if self.normalize else self.num
            top[0].data[...] = nll / t(norm)
        if len(top) > 1:
            top[1].data[...] = running

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error('IOUAccuracy has no gradient: use it in the TEST phase only (or give it '
                             'loss_weight: 0)', field='loss_weight')
