"""Leftovers of a killed run: temporary files a crash could not remove, swept on the next run.

Downloads and manifests are written to a temporary file and renamed into place, so a reader never
sees half a file; a ``kill -9`` leaves the temporary file behind. The next run in the same folder
removes the ones old enough that no live writer can own them (a live writer touches its file at
every chunk or line).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

_swept: set[tuple[str, str]] = set()
_lock = threading.Lock()


def sweep_stale(directory: Path, pattern: str, older_than: float) -> int:
    """Remove files in ``directory`` matching ``pattern`` not modified for ``older_than`` s.

    Once per directory and pattern per process. Returns how many were removed.

    Example:
        >>> sweep_stale(Path("/nonexistent-dir"), ".part-*", 600)
        0
    """
    with _lock:
        key = (str(directory), pattern)
        if key in _swept:
            return 0
        _swept.add(key)
    removed = 0
    cutoff = time.time() - older_than
    try:
        candidates = list(directory.glob(pattern))
    except OSError:
        return 0
    for path in candidates:
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:  # gone already, or not ours to remove
            continue
    return removed
