"""Training logs in Caffe's (glog) line format, and a parser for them.

Writing: :func:`add_log_file` / :func:`add_terminal_handler` attach handlers with
:class:`GlogFormatter` to the ``crfgrad_cupy`` logger, so the solver's messages read like
Caffe's::

    I1126 05:15:46.123456  1234 solver.py:218] Iteration 20 (2.5 iter/s, 8s/20 iters), loss = 0.69
    I1126 05:15:46.123500  1234 solver.py:258]     Train net output #0: loss = 0.69 (* 1 = 0.69 loss)
    I1126 05:15:46.123510  1234 solver.py:301] Iteration 20, lr = 0.01

Reading: :func:`parse_caffe_log` turns such a log (ours, or a real Caffe log with either
glog date style, ``I1126`` or ``I20261126``) into two tables, ``train`` (iter, seconds,
loss = the smoothed loss Caffe displays, lr, ``output/<name>`` per train-net output) and
``test`` (iter, seconds, net, ``output/<name>`` per test-net output, ``loss`` with
test_compute_loss, ``iou_accuracy`` from IOUAccuracy layers); :func:`save_csv` writes them.
``seconds`` counts from the "Solving ..." line (else from the first time stamp).
"""
import collections
import csv
import datetime
import logging
import math
import os
import re
import sys

LOGGER_NAME = 'crfgrad_cupy'

_state = {'handlers': [], 'saved_level': None}


class GlogFormatter(logging.Formatter):
    """``Lmmdd hh:mm:ss.uuuuuu threadid file:line] message`` (L = I, W, E or F)."""

    LETTERS = {logging.DEBUG: 'I', logging.INFO: 'I', logging.WARNING: 'W', logging.ERROR: 'E',
               logging.CRITICAL: 'F'}

    def format(self, record):
        t = datetime.datetime.fromtimestamp(record.created)
        letter = self.LETTERS.get(record.levelno, 'I')
        prefix = '%s%02d%02d %02d:%02d:%02d.%06d %5d %s:%d] ' % (
            letter, t.month, t.day, t.hour, t.minute, t.second, t.microsecond, record.process or 0,
            record.filename, record.lineno)
        msg = record.getMessage()
        if record.exc_info:
            msg += '\n' + self.formatException(record.exc_info)
        return prefix + msg


class TqdmStreamHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so that log lines go above a running progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:   # logging must never raise
            self.handleError(record)


def _attach(handler):
    logger = logging.getLogger(LOGGER_NAME)
    if not _state['handlers']:
        _state['saved_level'] = logger.level
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    _state['handlers'].append(handler)
    return handler


def add_log_file(path, mode='a'):
    """Append Caffe-format lines of the ``crfgrad_cupy`` logger to ``path``; returns the handler."""
    handler = logging.FileHandler(os.fspath(path), mode=mode, encoding='utf-8')
    handler.setFormatter(GlogFormatter())
    handler.setLevel(logging.INFO)
    return _attach(handler)


def add_terminal_handler(stream=None, level=logging.INFO):
    """Caffe-format lines on the terminal (stderr), written around tqdm bars."""
    handler = TqdmStreamHandler(stream or sys.stderr)
    handler.setFormatter(GlogFormatter())
    handler.setLevel(level)
    return _attach(handler)


def remove_handler(handler):
    """Detach and close a handler added here (the logger level is restored with the last one)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.removeHandler(handler)
    handler.close()
    if handler in _state['handlers']:
        _state['handlers'].remove(handler)
        if not _state['handlers'] and _state['saved_level'] is not None:
            logger.setLevel(_state['saved_level'])
            _state['saved_level'] = None


# --- parsing -----------------------------------------------------------------------------------

_PREFIX = re.compile(r'^([IWEF])(\d{8}|\d{4}) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?\s+(\d+)\s+([^\]\s]+)\]\s?(.*)$')
_NUM = r'([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|-nan|inf|-inf))'
_TRAIN_ITER = re.compile(r'Iteration (\d+) \(.*\), loss = ' + _NUM)
_FINAL_ITER = re.compile(r'Iteration (\d+), loss = ' + _NUM)
_LR = re.compile(r'Iteration (\d+), lr = ' + _NUM)
_TESTING = re.compile(r'Iteration (\d+), Testing net \(#(\d+)\)')
_TRAIN_OUT = re.compile(r'Train net output #(\d+): (\S+) = ' + _NUM)
_TEST_OUT = re.compile(r'Test net output #(\d+): (\S+) = ' + _NUM)
_TEST_LOSS = re.compile(r'^Test loss: ' + _NUM)
_IOU = re.compile(r'IOU Accuracy ' + _NUM)


def _num(text):
    try:
        return float(text)
    except ValueError:
        return float('nan')


def _timestamp(m, year, last):
    """datetime of a glog prefix match; 4-digit dates take ``year`` (bumped on a new year)."""
    date = m.group(2)
    micro = int((m.group(6) or '0').ljust(6, '0'))
    hh, mm, ss = int(m.group(3)), int(m.group(4)), int(m.group(5))
    if len(date) == 8:
        return datetime.datetime(int(date[:4]), int(date[4:6]), int(date[6:]), hh, mm, ss, micro), year
    month, day = int(date[:2]), int(date[2:])
    if last is not None and month < last.month:
        year += 1
    try:
        return datetime.datetime(year, month, day, hh, mm, ss, micro), year
    except ValueError:   # 29 February in a year we guessed
        return datetime.datetime(year + 1 if month == 2 else year, month, day, hh, mm, ss, micro), year


class _Table:
    def __init__(self, fixed):
        self.columns = list(fixed)
        self.rows = []

    def new_row(self, **values):
        row = collections.OrderedDict(values)
        self.rows.append(row)
        return row

    def set(self, row, key, value):
        if key not in self.columns:
            self.columns.append(key)
        row[key] = value

    def to_dict(self):
        return collections.OrderedDict(
            (c, [row.get(c, float('nan')) for row in self.rows]) for c in self.columns)


def _set_output(table, row, name, value):
    key = 'output/' + name
    k = 1
    while key in row:       # a blob with several elements: output/name, output/name_1, ...
        key = 'output/%s_%d' % (name, k)
        k += 1
    table.set(row, key, value)


def parse_caffe_log(path):
    """``{'train': columns, 'test': columns}``, each an OrderedDict column -> list (NaN = absent).

    train columns: iter, seconds, loss (smoothed), lr, output/<name>...;
    test columns: iter, seconds, net, output/<name>..., loss, iou_accuracy...
    """
    path = os.fspath(path)
    try:
        with open(path, 'r', encoding='utf-8', errors='replace') as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        from .errors import CrfGradError
        raise CrfGradError('log file not found', file=path) from None
    try:
        year = datetime.datetime.fromtimestamp(os.path.getmtime(path)).year
    except OSError:
        year = 1970
    entries = []            # (datetime, message)
    last = None
    for line in lines:
        m = _PREFIX.match(line)
        if not m:
            continue
        t, year = _timestamp(m, year, last)
        last = t
        entries.append((t, m.group(9)))
    if not entries:
        return collections.OrderedDict([('train', _Table(['iter', 'seconds', 'loss', 'lr']).to_dict()),
                                        ('test', _Table(['iter', 'seconds', 'net']).to_dict())])
    start = entries[0][0]
    for t, msg in entries:
        if msg.startswith('Solving '):
            start = t
            break
    train = _Table(['iter', 'seconds', 'loss', 'lr'])
    test = _Table(['iter', 'seconds', 'net'])
    train_row = test_row = None
    mode = None             # 'train' or 'test': which row output lines belong to
    for t, msg in entries:
        seconds = (t - start).total_seconds()
        m = _TRAIN_ITER.search(msg) or _FINAL_ITER.search(msg)
        if m and not _LR.search(msg):
            train_row = train.new_row(iter=int(m.group(1)), seconds=seconds, loss=_num(m.group(2)),
                                      lr=float('nan'))
            mode = 'train'
            continue
        m = _LR.search(msg)
        if m:
            it = int(m.group(1))
            if train_row is None or train_row['iter'] != it:
                train_row = train.new_row(iter=it, seconds=seconds, loss=float('nan'), lr=float('nan'))
            train_row['lr'] = _num(m.group(2))
            continue
        m = _TESTING.search(msg)
        if m:
            test_row = test.new_row(iter=int(m.group(1)), seconds=seconds, net=int(m.group(2)))
            mode = 'test'
            continue
        m = _TRAIN_OUT.search(msg)
        if m and train_row is not None:
            _set_output(train, train_row, m.group(2), _num(m.group(3)))
            continue
        m = _TEST_OUT.search(msg)
        if m and test_row is not None:
            _set_output(test, test_row, m.group(2), _num(m.group(3)))
            test_row['seconds'] = seconds        # when the test finished
            continue
        m = _TEST_LOSS.search(msg)
        if m and test_row is not None:
            test.set(test_row, 'loss', _num(m.group(1)))
            continue
        m = _IOU.search(msg)
        if m and test_row is not None and mode == 'test':
            key = 'iou_accuracy'
            k = 1
            while key in test_row:
                key = 'iou_accuracy_%d' % k
                k += 1
            test.set(test_row, key, _num(m.group(1)))
    return collections.OrderedDict([('train', train.to_dict()), ('test', test.to_dict())])


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ''
        return repr(v)
    return str(v)


def save_csv(tables, prefix):
    """Write ``<prefix>.train.csv`` and ``<prefix>.test.csv`` (header = column names); returns the paths."""
    prefix = os.fspath(prefix)
    paths = []
    for name, cols in tables.items():
        out = '%s.%s.csv' % (prefix, name)
        keys = list(cols)
        n = len(cols[keys[0]]) if keys else 0
        with open(out, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(keys)
            for i in range(n):
                w.writerow([_fmt(cols[k][i]) for k in keys])
        paths.append(out)
    return paths


def read_csv(path):
    """Columns of a CSV written by :func:`save_csv` (numbers as float, empty as NaN)."""
    with open(os.fspath(path), newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return collections.OrderedDict()
    header, body = rows[0], rows[1:]
    out = collections.OrderedDict((h, []) for h in header)
    for r in body:
        for h, v in zip(header, r):
            out[h].append(float(v) if v != '' else float('nan'))
    return out
