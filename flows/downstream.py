"""Example: the downstream step of a batch, reading its manifest (``s3://`` or ``file://``).

Deployed with a trigger on ``prefect-gptimage.batch.completed`` (``deployments/prefect.yaml``,
``read-manifest``), it runs after every batch with the manifest's URI as ``manifest_uri``.

As a script::

    python flows/downstream.py s3://my-bucket/gptimage/batch/manifests/prompts-1a2b3c.jsonl

As a deployment entrypoint: ``flows/downstream.py:read_manifest``.
"""

from __future__ import annotations

import argparse
import json

from prefect_gptimage.flows.downstream import read_manifest

__all__ = ["read_manifest"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest_uri")
    args = parser.parse_args()
    print(json.dumps(read_manifest(args.manifest_uri)))
