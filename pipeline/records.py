"""Small records written whole or not at all: the submission record, benchmark results.

A record is written to a temporary file beside it, flushed to disk (fsync), then renamed
over the old one, and the folder is flushed so that the rename itself survives a power
cut: a reader, or a job killed or out of space while writing, sees the old record or the
new one, never half of one. (The lock file's holder line is the one small file written in
place: renaming it would make another file, and so another lock.)
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; nothing is left behind on failure."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(text.encode())
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
