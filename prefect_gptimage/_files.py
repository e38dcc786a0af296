"""Local files written to a temporary name and renamed into place, and their leftovers.

Downloads and manifests are written to a temporary file and renamed into place, so a reader never
sees half a file; a ``kill -9`` leaves the temporary file behind. The next run in the same folder
removes the ones old enough that no live writer can own them (a live writer touches its file at
every chunk or line).

Every file this package writes gets the mode a plain ``open(path, "w")`` gives: ``0o666`` less
the process's umask (``0o644`` under the usual ``022``). :func:`create_temp` is the one place a
temporary file is created: ``tempfile.mkstemp`` would make it ``0o600``, and the rename would keep
that, so an image would be private where the manifest and ``index.html`` beside it are not.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

#: Open flags of a new temporary file: created here or failing, never through a symlink.
_CREATE_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def create_temp(directory: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """A new file ``{prefix}{random}{suffix}`` in ``directory``, open for writing (binary).

    Like :func:`tempfile.mkstemp`, but the mode is the umask's (``0o666 & ~umask``), as for any
    file written with ``open``. Returns the descriptor (the caller closes it, e.g. through
    :func:`os.fdopen`) and the path.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> fd, path = create_temp(folder, ".part-")
        >>> os.close(fd); path.name.startswith(".part-"), path.parent == folder
        (True, True)
    """
    for _ in range(100):
        path = directory / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, _CREATE_FLAGS, 0o666), path
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {directory}")


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
