"""The one base class of acg's own errors: what the CLI reports as a clear message instead of a traceback."""


class ACGError(Exception):
    """An input acg cannot use, named with the file, field or op at fault and what is supported."""
