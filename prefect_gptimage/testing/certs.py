"""A throwaway certificate authority so the unmodified fal client can talk HTTPS to the emulator.

fal-client always uses ``https://`` and verifies certificates. :func:`shared_tls` makes (once per
process) a private CA with :mod:`trustme`, a server certificate for ``localhost``,
``127.0.0.1`` and ``::1``, and a CA bundle file = certifi's bundle + the bundle already named by
``SSL_CERT_FILE`` (if any) + the private CA. Pointing ``SSL_CERT_FILE`` at that bundle makes httpx
trust the emulator while every other HTTPS host still verifies as before.

One CA per process means every emulator started in the process is trusted by the same bundle,
so a client created for one emulator keeps working with the next. The files live in a temporary
directory removed at interpreter exit (not at ``stop()``: the environment may still name them).

Example:
    >>> tls = shared_tls()
    >>> tls.ca_bundle.endswith(".pem")
    True
"""

from __future__ import annotations

import atexit
import os
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import certifi
import trustme

_lock = threading.Lock()
_shared: TLSMaterial | None = None


@dataclass(frozen=True)
class TLSMaterial:
    """Paths of the generated PEM files and the server-side SSL context."""

    directory: str
    ca_pem: str
    ca_bundle: str
    server_context: ssl.SSLContext


def _base_bundles() -> list[Path]:
    paths = [Path(certifi.where())]
    current = os.environ.get("SSL_CERT_FILE")
    if current and Path(current).is_file() and Path(current).resolve() != paths[0].resolve():
        paths.append(Path(current))
    return paths


def make_tls(directory: str | None = None) -> TLSMaterial:
    """Create a new CA, server certificate and bundle in ``directory`` (a new temp dir if None)."""
    directory = directory or tempfile.mkdtemp(prefix="fal-emulator-")
    ca = trustme.CA(organization_name="prefect-gptimage fal emulator")
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    cert.configure_cert(context)

    ca_pem_bytes: bytes = ca.cert_pem.bytes()
    ca_pem = Path(directory, "emulator-ca.pem")
    ca_pem.write_bytes(ca_pem_bytes)
    parts = [p.read_bytes().rstrip(b"\n") + b"\n" for p in _base_bundles()]
    bundle = Path(directory, "ca-bundle.pem")
    bundle.write_bytes(b"".join(parts) + b"\n# prefect-gptimage fal emulator CA\n" + ca_pem_bytes)
    return TLSMaterial(
        directory=directory,
        ca_pem=str(ca_pem),
        ca_bundle=str(bundle),
        server_context=context,
    )


def shared_tls() -> TLSMaterial:
    """The process-wide TLS material, created on first use and removed at exit."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = make_tls()
            atexit.register(shutil.rmtree, _shared.directory, True)
        return _shared
