"""Stage verified images (and run manifests) in S3, privately, idempotently, with presigned links.

Modelled on prefect-aws: plain functions and classes do the work, Prefect tasks are thin wrappers
that add retries. Uploads are streamed through boto3's managed transfer (multipart above
``S3Target.multipart_threshold``): no image, and no batch, is ever held in memory whole.

The package is split by concept; everything public is re-exported here, so
``from prefect_gptimage.s3 import ...`` is the API:

* :mod:`~prefect_gptimage.s3.keys`: the documented, deterministic, collision-free key layout
  (:func:`image_key`, :func:`manifest_key`, :func:`gallery_key`, :func:`slugify`, ...);
* :mod:`~prefect_gptimage.s3.errors`: :class:`S3StagingError` and its transient/permanent
  subclasses, :func:`is_transient_s3_error`, credential redaction;
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
    >>> image_key("gptimage", endpoint="fal-ai/gpt-image-1.5", request_id="764cabcf-b745",
    ...           index=0, prompt="A Lighthouse at Dawn!", fmt="png")
    'gptimage/fal-ai-gpt-image-1-5/764cabcf-b745/00-a-lighthouse-at-dawn.png'
"""

from __future__ import annotations

from prefect_gptimage.s3.clients import ClientSource as ClientSource
from prefect_gptimage.s3.clients import (
    client_from_block,
    get_s3_client,
    reset_s3_clients,
    target_from_bucket_block,
)
from prefect_gptimage.s3.errors import (
    PermanentS3StagingError,
    S3StagingError,
    TransientS3StagingError,
    is_transient_s3_error,
)
from prefect_gptimage.s3.keys import PROMPT_SLUG_MAX as PROMPT_SLUG_MAX
from prefect_gptimage.s3.keys import (
    gallery_key,
    image_key,
    manifest_key,
    normalize_prefix,
    safe_id,
    slugify,
)
from prefect_gptimage.s3.models import MAX_PRESIGN_EXPIRES, S3Target, StagedFile, StagedImage
from prefect_gptimage.s3.models import MIN_PART_SIZE as MIN_PART_SIZE
from prefect_gptimage.s3.models import MiB as MiB
from prefect_gptimage.s3.preflight import check_target, probe_bucket, validate_bucket_name
from prefect_gptimage.s3.staging import MANIFEST_CONTENT_TYPE, presign, stage_file, stage_image
from prefect_gptimage.s3.tasks import stage_image_task, stage_manifest_task

__all__ = [
    "MANIFEST_CONTENT_TYPE",
    "MAX_PRESIGN_EXPIRES",
    "PermanentS3StagingError",
    "S3StagingError",
    "S3Target",
    "StagedFile",
    "StagedImage",
    "TransientS3StagingError",
    "check_target",
    "client_from_block",
    "gallery_key",
    "get_s3_client",
    "image_key",
    "is_transient_s3_error",
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
