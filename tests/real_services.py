"""Real services for scale-out tests: ``redis-server``, PostgreSQL and ``prefect server start``.

Part of the test suite, not of the package (the wheel ships the fal emulator and local S3 only):
``tests/conftest.py`` builds the ``redis_server``, ``postgres_server`` and ``prefect_server``
fixtures on it, tests import it as ``real_services`` (pytest puts ``tests/`` on ``sys.path``), and
the benchmarks put ``tests/`` on ``sys.path`` first.

Each starts as a child process on a free port of 127.0.0.1 with its files in a temporary
folder, and is stopped (and its folder removed) by :meth:`stop`. Nothing here is a stand-in: the
lock tests talk to the Redis server Debian ships, and the Prefect server runs its real migrations
against a real PostgreSQL cluster.

* :class:`RedisServer`: ``redis-server`` (Debian package ``redis-server``), no persistence.
* :class:`PostgresServer`: ``initdb`` + ``pg_ctl start`` (Debian package ``postgresql``) of a
  throwaway cluster with trust authentication; one database. PostgreSQL refuses to run as root,
  so as root the cluster runs as the ``postgres`` user.
* :class:`PrefectServer`: ``prefect server start`` with its own ``PREFECT_HOME``, on PostgreSQL
  when given a :class:`PostgresServer`, else on SQLite. Its concurrency leases are kept on disk
  (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``, as the README tells users to run it), so that
  :meth:`PrefectServer.restart` keeps the slots of a global concurrency limit in step with their
  leases; Prefect's default, in memory, forgets every lease on a restart while the database still
  counts their slots as taken, forever.

Each has ``restart()``: stop and start again on the same port with the same files, as an operator
restarting the service (the tests of what users notice when Redis or the Prefect server restarts
in the middle of a batch).

Each waits for its service to answer as long as a loaded CI machine may need (:data:`READY_S`:
under load ``prefect server start`` took over 60 s to answer its first health check), and fails
at once, with its log's tail, if the process exits first.

:func:`missing` tells which binaries are absent, for a clean ``pytest.skip``.

Example:
    >>> with RedisServer() as redis, PostgresServer() as pg, PrefectServer(pg) as api:
    ...     env = {"PREFECT_API_URL": api.api_url, "PREFECT_GPTIMAGE_LOCK_URL": redis.url}
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from typing_extensions import Self

__all__ = [
    "FILESYSTEM_LEASES",
    "MEMORY_LEASES",
    "READY_S",
    "PostgresServer",
    "PrefectServer",
    "RedisServer",
    "ServiceError",
    "client_env",
    "find_binary",
    "free_port",
    "missing",
]


#: Prefect server lease storages (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``): on disk, in the
#: server's ``PREFECT_HOME`` (survives a restart), and Prefect's default, in memory (does not).
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
MEMORY_LEASES = "prefect.server.concurrency.lease_storage.memory"


#: Seconds a service may take to answer after it was started (a generous deadline, not a
#: performance bound: it only decides when a service that never answers is given up on).
READY_S = 180.0


class ServiceError(RuntimeError):
    """A service did not start (its log's tail is in the message)."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in Debian's ``/usr/lib/postgresql/<version>/bin`` (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return None


def missing(*names: str) -> list[str]:
    """Which of these binaries cannot be found."""
    return [n for n in names if find_binary(n) is None]


def client_env(api_url: str, home: Path | str, **extra: str) -> dict[str, str]:
    """The environment of a process on a "machine" of its own that reports to ``api_url``: this
    process's environment (fal, AWS, ``PREFECT_GPTIMAGE_*`` settings) without any other Prefect
    setting, a fresh ``PREFECT_HOME`` at ``home``, then ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") or k.startswith("PREFECT_GPTIMAGE_")
    }
    env.pop("PREFECT_GPTIMAGE_LOCK_URL", None)
    Path(home).mkdir(parents=True, exist_ok=True)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **extra,
    )
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


class _Service:
    """Start/stop as a context manager."""

    def start(self) -> Self:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop_keeping_files(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def restart(self, down: float = 0.0) -> float:
        """Stop the service, stay down ``down`` seconds, start it again on the same port with the
        same files; the seconds it was unreachable."""
        started = time.monotonic()
        self.stop_keeping_files()
        time.sleep(down)
        self.start()
        return time.monotonic() - started


class RedisServer(_Service):
    """A ``redis-server`` on a free port, no persistence; :attr:`url` is ``redis://…/0``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gptimage-redis-"))
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Self:
        binary = find_binary("redis-server")
        if binary is None:
            raise ServiceError("redis-server is not installed (apt-get install redis-server)")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "no", "--logfile", str(self.log)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _wait_port(self.port, READY_S, self.proc):
            self.stop()
            raise ServiceError(f"redis-server did not start:\n{_tail(self.log)}")
        return self

    def stop_keeping_files(self) -> None:
        self.stop(remove=False)

    def stop(self, remove: bool = True) -> None:
        """Stop the server (SIGTERM, then SIGKILL); ``remove=False`` keeps its folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer(_Service):
    """A throwaway PostgreSQL cluster on a free port, trust authentication, one database.

    :attr:`url` is the SQLAlchemy URL Prefect takes in ``PREFECT_API_DATABASE_CONNECTION_URL``.
    """

    user = "prefect"
    database = "prefect"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gptimage-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> None:
        binary = find_binary(args[0])
        if binary is None:
            raise ServiceError(f"{args[0]} is not installed (apt-get install postgresql)")
        command = [binary, *args[1:]]
        if os.geteuid() == 0:  # postgres refuses root: run as the postgres user
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=READY_S + 30, cwd=self.dir
        )
        if done.returncode != 0:
            raise ServiceError(
                f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
                f"\n{_tail(self.log)}"
            )

    def _pg_start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += " -c max_connections=200"
        wait = ["-w", "-t", str(int(READY_S))]  # pg_ctl's own default is 60 s
        log = ["-l", str(self.log)]
        self._run("pg_ctl", "-D", str(self.data), *log, "-o", options, *wait, "start")
        self.started = True

    def _create(self) -> Self:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8")
        self._pg_start()
        host = ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.user]
        self._run("createdb", *host, self.database)
        return self

    def stop_keeping_files(self) -> None:
        """``pg_ctl stop -m fast``, the cluster kept (:meth:`start` then runs it again)."""
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.started = False

    def start(self) -> Self:
        if self.data.exists():  # a restart: the cluster and its database are there
            self._pg_start()
            return self
        return self._create()

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


class PrefectServer(_Service):
    """``prefect server start`` on a free port, its own ``PREFECT_HOME``; PostgreSQL if given.

    :attr:`api_url` is the value for ``PREFECT_API_URL`` of the processes that report to it.
    ``lease_storage``: where it keeps concurrency leases (default on disk, see the module docs).
    ``repossessor_seconds``: how often it gives back the slots of expired leases (Prefect's
    default 15 s; a test of a killed holder sets 1 s to measure the lease itself).
    """

    def __init__(
        self,
        database: PostgresServer | None = None,
        port: int | None = None,
        lease_storage: str = FILESYSTEM_LEASES,
        repossessor_seconds: float | None = None,
    ) -> None:
        self.database = database
        self.lease_storage = lease_storage
        self.repossessor_seconds = repossessor_seconds
        self.port = port or free_port()
        self.home = Path(tempfile.mkdtemp(prefix="gptimage-prefect-server-"))
        self.log = self.home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def backend(self) -> str:
        return "postgresql" if self.database is not None else "sqlite"

    def env(self) -> dict[str, str]:
        """The server process's environment (the parent's, minus any other Prefect API)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=self.lease_storage,
        )
        if self.repossessor_seconds is not None:
            env["PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS"] = str(self.repossessor_seconds)
        if self.database is not None:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database.url
        return env

    def _limit_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.api_url}/v2/concurrency_limits/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:  # a loaded server is slow
            text = answer.read()
        return json.loads(text) if text else None

    def create_limit(self, size: int, prefix: str = "limit") -> str:
        """A global concurrency limit of ``size`` slots under a new name (``<prefix>-<hex>``)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self._limit_call("POST", "", {"name": name, "limit": size})
        return name

    def active_slots(self, name: str) -> int:
        """How many slots of the global concurrency limit ``name`` the server counts as taken."""
        return int(self._limit_call("GET", name)["active_slots"])

    def delete_limit(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self._limit_call("DELETE", name)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def start(self, timeout: float = READY_S) -> Self:
        command = [sys.executable, "-m", "prefect", "server", "start"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop(remove=False)
        raise ServiceError(f"prefect server ({self.backend}) did not start:\n{_tail(self.log)}")

    def stop_keeping_files(self) -> None:
        self.stop(remove=False)

    def stop(self, remove: bool = True) -> None:
        """Stop the server (SIGTERM to its process group, then SIGKILL); ``remove=False`` keeps
        its ``PREFECT_HOME`` (and the leases kept there)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if remove:
            shutil.rmtree(self.home, ignore_errors=True)
