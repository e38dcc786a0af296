"""Example: generate an image, stage it, edit it through its presigned S3 URL, stage the edit.

As a script::

    python flows/edit_pipeline.py "a quiet harbour at noon" "the same harbour at night" my-bucket

As a deployment entrypoint: ``flows/edit_pipeline.py:generate_then_edit``.
"""

from __future__ import annotations

import argparse

from prefect_gptimage.flows import generate_then_edit

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("edit_prompt")
    parser.add_argument("bucket")
    args = parser.parse_args()
    generate_then_edit(args.prompt, args.edit_prompt, bucket=args.bucket)
