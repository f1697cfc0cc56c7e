"""Writing files so that a kill never leaves half of one, and strict JSON.

`atomic_write(path, data)` writes to a temporary file beside `path`, flushes it to disk
and renames it over `path`: a reader sees the old file or the new one, never a torn
one, whatever moment the writer is killed at. `dumps_json` writes strict JSON (a NaN
or an infinity becomes null: bare `NaN` is not JSON).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on a clean exit it is flushed,
    synced and renamed over `path`; on an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically."""
    mode = "wb" if isinstance(data, bytes) else "w"
    kwargs = {} if isinstance(data, bytes) else {"encoding": "utf-8", "newline": ""}
    with atomic_open(path, mode, **kwargs) as f:
        f.write(data)
    return Path(path)


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """Strict JSON text: non-finite floats as null, other objects by `str`."""
    return json.dumps(finite(obj), indent=2, allow_nan=False, default=str) + "\n"


__all__ = ["atomic_open", "atomic_write", "dumps_json", "finite"]
