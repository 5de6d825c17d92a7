"""Writing a file atomically: readers see the whole old file or the whole new one, never a part.

One convention for every file the suite writes (results, manifests, split files, teacher-cache entries,
exports): write a temporary file beside the target (``.<name>.tmp<pid>``, per process, so that DDP ranks
never share one), flush it to disk (``fsync``), then ``os.replace`` it onto the target. If anything fails
before the rename, the temporary file is removed, so an interrupted write leaves neither a partial target
nor an orphan (only a killed process can leave its temporary file behind).

Standard library only, and nothing of ``lesion_kd``: every layer may import it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The temporary file beside ``path`` that this process writes before the rename."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit it is fsynced and renamed onto
    ``path``, on any exception (or interrupt) it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``dst`` atomically (contents only, like :func:`shutil.copyfile`)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
