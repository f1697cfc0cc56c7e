"""The one error type for bad input.

`NCLayersError` is a `ValueError`: raised for anything the user can fix (a config value,
a file, a data folder, arguments of a library call). The CLI prints it as one line and
exits with status 2; a sweep records it against the run and goes on. Any other
exception is a bug in nclayers and keeps its traceback.
"""

from __future__ import annotations


class NCLayersError(ValueError):
    """Bad input: the message names the argument or file, the value and the fix."""


__all__ = ["NCLayersError"]
