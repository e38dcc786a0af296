"""``prefect-gptimage edit SOURCE --prompt ...``: edit every image under a folder or S3 prefix.

Runs :func:`~prefect_gptimage.flows.edit_batch.edit_folder_to_s3`: one edit per image found
under ``SOURCE`` (a local folder or ``s3://bucket/prefix/``), staged to ``--bucket`` with a
manifest naming each source and its sha256. Every source is read and checked before anything is
paid; a re-run pays nothing. Exit status as for ``batch``.

Example::

    prefect-gptimage edit s3://photos/products/ --prompt "on a plain white background" \\
        --bucket edited --quality low
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from prefect_gptimage.cli._signals import Interrupts
from prefect_gptimage.errors import InvalidRequestError

__all__ = [
    "EDIT_FIELDS",
    "RUN_ARGUMENTS",
    "add_edit_parser",
    "check_edit_input",
    "cmd_edit",
    "local_ref",
]

#: The request fields ``edit`` takes as options, the same for every image.
EDIT_FIELDS = (
    "num_images",
    "quality",
    "image_size",
    "background",
    "output_format",
    "input_fidelity",
)


#: The command's options passed to the flow under the same names.
RUN_ARGUMENTS = (
    "bucket",
    "prefix",
    "concurrency",
    "output_dir",
    "max_cost",
    "timeout",
    "refresh",
    "resubmit_unknown",
    "lookahead",
    "store_io",
    "media_expires",
    "input_link_expires",
)


def add_edit_parser(
    sub: Any, add_run_options: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """Register ``edit`` on the CLI's sub-parsers (``add_run_options``: the shared options)."""
    edit: argparse.ArgumentParser = sub.add_parser(
        "edit",
        help="edit every image under a folder or an S3 prefix with one prompt",
        description="Edit every image (PNG, JPEG, WebP) under a local folder or an S3 prefix "
        "with one prompt; each edited image staged to S3 with its source in the manifest.",
    )
    edit.add_argument("source", help="a local folder, or s3://bucket/prefix/")
    edit.add_argument("--prompt", required=True, help="the edit, the same for every image")
    edit.add_argument("--mask", metavar="PATH", help="a PNG mask for every image (path or s3://)")
    edit.add_argument("--num-images", type=int, metavar="N", help="1 to 4 per source (default 1)")
    edit.add_argument("--quality", metavar="Q", help="low, medium or high (fal's default: high)")
    edit.add_argument("--image-size", metavar="S", help="auto (default), 1024x1024, ...")
    edit.add_argument("--background", metavar="B", help="auto, transparent or opaque")
    edit.add_argument("--output-format", metavar="F", help="png, jpeg or webp")
    edit.add_argument("--input-fidelity", metavar="I", help="low or high (fal's default: high)")
    edit.add_argument(
        "--concurrency", type=int, default=8, metavar="C", help="requests in flight (default 8)"
    )
    edit.add_argument("--lookahead", type=int, metavar="N", help="as for batch")
    edit.add_argument("--max-cost", type=float, metavar="USD", help="refuse beyond this cost")
    edit.add_argument(
        "--no-store-io",
        dest="store_io",
        action="store_false",
        default=None,
        help="ask fal not to keep the requests' payloads (X-Fal-Store-IO: 0)",
    )
    edit.add_argument(
        "--media-expires",
        type=int,
        metavar="SECONDS",
        help="how long fal keeps the edited images on its CDN (default: fal's, 7 days+)",
    )
    edit.add_argument(
        "--input-link-expires",
        type=int,
        metavar="SECONDS",
        help="lifetime of the presigned links fal reads the sources from (default 3600)",
    )
    add_run_options(edit)
    return edit


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    return {n: getattr(args, n) for n in EDIT_FIELDS if getattr(args, n, None) is not None}


def local_ref(ref: str) -> str:
    """An input named on the command line: a relative path made absolute against the working
    directory (URLs, ``s3://`` and ``data:`` as they are).

    Example:
        >>> local_ref("s3://photos/a.png"), local_ref("/photos/a.png")
        ('s3://photos/a.png', '/photos/a.png')
    """
    if ":" in ref.split("/", 1)[0] or os.path.isabs(ref):
        return ref
    return os.path.abspath(ref)


def _mask(args: argparse.Namespace) -> str | None:
    """``--mask`` as an input reference (a relative path is relative to the working dir)."""
    return local_ref(args.mask) if args.mask else None


def check_edit_input(args: argparse.Namespace) -> str | None:
    """What is wrong with ``edit``'s arguments, found before Prefect starts, or None."""
    from prefect_gptimage.schemas import parse_request

    if args.concurrency < 1:
        return "--concurrency: must be at least 1"
    try:  # the options, checked as one request of the run would be
        parse_request(
            {
                **_fields(args),
                "prompt": args.prompt,
                "image_urls": ["https://example.invalid/source.png"],
                "mask_image_url": _mask(args),
            }
        )
    except InvalidRequestError as exc:
        return str(exc)
    if not args.source.lower().startswith("s3://") and not os.path.isdir(args.source):
        return f"source: {args.source}: no such folder"
    return None


def cmd_edit(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """Run the edit flow and print its summary (as ``batch`` does)."""
    from prefect_gptimage.cli.main import _emit, emit_batch_state
    from prefect_gptimage.flows.edit_batch import edit_folder_to_s3

    interrupts.print_summary = lambda summary: _emit(summary, args.json, ok=False)
    interrupts.running = True  # a signal from here on stops the run instead of unwinding
    state = edit_folder_to_s3.with_options(on_running=[interrupts.reclaim])(  # type: ignore[list-item]
        args.source,
        args.prompt,
        mask=_mask(args),
        options=_fields(args),
        stop=interrupts.stop,
        return_state=True,
        **{name: getattr(args, name) for name in RUN_ARGUMENTS},
    )
    interrupts.returned = True
    return emit_batch_state(state, args.json)
