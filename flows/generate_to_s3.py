"""Example: one prompt, N images, staged to S3 with a manifest and artifacts.

As a script::

    python flows/generate_to_s3.py "a lighthouse at dawn" my-bucket --num-images 2 --quality low

As a deployment entrypoint: ``flows/generate_to_s3.py:generate_to_s3``.
Configuration is the environment only: ``FAL_KEY``, boto3's ``AWS_*``, Prefect's ``PREFECT_*``.
"""

from __future__ import annotations

import argparse

from prefect_gptimage.flows import generate_to_s3
from prefect_gptimage.schemas import parse_request

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("bucket")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--quality", default="low")
    args = parser.parse_args()
    request = parse_request(
        {"prompt": args.prompt, "num_images": args.num_images, "quality": args.quality}
    )
    generate_to_s3(request, bucket=args.bucket)
