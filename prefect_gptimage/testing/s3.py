"""A local S3 server for tests and demos: moto in server mode, spoken to over real HTTP.

Unlike ``moto.mock_aws`` (which patches botocore in-process), this runs moto's
``ThreadedMotoServer`` on ``127.0.0.1`` and a free port, so the code under test builds an ordinary
``boto3.client("s3")`` and exercises the real S3 protocol: signing, multipart uploads, HEAD,
presigned URLs fetched by a plain HTTP client. Point boto3 at it with the variables from
:meth:`LocalS3Server.env` (``AWS_ENDPOINT_URL_S3`` is honoured by boto3 >= 1.28).

moto is a dev/test dependency, not a runtime one: it is imported only in :meth:`start`.

Example:
    >>> with LocalS3Server() as server:  # doctest: +SKIP
    ...     server.create_bucket("images")
    ...     os.environ.update(server.env())
    ...     boto3.client("s3").list_buckets()["Buckets"][0]["Name"]
    'images'
"""

from __future__ import annotations

import contextlib
import logging
import urllib.request
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prefect_gptimage.errors import ConfigurationError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from typing_extensions import Self

__all__ = ["LocalS3Server"]

TEST_ACCESS_KEY_ID = "testing"
TEST_SECRET_ACCESS_KEY = "testing"  # moto accepts any credentials; these are not secrets


class LocalS3Server:
    """moto's S3 in server mode on ``host`` and ``port`` (0 = pick a free port).

    All moto servers in one process share moto's in-memory backend, so buckets survive a
    :meth:`stop` / :meth:`start` cycle (use :meth:`reset` to wipe them).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, region: str = "us-east-1") -> None:
        self.host = host
        self.port = port
        self.region = region
        self._server: Any = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>`` once started."""
        if self._server is None:
            raise RuntimeError("LocalS3Server is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3's default chain at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": self.region,
        }

    def start(self) -> Self:
        """Start serving (idempotent); returns self."""
        if self._server is not None:
            return self
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                "LocalS3Server needs moto with its server extra: "
                "pip install 'moto[server]' (or 'prefect-gptimage[dev]')"
            ) from exc
        # werkzeug logs one line per request at INFO; keep test output readable.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        server.start()
        self.host, self.port = server.get_host_and_port()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving (idempotent). The port is released; the moto backend keeps its data."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def client(self) -> S3Client:
        """A boto3 S3 client bound explicitly to this server (independent of the environment)."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=TEST_ACCESS_KEY_ID,
            aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
            region_name=self.region,
        )

    def create_bucket(self, name: str) -> None:
        """Create ``name`` (no error if this server already has it)."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def reset(self) -> None:
        """Wipe every bucket and object in moto's backend (``POST /moto-api/reset``)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:  # generous: a loaded machine
            resp.read()
