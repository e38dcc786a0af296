"""``prefect-gptimage reconcile MANIFEST_URI``: an older run's manifest with fal's bill.

Reads a run manifest (a local path or ``s3://bucket/key``), asks fal's billing events for its
request ids (:mod:`prefect_gptimage.reporting.billing`: an admin key, ``FAL_ADMIN_KEY``; 50 ids
a call, retried, a bounded wait for late events) and writes the reconciled manifest beside it:
``manifest.jsonl`` → ``manifest.reconciled.jsonl``, in the same folder or S3 prefix. It prints
the estimate, the bill and each request whose bill differs; it exits 1 when some request with
images has no billing event yet (run it again later), 2 without an admin key. No Prefect server
is needed.

Example::

    FAL_ADMIN_KEY=... prefect-gptimage reconcile s3://my-images/gptimage/nightly/manifest.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parser is built before Prefect may be imported: these load on use
    from prefect_gptimage.reporting.billing import Reconciliation

__all__ = ["add_reconcile_parser", "cmd_reconcile", "reconcile_uri", "reconciled_uri"]


def add_reconcile_parser(sub: Any) -> None:
    """The ``reconcile`` sub-command's parser, added to ``sub`` (the ``add_subparsers()`` of
    the ``prefect-gptimage`` parser)."""
    p = sub.add_parser(
        "reconcile",
        help="add fal's billed cost to a run manifest (needs FAL_ADMIN_KEY)",
        description="Add fal's billed cost per row to a run manifest (local or s3://) and write "
        "the reconciled manifest beside it. Needs an admin key: FAL_ADMIN_KEY.",
    )
    p.add_argument("manifest", metavar="MANIFEST_URI", help="manifest.jsonl: a path or s3://")
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait up to SECONDS for late billing events (default PREFECT_GPTIMAGE_BILLING_WAIT)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line last")


def reconciled_uri(uri: str) -> str:
    """Where the reconciled manifest of ``uri`` goes: beside it.

    Example:
        >>> reconciled_uri("s3://b/runs/manifest.jsonl")
        's3://b/runs/manifest.reconciled.jsonl'
    """
    head, dot, ext = uri.rpartition(".")
    return f"{head}.reconciled.{ext}" if dot and "/" not in ext else f"{uri}.reconciled"


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ValueError(f"{uri}: expected s3://bucket/key")
    return bucket, key


def reconcile_uri(uri: str, key: str, *, wait: float | None = None) -> tuple[str, Reconciliation]:
    """Reconcile the manifest at ``uri`` (local or ``s3://``); (where it was written, result)."""
    from prefect_gptimage.reporting.billing import reconcile_lines
    from prefect_gptimage.reporting.manifest import Manifest

    out = reconciled_uri(uri)
    if not uri.startswith("s3://"):
        rec = reconcile_lines(Manifest.from_jsonl(uri).lines, key, wait=wait)
        Manifest(rec.lines).write(out)
        return out, rec
    from prefect_gptimage.s3.clients import get_s3_client

    s3 = get_s3_client(max_attempts=5)
    bucket, object_key = _split_s3(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "manifest.jsonl"
        s3.download_file(bucket, object_key, str(local))
        rec = reconcile_lines(Manifest.from_jsonl(local).lines, key, wait=wait)
        written = Manifest(rec.lines).write(Path(tmp) / "reconciled.jsonl")
        out_bucket, out_key = _split_s3(out)
        s3.upload_file(
            str(written), out_bucket, out_key, ExtraArgs={"ContentType": "application/x-ndjson"}
        )
    return out, rec


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Run ``reconcile`` (see the module docs); the exit code."""
    from prefect_gptimage.reporting.billing import admin_key, summary_line
    from prefect_gptimage.reporting.manifest import Manifest

    key = admin_key()
    if key is None:
        print(
            "prefect-gptimage: error: reconcile needs fal's admin key: set FAL_ADMIN_KEY",
            file=sys.stderr,
        )
        return 2
    try:
        out, rec = reconcile_uri(args.manifest, key, wait=args.wait)
    except Exception as exc:
        print(f"prefect-gptimage: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    estimated = Manifest(rec.lines).totals().estimated_cost_usd
    print(f"{out}: {summary_line(rec, estimated)}")
    for difference in rec.differences:
        print(f"  differs: {difference}")
    for request_id in rec.waiting:
        print(f"  not billed yet: {request_id}")
    if args.json:
        print(
            json.dumps(
                {
                    "manifest_uri": out,
                    "estimated_cost_usd": estimated,
                    "billed_cost_usd": rec.billed_total,
                    "differences": [
                        {
                            "request_id": d.request_id,
                            "estimated_usd": d.estimated_usd,
                            "billed_usd": d.billed_usd,
                        }
                        for d in rec.differences
                    ],
                    "not_billed_yet": rec.waiting,
                }
            )
        )
    return 0 if rec.complete else 1
