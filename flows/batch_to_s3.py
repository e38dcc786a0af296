"""Example: a JSONL or CSV prompt file, one request per row, fanned out, staged to S3.

As a script::

    python flows/batch_to_s3.py prefect_gptimage/data/sample_prompts.jsonl my-bucket --concurrency 8

As a deployment entrypoint: ``flows/batch_to_s3.py:batch_to_s3`` (see ``deployments/``).
"""

from __future__ import annotations

import argparse

from prefect_gptimage.flows import batch_to_s3

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt_file")
    parser.add_argument("bucket")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-cost", type=float, default=None)
    args = parser.parse_args()
    batch_to_s3(
        args.prompt_file, bucket=args.bucket, concurrency=args.concurrency, max_cost=args.max_cost
    )
