"""Text-format nets and solvers (.prototxt): parse strictly, upgrade legacy definitions, write.

Parsing is strict like Caffe's: an unknown field name or a syntax error is an
error, reported with file, line and the offending field.
"""
import logging
import os
import re

from google.protobuf import text_format

from ..errors import CrfGradError
from ..proto import caffe_pb2
from . import upgrade
from .atomic import write_text_atomic

log = logging.getLogger('crfgrad_cupy')

_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')
_PREFIX = re.compile(r'^\s*(\d+):(\d+)\s*:\s*')


def _is_text(source):
    return isinstance(source, str) and ('{' in source or ':' in source or '\n' in source) \
        and not os.path.exists(source)


def _read(path):
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise CrfGradError('file not found', file=path) from None
    except IsADirectoryError:
        raise CrfGradError('is a directory, not a prototxt file', file=path) from None
    except OSError as exc:
        raise CrfGradError('cannot read: %s' % (exc.strerror or exc), file=path) from None
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b'\n') + 1
        raise CrfGradError('not a text prototxt (undecodable byte 0x%02x; a binary file such as '
                           'a .caffemodel?)' % data[exc.start], file=path, line=line) from None


def _field_of(error_text, text, line, column):
    """The field an error is about: the unknown name, else the last ``name:`` before the error."""
    m = _UNKNOWN_FIELD.search(error_text)
    if m:
        return m.group(1)
    lines = text.split('\n')
    if not line or not 0 < line <= len(lines):
        return None
    col = max(0, (column or 1) - 1)
    # search back from the error position, over earlier lines if needed
    chunks = [lines[line - 1][:col + 1]] + [lines[i] for i in range(line - 2, -1, -1)]
    for chunk in chunks:
        names = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?::|\{)', chunk)
        if names:
            return names[-1]
    return None


def parse_text(text, message, source=None):
    """Parse ``text`` into ``message`` in place; errors name file:line and the field."""
    try:
        text_format.Merge(text, message, allow_unknown_extension=False)
    except text_format.ParseError as exc:
        line = exc.GetLine() if hasattr(exc, 'GetLine') else None
        column = exc.GetColumn() if hasattr(exc, 'GetColumn') else None
        msg = str(exc)
        m = _PREFIX.match(msg)
        if m:
            line = line or int(m.group(1))
            column = column or int(m.group(2))
            msg = msg[m.end():]
        field = _field_of(msg, text, line, column)
        where = ' (column %d)' % column if column else ''
        raise CrfGradError('syntax error in %s text%s: %s'
                           % (message.DESCRIPTOR.name, where, msg.strip()),
                           file=source or '<text>', line=line, field=field) from None
    return message


def _text_and_name(source):
    if _is_text(source):
        return source, '<text>'
    path = os.fspath(source)
    return _read(path), path


def load_net_param(source, upgrade_legacy=True):
    """NetParameter from a prototxt path, prototxt text, or a NetParameter (upgraded copy).

    Legacy (V0/V1, net-level inputs, DeepLab ``hole``) definitions are upgraded
    with a warning on the ``crfgrad_cupy`` logger.
    """
    if isinstance(source, caffe_pb2.NetParameter):
        net, name = caffe_pb2.NetParameter(), '<NetParameter>'
        net.CopyFrom(source)
    else:
        text, name = _text_and_name(source)
        net = parse_text(text, caffe_pb2.NetParameter(), name)
    if upgrade_legacy and upgrade.needs_upgrade(net):
        net, warnings = upgrade.upgrade_net_param(net, name)
        for w in warnings:
            log.warning('%s: %s', name, w)
    return net


def load_solver_param(source):
    """SolverParameter from a path or text; the deprecated ``solver_type`` enum becomes ``type``."""
    if isinstance(source, caffe_pb2.SolverParameter):
        sp, name = caffe_pb2.SolverParameter(), '<SolverParameter>'
        sp.CopyFrom(source)
    else:
        text, name = _text_and_name(source)
        sp = parse_text(text, caffe_pb2.SolverParameter(), name)
    if upgrade.solver_needs_upgrade(sp):
        sp = upgrade.upgrade_solver_param(sp, name)
        log.warning('%s: upgraded deprecated solver_type to type: "%s"', name, sp.type)
    return sp


def to_text(message):
    """Caffe-style text format of a message (2-space indentation, fields in schema order)."""
    return text_format.MessageToString(message)


def write_prototxt(message, path):
    """Write a message (NetParameter, SolverParameter, ...) as a text prototxt."""
    write_text_atomic(to_text(message), path)
