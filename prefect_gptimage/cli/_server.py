"""The Prefect API a command runs against: the user's server, or Prefect's own temporary one.

With ``PREFECT_API_URL`` set (or a profile naming a server, or Prefect Cloud) nothing happens
here. Without one, Prefect starts a temporary API server (a uvicorn subprocess) on a flow's first
API call. :func:`start_api` starts that same server, through the same public call
(``SubprocessASGIServer().start()``, what ``prefect.get_client`` does), just before the command
calls its flow, for two reasons:

* a server that fails or is too slow to answer
  (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``) is reported by the CLI in one line
  (:class:`ApiUnavailable`), before anything is submitted, instead of a traceback mid-flow;
* the CLI learns the server's process, so that a CLI killed with ``kill -9`` leaves no server
  behind. Prefect stops its temporary server at exit (``atexit``), which a killed process never
  reaches: the uvicorn process would run on, orphaned, holding the home's SQLite database. So
  on Linux a tiny guard process (:data:`GUARD`) waits for the CLI's end (the end of a pipe only
  the CLI holds, closed by the kernel however the CLI ends) and then stops that server, the way
  Prefect's own ``stop()`` does (SIGTERM, SIGKILL after 5 s). It holds the server by a pidfd,
  so it can never signal another process that reused the number. After a normal exit Prefect has
  already stopped the server and the guard just ends.

Prefect's server process writes to the stdout and stderr it inherits: a traceback when it fails,
warnings while it runs. So that neither lands in the command's output (``--json`` is read from
stdout), the server is started with this process's descriptors 1 and 2 pointing, for that moment
only, at a log file whose name is removed at once (nothing is left behind, even after
``kill -9``); a failure's last line is read back from it. ``--verbose`` lets it through.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

__all__ = ["GUARD", "ApiUnavailable", "start_api"]

#: The guard's program (``python -c``): argv[1] is the server's pidfd, stdin the CLI's pipe.
GUARD = """\
import os, select, signal, sys
pidfd = int(sys.argv[1])
try:
    while os.read(0, 4096):
        pass
except OSError:
    pass
try:
    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    if not select.select([pidfd], [], [], 5.0)[0]:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


class ApiUnavailable(Exception):
    """Prefect's temporary API server did not start, or did not answer in time."""


def start_api(verbose: bool = False) -> int | None:
    """Start Prefect's temporary API server if Prefect would use one; its process id, or None.

    None when a server is configured (``PREFECT_API_URL``, a profile, Cloud) or Prefect's
    ephemeral mode is off (the flow then fails as Prefect says). Raises :class:`ApiUnavailable`
    when the temporary server does not answer within Prefect's start-up timeout.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    from prefect_gptimage._compat import server_dependency_problem

    problem = server_dependency_problem()  # Prefect 3.6 beside a fastapi its server cannot use
    if problem is not None:
        raise ApiUnavailable(problem)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance prefect.get_client() uses (port None)
    with _server_output(verbose) as log, _guarding(server):
        try:
            server.start()
        except Exception as exc:  # a timeout, a crashed server, no free port
            raise ApiUnavailable(_why(exc, log)) from None
    process = server.server_process
    if process is None:
        raise ApiUnavailable("Prefect's temporary API server did not start")
    return process.pid


@contextlib.contextmanager
def _guarding(server: Any) -> Iterator[None]:
    """While ``server`` starts, guard each server process it spawns as soon as it exists (a
    server still booting is as orphaned by a ``kill -9`` as one that answers)."""
    done = threading.Event()
    guarded: set[int] = set()

    def watch() -> None:
        while True:
            process = getattr(server, "server_process", None)
            if process is not None and process.pid not in guarded and process.returncode is None:
                guarded.add(process.pid)
                _guard(process.pid)
            if done.wait(0.01):
                return

    watcher = threading.Thread(target=watch, name="prefect-gptimage-api-guard", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


@contextlib.contextmanager
def _server_output(verbose: bool) -> Iterator[BinaryIO | None]:
    """Descriptors 1 and 2 on an unlinked log file while the server starts (it inherits them);
    the file, to read back, or None with ``verbose`` (the server writes to the terminal)."""
    if verbose:
        yield None
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with tempfile.TemporaryFile() as log:  # unlinked at once on POSIX
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield log  # type: ignore[misc]
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _why(exc: BaseException, log: BinaryIO | None) -> str:
    """Prefect's error, and the last line the server wrote (its traceback's last line)."""
    text = str(exc).strip() or type(exc).__name__
    why = text.splitlines()[0][:300]
    if log is not None:
        log.seek(0)
        lines = [ln.strip() for ln in log.read().decode("utf-8", "replace").splitlines()]
        last = next((ln for ln in reversed(lines) if ln), "")
        if last:
            why = f"{why} The server said: {last[:300]}"
    return why


def _guard(pid: int) -> None:
    """Stop the server ``pid`` (this process's child) when this process ends (Linux)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:  # not Linux: Prefect's own atexit stop is all there is
        return
    try:
        pidfd = pidfd_open(pid)  # still our unreaped child: the number is surely the server's
    except OSError:
        return
    read_end, write_end = os.pipe()  # the write end is never closed: it closes when we end
    try:
        subprocess.Popen(  # our own interpreter, our own fixed program
            [sys.executable, "-S", "-c", GUARD, str(pidfd)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(pidfd,),
            start_new_session=True,  # Ctrl+C reaches the CLI, not its guard
        )
    except OSError:
        os.close(write_end)
    finally:
        os.close(read_end)
        os.close(pidfd)
