"""Start Prefect's ephemeral API server while the CLI is still importing, not after.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server (a uvicorn subprocess) on the
flow's first API call: only after this process has imported Prefect, and then the server module
itself, and then it waits for the server to import the same modules again and answer. Measured on
a 2-core machine, that is ~7 s of sequential start-up before the first fal submit. Starting the
same server as the very first thing the CLI does lets it boot on the other core while this
process imports and validates its input, which takes seconds off every command.

The server runs the app Prefect's ``SubprocessASGIServer`` runs (same uvicorn factory, same
private environment switches), then is *adopted*: once Prefect's settings are loaded, if they
confirm Prefect would have used an ephemeral API (no API URL in the profile, ephemeral mode
enabled), ``PREFECT_API_URL`` points at it for the rest of this process; if not, it is stopped
unused. Any failure falls back to Prefect's own start-up, so this can only make a command
faster, never break it. Unlike Prefect's, on POSIX it gets its listening socket from us (no
other process can take the port while it boots), runs in its own session (Ctrl+C reaches only
the CLI, which stops it after Prefect's exit hooks have flushed logs and events to it) and, on
Linux, is killed if the CLI dies. Its telemetry is off (``PREFECT_SERVER_ANALYTICS_ENABLED``
for that process only: offline, the failed upload was the one line a normal run logged). Its
output goes to a log file that is unlinked at once on POSIX (read back through a descriptor we
keep, so nothing is left in the temporary folder even after ``kill -9``), and summed up at exit.
A user's own server (``PREFECT_API_URL``, or a profile naming one) is never touched.

Example::

    early = EarlyApi.start()  # first thing, before importing Prefect
    ...  # imports, input validation
    if early:
        early.adopt()  # before the first flow call
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

# what Prefect's SubprocessASGIServer sets for its server (no UI, ephemeral mode), and no
# telemetry: a throwaway server has nothing to report, and offline the upload fails and logs
_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
#: How long (seconds) a started server that is still alive is waited for before Prefect's own
#: start-up is tried instead (at least PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS).
ALIVE_WAIT_S = 120.0
#: At most this many of the server's error lines are printed at exit.
_EXCERPT_LINES = 3
_FALSE = {"0", "false", "no", "off"}


def _profile_names_an_api() -> bool:
    """Whether the active profile in ``profiles.toml`` sets ``PREFECT_API_URL`` (Prefect Cloud,
    a team server). A cheap look before importing Prefect; Prefect's settings decide in the end.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10: let adopt() find out
        return False
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    profile = profiles.get("profiles", {}).get(active, {})
    return isinstance(profile, dict) and bool(profile.get("PREFECT_API_URL"))


def _die_with_parent_hook() -> Callable[[], None] | None:
    """For the server's process, run before exec: SIGKILL it when this process dies (Linux).

    SIGKILL, not SIGTERM: a server still migrating a fresh home's database defers SIGTERM until
    its start-up is over (seconds), holding SQLite's lock against the resume the user runs next.
    Nothing is lost: the process it served is gone, and SQLite rolls back an unfinished write.

    ``prctl`` is looked up here, in the parent, so the child (forked from a process that may
    run threads) only makes the call. The signal follows the death of the *thread* that
    forked, so this is for the main thread only (where the CLI starts the server). Were this
    process killed between the fork and the call, no signal would ever come: the child checks
    that its parent is still the one that forked it, and exits otherwise (before exec, a
    signal would only reach the handlers it inherited from us).
    """
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # already orphaned: the signal was due before we asked
            os._exit(1)

    return hook


class EarlyApi:
    """A temporary Prefect API server started ahead of need (see the module docstring)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        log_reader: BinaryIO | None = None,
    ) -> None:
        self.process: subprocess.Popen[bytes] | None = process
        self.port = port
        self.log_path = log_path
        #: the log, kept open after its name was unlinked (POSIX); None: read it by name
        self.log_reader = log_reader
        #: whether Prefect uses this server (only then is its log worth a word at exit)
        self.adopted = False
        self.api_url = f"http://127.0.0.1:{port}/api"

    @classmethod
    def start(cls) -> EarlyApi | None:
        """Spawn the server unless the environment or profile names an API (or forbids one)."""
        if os.environ.get("PREFECT_API_URL") or _profile_names_an_api():
            return None
        allowed = os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_ENABLED",
            os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true"),
        )
        spec = importlib.util.find_spec("prefect")
        if allowed.strip().lower() in _FALSE or spec is None or not spec.submodule_search_locations:
            return None
        app_dir = Path(next(iter(spec.submodule_search_locations))).parent
        # bound here and handed over (POSIX), so no other process can take the port meanwhile
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        where = ["--host", "127.0.0.1", "--port", str(port)]
        extra: dict[str, Any] = {}
        if os.name == "posix":
            # uvicorn adopts the descriptor as if it were a Unix socket, so asyncio would not
            # turn Nagle off on its connections (40 ms stalls per API call); accepted sockets
            # inherit it from the listener
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(128)
            where = ["--fd", str(sock.fileno())]
            # Ctrl+C reaches only us (we stop it after Prefect's last flush); if we are killed,
            # Linux stops it too instead of leaving it orphaned
            extra = {"pass_fds": (sock.fileno(),), "start_new_session": True}
            hook = _die_with_parent_hook() if sys.platform.startswith("linux") else None
            if hook is not None:
                extra["preexec_fn"] = hook
        else:
            sock.close()
        log = tempfile.NamedTemporaryFile(  # noqa: SIM115  # the server writes it until stop()
            "wb", prefix="prefect-gptimage-api-", suffix=".log", delete=False
        )
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(app_dir),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    *where,
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env={**os.environ, **_SERVER_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **extra,
            )
        except OSError:
            log.close()
            Path(log.name).unlink(missing_ok=True)
            return None
        finally:
            log.close()  # the server holds its own descriptors
            sock.close()
        reader: BinaryIO | None = None
        if os.name == "posix":  # no name left behind, whatever happens to us
            with contextlib.suppress(OSError):
                reader = open(log.name, "rb")  # noqa: SIM115  # read in stop(), closed there
                os.unlink(log.name)
        early = cls(process, port, Path(log.name), reader)
        atexit.register(early.stop)  # registered before Prefect's hooks, so it runs after them
        return early

    def adopt(self) -> bool:
        """Point Prefect at this server if Prefect would have started one; else stop it.

        Waits until the server answers (at most Prefect's own
        ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``). Returns whether it was adopted;
        when not, Prefect behaves as if this module did not exist, except that the temporary
        server Prefect then starts itself has its telemetry off too.
        """
        try:
            self.adopted = self._adopt()
        except Exception:  # e.g. Prefect < 3.6 (no refresh_global_settings_context): its own way
            self.adopted = False
        if not self.adopted:
            self.stop()
        return self.adopted

    def _adopt(self) -> bool:
        import httpx
        from prefect.context import refresh_global_settings_context
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            return False
        # Prefect's own start-up timeout, stretched: while our server lives it is booting or
        # migrating a fresh home's database, which a fallback server would only start over
        # (and contend with for SQLite's lock); on a loaded machine that takes well over 20 s
        timeout = settings.server.ephemeral.startup_timeout_seconds
        deadline = time.monotonic() + max(timeout, ALIVE_WAIT_S)
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    break  # it exited: let Prefect start its own
                with contextlib.suppress(httpx.TransportError):
                    if http.get(f"{self.api_url}/health").status_code == 200:
                        os.environ["PREFECT_API_URL"] = self.api_url
                        # no UI runs there (nor would it outlive us): no dead "View at" links
                        os.environ.setdefault("PREFECT_UI_URL", "")
                        refresh_global_settings_context()
                        return True
                time.sleep(0.05)
        # too slow to answer (a loaded machine) or gone: Prefect starts its own temporary
        # server, from this process's environment; it is as throwaway as ours
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        return False

    def terminate(self) -> None:
        """Send the server SIGTERM without waiting (a process about to exit at once)."""
        if self.process is not None:
            self.process.terminate()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s, as Prefect does). Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._report_log()

    def _report_log(self) -> None:
        """Say in a few lines what the server logged, and remove the log."""
        try:
            if self.log_reader is not None:
                data = self.log_reader.read()
            else:
                data = self.log_path.read_bytes()
        except OSError:
            data = b""
        finally:
            if self.log_reader is not None:
                self.log_reader.close()
                self.log_reader = None
            with contextlib.suppress(OSError):
                self.log_path.unlink(missing_ok=True)
        if not self.adopted:
            return  # never used (stopped unadopted, perhaps mid start-up): nothing to tell
        text = data.decode("utf-8", errors="replace")
        for line in summarize_server_log(text):
            print(f"prefect-gptimage: {line}", file=sys.stderr)
        for line in server_log_excerpt(text):
            print(f"prefect-gptimage:   {line}", file=sys.stderr)


#: What Prefect's in-memory messaging logs for each event a slow consumer had no room for.
_DROPPED = "Subscription queue is full, dropping message"


def summarize_server_log(text: str) -> list[str]:
    """What a user should know about the temporary server's log, in a few lines (or none).

    At sustained rates above roughly 15 requests a second, the temporary server cannot record
    task runs as fast as they arrive: it logs one warning per dropped event (tens of thousands in
    a large batch) and, when stopped with a backlog, a traceback per cancelled write. Those are
    counted here instead of flooding the terminal.

    Example:
        >>> summarize_server_log("")
        []
    """
    if not text.strip():
        return []
    dropped = text.count(_DROPPED)
    other = [
        line
        for line in text.splitlines()
        if (" | ERROR " in line or " | WARNING " in line or " | CRITICAL " in line)
        and _DROPPED not in line
    ]
    lines = []
    if dropped:
        lines.append(
            f"Prefect's temporary API server dropped {dropped} task-run event(s): it could not "
            "record them as fast as they came, so its run history is incomplete. Images, S3 "
            "objects, manifest and caches are not affected. For sustained rates this high, run "
            "against a Prefect server (PREFECT_API_URL)."
        )
    if other:
        lines.append(f"Prefect's temporary API server logged {len(other)} error(s)/warning(s).")
    if not lines:
        lines.append("Prefect's temporary API server wrote to its log.")
    return lines


def server_log_excerpt(text: str, limit: int = _EXCERPT_LINES) -> list[str]:
    """The first few error or warning lines of the server's log (other than dropped events),
    shortened: the log itself is removed at exit, so these are what a user gets to see.

    Example:
        >>> server_log_excerpt("12:00:00.000 | ERROR   | prefect.server - boom\n")
        ['12:00:00.000 | ERROR   | prefect.server - boom']
    """
    found = []
    for line in text.splitlines():
        if (" | ERROR " in line or " | CRITICAL " in line or " | WARNING " in line) and (
            _DROPPED not in line
        ):
            found.append(line if len(line) <= 200 else line[:199] + "…")
            if len(found) == limit:
                break
    return found
