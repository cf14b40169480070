"""Replace a file all at once: readers see the old content or the new, never a part."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE = 0o600


def write_atomically(path: str | Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write `data` to a temporary file beside `path` (created 0600), fsync, chmod `mode`, rename."""
    path = Path(path)
    # The temporary name must not end like the target: node-exporter reads every *.prom.
    handle, temporary = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode() if isinstance(data, str) else data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:
        directory = os.open(path.resolve().parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)  # makes the rename itself survive a crash
    except OSError:
        pass
    finally:
        os.close(directory)


def write_private(path: str | Path, data: str | bytes) -> None:
    """`write_atomically` for keys, state and outputs: readable by the owner only."""
    write_atomically(path, data, PRIVATE)
