"""An edit's input images from anywhere: local files, ``s3://`` objects, ``data:`` URIs.

fal fetches an edit's inputs itself, without credentials, so a local photo or a private S3
object must first become something it can fetch. This package does it before anything is paid:

* :mod:`~prefect_gptimage.inputs.read`: the bytes, read once (local path, ``s3://`` with the
  user's boto3 chain, ``data:``);
* :mod:`~prefect_gptimage.inputs.check`: an image an edit takes (Pillow), a mask a PNG with alpha;
* :mod:`~prefect_gptimage.inputs.stage`: uploaded once by content to the run's bucket and passed
  as a short-lived presigned link, or inline as a ``data:`` URI without a bucket;
* :mod:`~prefect_gptimage.inputs.resolve`: :class:`InputResolver`, all of it for a request,
  recording each input's source and sha256 (the request's identity).

A problem is one :class:`~prefect_gptimage.errors.InputImageError` naming the input.

Example:
    >>> resolver = InputResolver(InputStager(bucket="my-images", client=s3))  # doctest: +SKIP
    >>> request = resolver.resolve(GptImageEditRequest(prompt="on white",
    ...                                                image_urls=["/photos/shoe.png"]))
    ... # doctest: +SKIP
"""

from __future__ import annotations

from prefect_gptimage.inputs.check import ACCEPTED_FORMATS, InputImage, inspect_image
from prefect_gptimage.inputs.read import read_input
from prefect_gptimage.inputs.resolve import InputResolver, resolve_inputs, source_label
from prefect_gptimage.inputs.stage import InputStager, input_key

__all__ = [
    "ACCEPTED_FORMATS",
    "InputImage",
    "InputResolver",
    "InputStager",
    "input_key",
    "inspect_image",
    "read_input",
    "resolve_inputs",
    "source_label",
]
