"""The one exception class users catch, with the place (file, line, layer, field) it refers to."""


class CrfGradError(ValueError):
    """Bad input: a file, layer or field we cannot use.

    The message always names where the problem is; ``file``, ``line``, ``layer``
    and ``field`` are kept as attributes for programs.
    """

    def __init__(self, message, file=None, line=None, layer=None, field=None):
        parts = []
        if file:
            parts.append(str(file) + (':%d' % line if line else ''))
        if layer:
            parts.append('layer %r' % layer)
        if field:
            parts.append('field %r' % field)
        prefix = ', '.join(parts)
        super().__init__('%s: %s' % (prefix, message) if prefix else message)
        self.file, self.line, self.layer, self.field = file, line, layer, field
