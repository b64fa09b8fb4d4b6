"""Writing files so that nothing is ever left half-written: a temporary file in the target's
folder, renamed over the target only once it is complete."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path, suffix=''):
    """``with atomic_path(p) as tmp: write(tmp)`` — ``tmp`` replaces ``p`` if the block succeeds,
    and is removed if it fails (the old ``p``, if any, is left untouched)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())    # mkstemp makes 0600 files; use the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(data, path):
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            f.write(data)


def write_text_atomic(text, path):
    with atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)
