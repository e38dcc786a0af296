"""``FalEmulator``: a local HTTPS server that speaks fal's queue API for ``fal-ai/gpt-image-1.5``.

It lets flows be tested offline, with the *unmodified* ``fal_client`` talking real HTTPS to it:
submit, status (with logs and real queue positions under an account concurrency limit), SSE
status stream, result, cancel, real image bytes, ``sync_mode`` data URIs, input-image fetching
for edits, and injectable faults (429s, nginx ingress errors, fal JSON errors, dropped
connections, failures after acceptance, truncated or wrong media...). Counters show what a
client really did: duplicate submits, peak concurrency, how many faults fired.

fal_client reads ``FAL_RUN_HOST``/``FAL_QUEUE_RUN_HOST`` when it is first imported, so start the
emulator and export :meth:`FalEmulator.env` *before* importing ``fal_client``. This module
never imports ``fal_client`` (nor prefect) for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
import types
from typing import Any

from prefect_gptimage.testing._queue_answers import STRAY
from prefect_gptimage.testing.certs import shared_tls
from prefect_gptimage.testing.core import EmulatorCore, check_rate
from prefect_gptimage.testing.faults import Fault
from prefect_gptimage.testing.inputs import InputFetcher
from prefect_gptimage.testing.platform_api import PlatformState
from prefect_gptimage.testing.records import EmulatorStats, RequestInfo
from prefect_gptimage.testing.server import EmulatorHTTPServer
from prefect_gptimage.testing.webhooks import WebhookSender

__all__ = ["FalEmulator", "serve_forever_cli"]

_LOOPBACK = ("127.0.0.1", "localhost")


class FalEmulator:
    """A fal queue API emulator on ``https://localhost:PORT``.

    Args:
        latency: seconds each request spends IN_PROGRESS (changeable with :meth:`set_latency`).
        concurrency_limit: at most this many requests IN_PROGRESS at once; the rest queue FIFO.
        host: address to bind (URLs always say ``localhost``; the certificate covers it,
            ``127.0.0.1`` and ``::1``). On loopback, ``::1`` is served too when available.
        port: port to bind; 0 picks a free one.
        require_key: answer 401 unless ``Authorization: Key <anything>`` is sent.
        seed: seeds the RNG that rolls fault probabilities, so runs are reproducible, and the
            misspellings (None: random ones).
        misspell_rate: how often the text a prompt quotes is drawn misspelled, 0..1 (changeable
            with :meth:`set_misspell_rate`). Prompts that quote text ("…" or “…”) get it drawn
            legibly into their images; with a rate, one letter of an image's text is swapped or
            replaced that often. Which images are misspelled is deterministic: a hash of the
            seed, the text, how many identical inputs were submitted before and the image index.

    Example::

        from prefect_gptimage.testing import FalEmulator, Fault

        with FalEmulator(latency=0.2, concurrency_limit=2) as emu:
            os.environ.update(emu.env())          # before fal_client is first imported
            emu.inject(Fault("status", "503_ingress", count=2))
            import fal_client

            handle = fal_client.SyncClient(key="any").submit(
                "fal-ai/gpt-image-1.5", {"prompt": "a red fox", "quality": "low"}
            )
            images = handle.get()["images"]     # real PNG bytes at images[0]["url"]
            assert emu.stats.duplicate_submits == 0
    """

    def __init__(
        self,
        latency: float = 0.2,
        concurrency_limit: int = 16,
        host: str = "127.0.0.1",
        port: int = 0,
        require_key: bool = True,
        seed: int | None = 0,
        misspell_rate: float = 0.0,
    ) -> None:
        self._bind_host = host
        self._bind_port = port
        self._core = EmulatorCore(
            latency=latency,
            concurrency_limit=concurrency_limit,
            require_key=require_key,
            seed=seed,
            misspell_rate=misspell_rate,
        )
        self._servers: list[EmulatorHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._port: int | None = None
        self._ca_bundle: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FalEmulator:
        """Bind and serve in background threads; returns ``self``."""
        if self._servers:
            return self
        tls = shared_tls()
        core = self._core
        main = EmulatorHTTPServer(
            (self._bind_host, self._bind_port), core, tls.server_context, _family(self._bind_host)
        )
        self._servers = [main]
        port = int(main.server_address[1])
        if self._bind_host in _LOOPBACK and socket.has_ipv6:
            with contextlib.suppress(OSError):  # no IPv6 loopback here: IPv4 alone is fine
                self._servers.append(
                    EmulatorHTTPServer(("::1", port), core, tls.server_context, socket.AF_INET6)
                )
        self._port, self._ca_bundle = port, tls.ca_bundle
        self._bind_port = port  # a restart keeps the port, so env() and handed-out URLs stay valid
        core.base_url = f"https://localhost:{port}"
        core.own_netlocs = {f"{h}:{port}" for h in ("localhost", "127.0.0.1", "[::1]")}
        core.fetcher = InputFetcher(tls.ca_bundle, core.resolve_own)
        core.model.stopped = False
        self._threads = [
            threading.Thread(
                target=srv.serve_forever,
                kwargs={"poll_interval": 0.1},
                daemon=True,
                name=f"fal-emulator-{port}-serve",
            )
            for srv in self._servers
        ]
        self._threads.append(
            threading.Thread(
                target=core.model.run_scheduler, daemon=True, name=f"fal-emulator-{port}-scheduler"
            )
        )
        for thread in self._threads:
            thread.start()
        core.webhooks.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection. The CA bundle file stays until exit."""
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._core.shutdown()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> FalEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FalEmulator is not started; call start() first")
        return self._port

    @property
    def host(self) -> str:
        """``localhost:PORT``: the value for ``FAL_QUEUE_RUN_HOST`` and ``FAL_RUN_HOST``."""
        return f"localhost:{self.port}"

    @property
    def base_url(self) -> str:
        """``https://localhost:PORT``."""
        return f"https://{self.host}"

    @property
    def ca_bundle(self) -> str:
        """Path of a PEM bundle (public CAs + the emulator's CA): the value for SSL_CERT_FILE."""
        if self._ca_bundle is None:
            raise RuntimeError("FalEmulator is not started; call start() first")
        return self._ca_bundle

    def env(self) -> dict[str, str]:
        """Environment that points fal_client (and this package's downloader) at the emulator."""
        return {
            "FAL_QUEUE_RUN_HOST": self.host,
            "FAL_RUN_HOST": self.host,
            "SSL_CERT_FILE": self.ca_bundle,
            "REQUESTS_CA_BUNDLE": self.ca_bundle,
            "PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS": "localhost,127.0.0.1",
            "PREFECT_GPTIMAGE_FAL_API_URL": self.base_url,  # pricing, billing events
        }

    # -- configuration -----------------------------------------------------------------------

    @property
    def latency(self) -> float:
        return self._core.model.latency

    @property
    def concurrency_limit(self) -> int:
        return self._core.model.concurrency_limit

    def set_latency(self, seconds: float) -> None:
        """Generation time of requests that start from now on."""
        self.configure(latency=seconds)

    def set_concurrency_limit(self, limit: int) -> None:
        """Change the account concurrency limit (raising it starts queued requests at once)."""
        self.configure(concurrency_limit=limit)

    @property
    def misspell_rate(self) -> float:
        return self._core.misspell_rate

    def set_misspell_rate(self, rate: float) -> None:
        """How often quoted text is drawn misspelled (0..1), for requests submitted from now on."""
        self._core.misspell_rate = check_rate(rate)

    def configure(self, latency: float | None = None, concurrency_limit: int | None = None) -> None:
        model = self._core.model
        with model.cond:
            model.configure_locked(time.monotonic(), latency, concurrency_limit)

    # -- faults ------------------------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        """Add a fault rule; returns it (its ``fired`` counter updates live)."""
        return self._core.faults.add(fault)

    def clear_faults(self) -> None:
        self._core.faults.clear()

    @property
    def faults(self) -> list[Fault]:
        return self._core.faults.list()

    @property
    def webhooks(self) -> WebhookSender:
        """fal's signed callbacks: faults (``inject(WebhookFault(...))``), counters, the JWKS
        (served at ``/.well-known/jwks.json``); see :mod:`prefect_gptimage.testing.webhooks`."""
        return self._core.webhooks

    # -- inspection --------------------------------------------------------------------------

    @property
    def stats(self) -> EmulatorStats:
        """A snapshot of the counters (see :class:`EmulatorStats`)."""
        return self._core.stats()

    @property
    def stray_calls(self) -> int:
        """Queue calls that named no request the emulator knows: a path it does not serve, an
        unknown application or an unknown request id (a client that built a URL from a forged
        request id, for one)."""
        model = self._core.model
        with model.cond:
            return model.calls[STRAY]

    def request(self, request_id: str) -> RequestInfo | None:
        """A snapshot of one request's state, or None if the id is unknown."""
        model = self._core.model
        with model.cond:
            req = model.requests.get(request_id)
            if req is None:
                return None
            model.advance_locked(time.monotonic())
            return model.info_locked(req)

    def requests(self) -> list[RequestInfo]:
        """Snapshots of every request, in submission order."""
        model = self._core.model
        with model.cond:
            model.advance_locked(time.monotonic())
            return [model.info_locked(r) for r in model.requests.values()]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or in progress; False on timeout."""
        model = self._core.model
        deadline = time.monotonic() + timeout
        with model.cond:
            while True:
                now = time.monotonic()
                model.advance_locked(now)
                if all(r.status == "COMPLETED" for r in model.requests.values()):
                    return True
                if now >= deadline:
                    return False
                model.cond.wait(min(0.05, deadline - now))

    def reset(self) -> None:
        """Forget every request, counter and fault rule (config is kept); built-in prices."""
        with self._core.model.cond:
            self._core.model.reset_locked()
        self._core.faults.reset()
        self._core.platform.reset()
        self._core.webhooks.reset()

    @property
    def platform(self) -> PlatformState:
        """fal's platform API here: change a price, delay billing events, answer 500s, and
        read what was billed (``platform.bill(...)``: see :meth:`bill`)."""
        return self._core.platform

    def bill(self) -> dict[str, float]:
        """What the emulator charged (USD) per request id: succeeded requests only."""
        return self._core.platform.bill(self._core)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve_forever_cli(argv: list[str] | None = None) -> int:
    """Run a standalone emulator until SIGINT/SIGTERM (``prefect-gptimage emulator``).

    Prints ``export VAR=value`` lines to point a shell (and fal_client) at it.
    """
    parser = argparse.ArgumentParser(
        prog="prefect-gptimage emulator",
        description="Serve a local fal.ai queue API emulator for fal-ai/gpt-image-1.5 over HTTPS.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument(
        "--latency", type=float, default=0.2, help="seconds each request runs (default 0.2)"
    )
    parser.add_argument(
        "--concurrency-limit", type=int, default=16, help="max requests IN_PROGRESS (default 16)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for fault probabilities and misspellings"
    )
    parser.add_argument(
        "--misspell-rate",
        type=float,
        default=0.0,
        metavar="RATE",
        help="how often a prompt's quoted text is drawn with a wrong letter, 0..1 (default 0)",
    )
    parser.add_argument(
        "--no-require-key", action="store_true", help="accept calls without an API key"
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="operation:kind[:count[:param]], e.g. status:503_json:3 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        faults = [Fault.parse(spec) for spec in args.fault]
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if not 0.0 <= args.misspell_rate <= 1.0:
        parser.error("--misspell-rate must be between 0 and 1")
    emu = FalEmulator(
        latency=args.latency,
        concurrency_limit=args.concurrency_limit,
        host=args.host,
        port=args.port,
        require_key=not args.no_require_key,
        seed=args.seed,
        misspell_rate=args.misspell_rate,
    )
    emu.start()
    for fault in faults:
        emu.inject(fault)
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        for name, value in emu.env().items():
            print(f"export {name}={value}")
        print("# any key works: export FAL_KEY=emulator-key")
        print(f"# fal emulator serving on {emu.base_url} (admin: {emu.base_url}/_emulator/stats)")
        print("# when done: unset " + " ".join(emu.env()))
        print(f"# stop with Ctrl+C or: kill {os.getpid()}", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("# fal emulator stopped", file=sys.stderr, flush=True)
    return 0
