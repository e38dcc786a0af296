"""Example: a daily image from a templated prompt, idempotent per date.

As a script (a re-run the same day pays nothing)::

    python flows/scheduled_content.py "A poster for {weekday}, {date}: autumn in the city" my-bucket

As a deployment on a cron schedule: ``flows/scheduled_content.py:scheduled_content`` (see
``deployments/prefect.yaml``).
"""

from __future__ import annotations

import argparse

from prefect_gptimage.flows import scheduled_content

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template")
    parser.add_argument("bucket")
    parser.add_argument("--date", default=None, help="ISO date (default: today)")
    args = parser.parse_args()
    scheduled_content(args.template, bucket=args.bucket, date=args.date)
