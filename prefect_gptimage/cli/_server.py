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
stdout), the server is spawned with this process's descriptors 1 and 2 pointing, until the
server process exists, at a log file whose name is removed at once (nothing is left behind, even
after ``kill -9``); a failure's last line is read back from it. ``--verbose`` lets it through.

**Start-up in the background.** :class:`ApiStart` starts the server in a thread, so the command
imports its flow module (Prefect's engine, prefect-aws, boto3: several seconds of one core)
while the server process imports Prefect's server and migrates its database on the other core.
The command waits for it (:meth:`ApiStart.wait`) before it calls its flow: nothing is created
or submitted before the API answers. The temporary server serves this one command and has no
UI, so unless the user set them it starts with Prefect's public settings
:data:`TEMPORARY_SERVER_DEFAULTS`: it does not register every installed block type, which made
each server start import every Prefect integration installed (prefect-aws with its ECS worker,
prefect-dask with distributed, ...) and, on a fresh home, write their schemas first. Block types
are still registered by ``Block.save`` and by any other server start. Nor does it run
automations (Prefect's triggers and actions services, whose start built a second copy of the
server's app while the server could not yet answer): a server that lives for one command is no
place for them; run a server (``prefect server start``) to use automations.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

__all__ = ["GUARD", "TEMPORARY_SERVER_DEFAULTS", "ApiStart", "ApiUnavailable", "start_api"]

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


#: Prefect settings (public, documented) the CLI's temporary server starts with unless the user
#: set them: no block type registration at start, no automations (see the module docs). Named
#: here, turned into Prefect's ``Setting`` objects on use (this module loads before Prefect, and
#: ``temporary_settings`` takes ``Setting`` keys on every supported Prefect, 3.6 included).
TEMPORARY_SERVER_DEFAULTS: dict[str, Any] = {
    "PREFECT_API_BLOCKS_REGISTER_ON_START": False,
    "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": False,
    "PREFECT_API_SERVICES_TRIGGERS_ENABLED": False,
}


class ApiUnavailable(Exception):
    """Prefect's temporary API server did not start, or did not answer in time."""


def start_api(verbose: bool = False) -> int | None:
    """Start Prefect's temporary API server if Prefect would use one; its process id, or None.

    None when a server is configured (``PREFECT_API_URL``, a profile, Cloud) or Prefect's
    ephemeral mode is off (the flow then fails as Prefect says). Raises :class:`ApiUnavailable`
    when the temporary server does not answer within Prefect's start-up timeout.
    """
    return ApiStart(verbose).begin().wait()


class ApiStart:
    """Prefect's temporary API server, started in a background thread (see the module docs).

    Example:
        >>> api = ApiStart(verbose=False).begin()  # doctest: +SKIP
        >>> import prefect_gptimage.flows.batch  # doctest: +SKIP
        >>> pid = api.wait()  # None when a server is configured  # doctest: +SKIP
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._error: str | None = None

    def begin(self) -> ApiStart:
        """Start the server's start-up if Prefect would use a temporary server; return at once."""
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            return self
        from prefect_gptimage._compat import server_dependency_problem

        problem = server_dependency_problem()  # Prefect 3.6 beside a fastapi its server cannot use
        if problem is not None:
            self._error = problem
            return self
        self._thread = threading.Thread(
            target=self._start, name="prefect-gptimage-api-start", daemon=True
        )
        self._thread.start()
        return self

    def wait(self) -> int | None:
        """The server's process id once it answers (None: no temporary server is used), or
        :class:`ApiUnavailable` when it failed or did not answer in Prefect's start-up timeout."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise ApiUnavailable(self._error)
        return self._pid

    def _start(self) -> None:
        import prefect.settings
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import temporary_settings

        defaults = {getattr(prefect.settings, k): v for k, v in TEMPORARY_SERVER_DEFAULTS.items()}

        server = SubprocessASGIServer()  # the instance prefect.get_client() uses (port None)
        try:
            with (
                temporary_settings(set_defaults=defaults),
                _server_output(self.verbose) as (log, spawned),
                _guarding(server, spawned),
            ):
                try:
                    server.start()
                except Exception as exc:  # a timeout, a crashed server, no free port
                    self._error = _why(exc, log)
                    return
        except Exception as exc:  # the settings, the log file: nothing was started
            self._error = str(exc) or type(exc).__name__
            return
        process = server.server_process
        if process is None:
            self._error = "Prefect's temporary API server did not start"
            return
        self._pid = process.pid


@contextlib.contextmanager
def _guarding(server: Any, spawned: Callable[[], None]) -> Iterator[None]:
    """While ``server`` starts, guard each server process it spawns as soon as it exists (a
    server still booting is as orphaned by a ``kill -9`` as one that answers), then call
    ``spawned()``."""
    done = threading.Event()
    guarded: set[int] = set()

    def watch() -> None:
        while True:
            process = getattr(server, "server_process", None)
            if process is not None and process.pid not in guarded and process.returncode is None:
                guarded.add(process.pid)
                _guard(process.pid)
                spawned()
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
def _server_output(verbose: bool) -> Iterator[tuple[BinaryIO | None, Callable[[], None]]]:
    """Descriptors 1 and 2 on an unlinked log file until the server process exists (it inherits
    them): the file, to read back (None with ``verbose``: the server writes to the terminal),
    and the call that points 1 and 2 back at the terminal once the server is spawned."""
    if verbose:
        yield None, lambda: None
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    lock = threading.Lock()
    saved: list[int] = []

    def restore() -> None:
        with lock:
            if not saved:
                return
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            saved.clear()

    with tempfile.TemporaryFile() as log:  # unlinked at once on POSIX
        saved.extend([os.dup(1), os.dup(2)])
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield log, restore  # type: ignore[misc]
        finally:
            restore()


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
