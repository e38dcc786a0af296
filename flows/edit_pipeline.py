"""Example: generate an image, stage it, edit it through its presigned S3 URL, stage the edit.

As a script::

    python flows/edit_pipeline.py "a quiet harbour at noon" "the same harbour at night" my-bucket

As a deployment entrypoint: ``flows/edit_pipeline.py:generate_then_edit``.

It ends by printing where the images went: each image's ``s3://`` URI and local file, then the
run manifest and the HTML gallery.
"""

from __future__ import annotations

import argparse

from prefect_gptimage.flows import generate_then_edit
from prefect_gptimage.reporting.summary import RunSummary

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("edit_prompt")
    parser.add_argument("bucket")
    args = parser.parse_args()
    state = generate_then_edit(args.prompt, args.edit_prompt, bucket=args.bucket, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, RunSummary):
        raise SystemExit(f"the flow run ended {state.name}: {summary}")
    for image, label in zip(summary.images, ("generated", "edited"), strict=False):
        print(f"{label}: {image.get('s3_uri')} (local copy: {image.get('path')})")
    for failure in summary.failures:
        print(f"failed: {failure.label()}: {failure.reason}")
    print(f"manifest: {summary.manifest_uri}\ngallery: {summary.gallery}")
    raise SystemExit(0 if summary.ok else 1)
