"""What a user writes instead of the plugin: a thread pool of ``fal_client.subscribe`` calls.

Each worker submits one row of a JSONL prompt file with ``fal_client.subscribe`` (fal_client's
default 0.1 s status polling), downloads every image URL with httpx (TLS verified against
``SSL_CERT_FILE``) and ``put_object``s it to S3 with a plain ``boto3.client("s3")``.

Configured by the environment only, like a user's script: ``FAL_KEY``, ``FAL_QUEUE_RUN_HOST``
(read by fal_client at import), ``SSL_CERT_FILE``, ``AWS_*`` incl. ``AWS_ENDPOINT_URL_S3``.

Usage::

    python benchmarks/raw_baseline.py PROMPTS.jsonl --bucket B [--prefix P] [--concurrency C]

Prints one JSON line ``{"requests": n, "images": k, "failures": [...], "seconds": s}`` and exits
0 only if every request produced and uploaded all its images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import boto3
import fal_client
import httpx

ENDPOINT = "fal-ai/gpt-image-1.5"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", help="JSONL prompt file: one fal arguments object per line")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="raw")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)

    with open(args.file, encoding="utf-8") as fh:
        rows: list[dict[str, Any]] = [json.loads(line) for line in fh if line.strip()]

    started = time.monotonic()
    s3 = boto3.client("s3")  # clients are thread-safe; the default session is not
    http = httpx.Client(verify=os.environ.get("SSL_CERT_FILE", True), timeout=60.0)

    def one(index: int, arguments: dict[str, Any]) -> int:
        result = fal_client.subscribe(ENDPOINT, arguments=arguments)
        fmt = arguments.get("output_format", "png")
        for k, image in enumerate(result["images"]):
            response = http.get(image["url"])
            response.raise_for_status()
            s3.put_object(
                Bucket=args.bucket,
                Key=f"{args.prefix}/{index:06d}-{k}.{fmt}",
                Body=response.content,
                ContentType=CONTENT_TYPES.get(fmt, "application/octet-stream"),
            )
        return len(result["images"])

    images, failures = 0, []
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = {pool.submit(one, i, row): i for i, row in enumerate(rows)}
        for future in as_completed(futures):
            try:
                images += future.result()
            except Exception as exc:  # report every failure, keep going
                failures.append(f"row {futures[future]}: {type(exc).__name__}: {exc}")
    http.close()
    seconds = time.monotonic() - started
    print(
        json.dumps(
            {
                "requests": len(rows),
                "images": images,
                "failures": failures[:20],
                "failed": len(failures),
                "seconds": round(seconds, 3),
            }
        )
    )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
