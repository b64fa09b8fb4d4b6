"""The ``crfgrad`` command.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser with ``set_defaults(func=run)``;
``run(args)`` returns the exit code.  Bad input (a CrfGradError, a missing file)
exits with code 2 and one line; ``--debug`` shows the traceback.
"""
import argparse
import importlib
import pkgutil
import sys

from ..errors import CrfGradError


def build_parser():
    parser = argparse.ArgumentParser(prog='crfgrad', description=__doc__.splitlines()[0])
    parser.add_argument('--debug', action='store_true', help='show tracebacks on errors')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith('_'):
            continue
        mod = importlib.import_module(__name__ + '.' + info.name)
        if hasattr(mod, 'register'):
            mod.register(sub)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    debug = args.debug
    try:
        code = args.func(args)
        return 0 if code is None else int(code)
    except (CrfGradError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if debug:
            raise
        msg = str(exc) if isinstance(exc, CrfGradError) else '%s: %s' % (
            getattr(exc, 'filename', '') or '', exc.strerror or exc)
        print('crfgrad: error: %s' % msg.replace('\n', ' '), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('crfgrad: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
