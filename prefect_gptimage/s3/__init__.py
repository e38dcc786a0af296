"""Stage verified images (and run manifests) in S3, privately, idempotently, with presigned links.

Modelled on prefect-aws: plain functions and classes do the work (each S3 call retrying its
transient failures within the package's one retry budget), Prefect tasks are thin wrappers.
Uploads are streamed through boto3's managed transfer (multipart above
``S3Target.multipart_threshold``): no image, and no batch, is ever held in memory whole.

The package is split by concept; everything public is re-exported here, so
``from prefect_gptimage.s3 import ...`` is the API:

* :mod:`~prefect_gptimage.s3.keys`: the documented, deterministic, collision-free key layout
  (:func:`image_key`, :func:`manifest_key`, :func:`slugify`, ...);
* :mod:`~prefect_gptimage.s3.failures`: boto3/botocore failures wrapped in the package's
  :class:`~prefect_gptimage.errors.S3StagingError` subclasses (which live, with every exception,
  in :mod:`prefect_gptimage.errors`), credentials redacted from their messages;
* :mod:`~prefect_gptimage.s3.clients`: the shared boto3 client (standard configuration chain,
  ``AWS_ENDPOINT_URL_S3`` for MinIO/moto/LocalStack) and prefect-aws blocks by duck typing;
* :mod:`~prefect_gptimage.s3.models`: :class:`S3Target`, :class:`StagedImage`,
  :class:`StagedFile`;
* :mod:`~prefect_gptimage.s3.staging`: :func:`stage_image`, :func:`stage_file`, :func:`presign`;
* :mod:`~prefect_gptimage.s3.tasks`: the Prefect tasks :func:`stage_image_task` and
  :func:`stage_manifest_task`.

The module-level names of the former single-file module that are not in ``__all__`` (``MiB``,
``MIN_PART_SIZE``, ``PROMPT_SLUG_MAX``, ``ClientSource``) are re-exported too.

Example:
    >>> from prefect_gptimage.s3 import image_key
    >>> image_key("gptimage", endpoint="fal-ai/gpt-image-1.5", request_id="764cabcf-b745",
    ...           index=0, prompt="A Lighthouse at Dawn!", fmt="png")
    'gptimage/fal-ai-gpt-image-1-5/764cabcf-b745/00-a-lighthouse-at-dawn.png'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_gptimage._lazy import lazy_exports

# loaded on first use, so that importing one light module (``keys``) costs no boto3 or Prefect
_EXPORTS: dict[str, str] = {
    "ClientSource": "clients",
    "MANIFEST_CONTENT_TYPE": "staging",
    "MAX_PRESIGN_EXPIRES": "models",
    "MIN_PART_SIZE": "models",
    "MiB": "models",
    "PROMPT_SLUG_MAX": "keys",
    "S3Target": "models",
    "StagedFile": "models",
    "StagedImage": "models",
    "check_target": "preflight",
    "client_from_block": "clients",
    "get_s3_client": "clients",
    "image_key": "keys",
    "manifest_key": "keys",
    "normalize_prefix": "keys",
    "presign": "staging",
    "probe_bucket": "preflight",
    "reset_s3_clients": "clients",
    "safe_id": "keys",
    "slugify": "keys",
    "stage_file": "staging",
    "stage_image": "staging",
    "stage_image_task": "tasks",
    "stage_manifest_task": "tasks",
    "target_from_bucket_block": "clients",
    "validate_bucket_name": "preflight",
}

__all__ = [
    "MANIFEST_CONTENT_TYPE",
    "MAX_PRESIGN_EXPIRES",
    "S3Target",
    "StagedFile",
    "StagedImage",
    "check_target",
    "client_from_block",
    "get_s3_client",
    "image_key",
    "manifest_key",
    "normalize_prefix",
    "presign",
    "probe_bucket",
    "reset_s3_clients",
    "safe_id",
    "slugify",
    "stage_file",
    "stage_image",
    "stage_image_task",
    "stage_manifest_task",
    "target_from_bucket_block",
    "validate_bucket_name",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from prefect_gptimage.s3.clients import (
        ClientSource as ClientSource,
    )
    from prefect_gptimage.s3.clients import (
        client_from_block as client_from_block,
    )
    from prefect_gptimage.s3.clients import (
        get_s3_client as get_s3_client,
    )
    from prefect_gptimage.s3.clients import (
        reset_s3_clients as reset_s3_clients,
    )
    from prefect_gptimage.s3.clients import (
        target_from_bucket_block as target_from_bucket_block,
    )
    from prefect_gptimage.s3.keys import (
        PROMPT_SLUG_MAX as PROMPT_SLUG_MAX,
    )
    from prefect_gptimage.s3.keys import (
        image_key as image_key,
    )
    from prefect_gptimage.s3.keys import (
        manifest_key as manifest_key,
    )
    from prefect_gptimage.s3.keys import (
        normalize_prefix as normalize_prefix,
    )
    from prefect_gptimage.s3.keys import (
        safe_id as safe_id,
    )
    from prefect_gptimage.s3.keys import (
        slugify as slugify,
    )
    from prefect_gptimage.s3.models import (
        MAX_PRESIGN_EXPIRES as MAX_PRESIGN_EXPIRES,
    )
    from prefect_gptimage.s3.models import (
        MIN_PART_SIZE as MIN_PART_SIZE,
    )
    from prefect_gptimage.s3.models import (
        MiB as MiB,
    )
    from prefect_gptimage.s3.models import (
        S3Target as S3Target,
    )
    from prefect_gptimage.s3.models import (
        StagedFile as StagedFile,
    )
    from prefect_gptimage.s3.models import (
        StagedImage as StagedImage,
    )
    from prefect_gptimage.s3.preflight import (
        check_target as check_target,
    )
    from prefect_gptimage.s3.preflight import (
        probe_bucket as probe_bucket,
    )
    from prefect_gptimage.s3.preflight import (
        validate_bucket_name as validate_bucket_name,
    )
    from prefect_gptimage.s3.staging import (
        MANIFEST_CONTENT_TYPE as MANIFEST_CONTENT_TYPE,
    )
    from prefect_gptimage.s3.staging import (
        presign as presign,
    )
    from prefect_gptimage.s3.staging import (
        stage_file as stage_file,
    )
    from prefect_gptimage.s3.staging import (
        stage_image as stage_image,
    )
    from prefect_gptimage.s3.tasks import (
        stage_image_task as stage_image_task,
    )
    from prefect_gptimage.s3.tasks import (
        stage_manifest_task as stage_manifest_task,
    )
