"""Imports every layer module of this package once, so that all types are registered."""
import importlib
import pkgutil

from . import __path__ as _path

for _info in pkgutil.iter_modules(_path):
    if not _info.name.startswith('_') and _info.name not in ('base', 'fillers'):
        importlib.import_module(__package__ + '.' + _info.name)
