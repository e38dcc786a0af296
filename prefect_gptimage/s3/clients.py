"""S3 clients: one shared, thread-safe boto3 client per configuration, or one per prefect-aws block.

Credentials, region and endpoint come from boto3's standard chain only: ``AWS_*`` environment
variables, profiles, instance roles, and ``AWS_ENDPOINT_URL_S3`` (which points the client at MinIO,
moto or LocalStack without any code change). One client per process is built and reused (boto3
clients are thread-safe, sessions are not); see :func:`get_s3_client`. A prefect-aws
``AwsCredentials``/``MinIOCredentials`` or ``S3Bucket`` block may be passed wherever a ``client``
is accepted (used by duck typing, never imported here), and :func:`bucket_target` turns a flow's
``bucket`` parameter (a name or an ``S3Bucket``) into a target and a client.

The clients built here make one HTTP try per call (botocore's retries off, ``max_attempts=1``):
the staging functions retry transient failures themselves, under the package's one
:class:`~prefect_gptimage.retry.RetryPolicy` and its budget (``PREFECT_GPTIMAGE_RETRY_BUDGET``),
so an S3 outage gets the same total time as a fal one and retries never stack. A client you
build and pass yourself keeps its own botocore retries (the budget still bounds the total).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, Union

import boto3
from botocore.config import Config

from prefect_gptimage.s3.models import S3Target

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "ClientSource",
    "bucket_target",
    "client_from_block",
    "get_s3_client",
    "reset_s3_clients",
    "resolve_client",
    "target_from_bucket_block",
    "use_s3_client",
]


class _SessionSource(Protocol):
    """prefect-aws ``AwsCredentials`` / ``MinIOCredentials`` (duck typed)."""

    def get_boto3_session(self) -> Any: ...


class _BucketBlock(Protocol):
    """prefect-aws ``S3Bucket`` (duck typed)."""

    bucket_name: str
    credentials: Any


ClientSource = Union["S3Client", _SessionSource, _BucketBlock, None]

_CLIENTS: dict[tuple[Any, ...], tuple[object, S3Client]] = {}
_CLIENTS_LOCK = threading.Lock()
#: The client a flow chose for its run (from an ``S3Bucket`` block), see :func:`use_s3_client`.
_RUN_CLIENT: contextvars.ContextVar[S3Client | None] = contextvars.ContextVar(
    "prefect_gptimage_s3_client", default=None
)
_ENV_KEYS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def _botocore_config(max_attempts: int, max_pool_connections: int) -> Config:
    return Config(
        # total_max_attempts counts the first try; botocore's max_attempts would count retries
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        signature_version="s3v4",
        connect_timeout=10,
        read_timeout=60,
    )


def get_s3_client(*, max_attempts: int = 1, max_pool_connections: int = 64) -> S3Client:
    """The process-wide S3 client from boto3's standard configuration chain.

    Built once per distinct configuration (the relevant ``AWS_*`` environment variables,
    ``max_attempts``, ``max_pool_connections``) under a lock and shared by all threads: boto3
    clients are thread-safe, sessions are not. ``max_attempts`` is botocore's tries per call,
    the first included: 1, because the staging functions retry (one layer, one budget: see the
    module docstring). ``max_pool_connections`` should cover the task runner's threads times
    ``S3Target.max_concurrency``.

    Example:
        >>> client = get_s3_client()
        >>> client is get_s3_client()
        True
    """
    env = tuple(os.environ.get(name) for name in _ENV_KEYS)
    cache_key = ("env", env, max_attempts, max_pool_connections)
    with _CLIENTS_LOCK:
        hit = _CLIENTS.get(cache_key)
        if hit is None:
            client = boto3.session.Session().client(
                "s3", config=_botocore_config(max_attempts, max_pool_connections)
            )
            hit = (env, client)
            _CLIENTS[cache_key] = hit
        return hit[1]


def client_from_block(
    block: _SessionSource | _BucketBlock, *, max_attempts: int = 1, max_pool_connections: int = 64
) -> S3Client:
    """An S3 client from a prefect-aws ``AwsCredentials``, ``MinIOCredentials`` or ``S3Bucket``.

    prefect-aws is optional and never imported here: the block is used by duck typing
    (``get_boto3_session()`` and ``aws_client_parameters.get_params_override()``). The block's own
    client parameters (endpoint URL, TLS, a botocore config) win over this module's defaults.
    One client is cached per block *value* (its fields, secrets included, hashed): a copy of the
    block, e.g. one unpickled on a Dask worker for each row, reuses the client of the first.

    Example:
        >>> from prefect_aws import S3Bucket  # doctest: +SKIP
        >>> client = client_from_block(S3Bucket.load("images"))  # doctest: +SKIP
    """
    creds: Any = getattr(block, "credentials", None) or block
    if not hasattr(creds, "get_boto3_session"):
        raise TypeError(
            f"{type(block).__name__} is not a prefect-aws credentials or S3Bucket block"
        )
    identity = _block_identity(creds)
    cache_key = ("block", identity, max_attempts, max_pool_connections)
    with _CLIENTS_LOCK:
        hit = _CLIENTS.get(cache_key)
        if hit is None or (identity[0] == "id" and hit[0] is not creds):
            params: dict[str, Any] = {}
            client_params = getattr(creds, "aws_client_parameters", None)
            if client_params is not None and hasattr(client_params, "get_params_override"):
                params = dict(client_params.get_params_override())
            config = _botocore_config(max_attempts, max_pool_connections)
            theirs = params.pop("config", None)
            if isinstance(theirs, Config):
                config = config.merge(theirs)
            client = creds.get_boto3_session().client("s3", config=config, **params)
            hit = (creds, client)
            _CLIENTS[cache_key] = hit
        return hit[1]


def _block_identity(creds: Any) -> tuple[str, Any]:
    """What makes two credential blocks one client: a hash of their fields, secrets included
    (a block that cannot be dumped so is known by its object id)."""
    try:
        text = creds.model_dump_json(context={"include_secrets": True})
        digest = hashlib.sha256(text.encode()).hexdigest()
    except Exception:  # not a pydantic block: one client per object
        return ("id", id(creds))
    return (type(creds).__qualname__, digest)


def reset_s3_clients() -> None:
    """Forget cached clients (tests, or after rotating credentials in-process)."""
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


@contextlib.contextmanager
def use_s3_client(client: S3Client | None) -> Iterator[None]:
    """Within the block, ``client=None`` means ``client`` (None: boto3's standard chain).

    A flow given an ``S3Bucket`` block runs its body in ``use_s3_client(client_from_block(...))``
    so that every staging call below it, in this thread and in the tasks it submits (Prefect's
    thread pool runs them in a copy of the caller's context), uses the block's credentials.
    """
    token = _RUN_CLIENT.set(client)
    try:
        yield
    finally:
        _RUN_CLIENT.reset(token)


def resolve_client(client: ClientSource, *, max_attempts: int = 1) -> S3Client:
    """The client to use: ``client``, one built from a prefect-aws block, the flow's (see
    :func:`use_s3_client`), or the shared default (with ``max_attempts`` botocore tries)."""
    if client is None:
        return _RUN_CLIENT.get() or get_s3_client(max_attempts=max_attempts)
    if hasattr(client, "get_boto3_session") or hasattr(client, "bucket_name"):
        return client_from_block(client)  # type: ignore[arg-type]
    return client  # type: ignore[return-value]


def target_from_bucket_block(
    block: _BucketBlock,
    *,
    presign_expires: int = 24 * 3600,
    prefix: str | None = None,
    default_prefix: str = "gptimage",
) -> S3Target:
    """An :class:`S3Target` from a prefect-aws ``S3Bucket`` block (bucket name and folder).

    The key prefix is ``prefix`` when given, else the block's ``bucket_folder``, else
    ``default_prefix``.

    Example:
        >>> target = target_from_bucket_block(S3Bucket.load("images"))  # doctest: +SKIP
    """
    folder = (
        prefix if prefix is not None else (getattr(block, "bucket_folder", "") or default_prefix)
    )
    return S3Target(bucket=block.bucket_name, prefix=folder, presign_expires=presign_expires)


def bucket_target(
    bucket: str | _BucketBlock | None,
    prefix: str | None = None,
    *,
    presign_expires: int = 24 * 3600,
    default_prefix: str = "gptimage",
) -> tuple[S3Target | None, S3Client | None]:
    """A flow's ``bucket`` parameter as (target, client); ``(None, None)`` without a bucket.

    ``bucket`` is a bucket name (the client is None: boto3's standard chain) or a prefect-aws
    ``S3Bucket`` block (its ``bucket_folder`` is the prefix unless ``prefix`` is given, and the
    client is built from its credentials, see :func:`client_from_block`).

    Example:
        >>> bucket_target("my-images", None)[0].prefix
        'gptimage'
        >>> bucket_target(None, "p")
        (None, None)
    """
    if bucket is None or bucket == "":
        return None, None
    if isinstance(bucket, str):
        target = S3Target(
            bucket=bucket,
            prefix=default_prefix if prefix is None else prefix,
            presign_expires=presign_expires,
        )
        return target, None
    if not hasattr(bucket, "bucket_name"):
        raise TypeError(f"bucket must be a bucket name or an S3Bucket block, not {type(bucket)}")
    target = target_from_bucket_block(
        bucket, presign_expires=presign_expires, prefix=prefix, default_prefix=default_prefix
    )
    return target, client_from_block(bucket)
