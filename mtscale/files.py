"""Writing files so that nothing half-written is ever left under the final name.

``atomic_write(path, data)`` writes text or bytes beside the target and renames it over;
``atomic_path(path)`` hands out the temporary path for writers that take a file name
(``torch.save``, ``safetensors``, ``pyarrow``) and renames it when the block ends without
an error. A crash or kill at any moment leaves either the old file or the new one, never a
truncated one (a stray ``*.tmp`` at worst, overwritten by the next write).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: writer(tmp)``: ``tmp`` becomes ``p`` if the block succeeds."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (str as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)
