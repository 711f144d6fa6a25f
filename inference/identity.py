"""What identifies a model beyond its name: its version and the SHA-256 digest of its weights.

Hashing is cached per file (path, size, modification time), so describing a model whose
weights did not change costs a ``stat``; nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path

from inference.errors import PermanentError

_CHUNK = 1 << 20
_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of one file, cached while its size and modification time stay the same."""
    try:
        st = path.stat()
    except OSError as exc:
        raise PermanentError(f"weights file {path} cannot be read: {exc.strerror}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _cache:
            return _cache[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _cache[key] = digest
    return digest


def weights_digest(paths: Iterable[Path]) -> str:
    """Digest of a model's weights: the file's own SHA-256 for one file; for several (nnU-Net
    folds) the SHA-256 of their digests in the given order, so any change in any file shows."""
    files = list(paths)
    if not files:
        raise PermanentError("a model needs at least one weights file to have a digest")
    if len(files) == 1:
        return file_digest(files[0])
    h = hashlib.sha256()
    for path in files:
        h.update(file_digest(path).encode("ascii"))
    return h.hexdigest()
