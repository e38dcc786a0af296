"""``prefect-gptimage``: generate images, run a prompt file, run the emulator or the demo.

Configured only by the environment a user already has: fal_client's variables (``FAL_KEY``, ...),
Prefect's (``PREFECT_API_URL``, or none for an ephemeral API), boto3's (``AWS_*``).

Exit status: 0 when every image was produced, 1 when any failed, 2 for invalid input (the message
names the field and nothing is submitted).

Example::

    prefect-gptimage generate "a lighthouse at dawn" --quality low --num-images 2 --json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from prefect_gptimage.errors import InvalidRequestError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_request_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw (2 to 32000 characters)")
    p.add_argument(
        "--edit-image",
        dest="image_urls",
        action="append",
        metavar="URL",
        help="edit this image (repeat for several): uses fal-ai/gpt-image-1.5/edit",
    )
    p.add_argument("--mask-image", dest="mask_image_url", metavar="URL", help="mask for the edit")
    p.add_argument("--num-images", type=int, metavar="N", help="1 to 4 (default 1)")
    p.add_argument("--quality", metavar="Q", help="low, medium or high (fal's default: high)")
    p.add_argument("--image-size", metavar="S", help="1024x1024, 1536x1024, 1024x1536 (edit: auto)")
    p.add_argument("--background", metavar="B", help="auto, transparent or opaque")
    p.add_argument("--output-format", metavar="F", help="png, jpeg or webp")
    p.add_argument("--input-fidelity", metavar="I", help="edit only: low or high")
    p.add_argument(
        "--sync-mode",
        action="store_true",
        default=None,
        help="images come back inline as data: URIs",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", metavar="DIR", help="where images are written")
    p.add_argument("--bucket", metavar="B", help="stage images to this S3 bucket")
    p.add_argument("--prefix", metavar="P", default="gptimage", help="S3 key prefix")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="cancel a request still running after this long",
    )
    p.add_argument("--refresh", action="store_true", help="ignore the cache and submit again")
    p.add_argument("--json", action="store_true", help="print one JSON summary line last")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefect-gptimage", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images for one prompt")
    _add_request_options(gen)
    _add_run_options(gen)

    emu = sub.add_parser(
        "emulator", help="run the bundled fal emulator (HTTPS) in the foreground", add_help=False
    )
    emu.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the user gave (None means: fal's default)."""
    names = (
        "prompt",
        "image_urls",
        "mask_image_url",
        "num_images",
        "quality",
        "image_size",
        "background",
        "output_format",
        "input_fidelity",
        "sync_mode",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _fail_usage(message: str) -> int:
    print(f"prefect-gptimage: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _emit(summary: Any, as_json: bool) -> int:
    for img in summary.images:
        print(img.get("s3_uri") or img.get("path"))
        if img.get("url") and img.get("s3_uri"):
            print(f"  {img['url']}")
    for failure in summary.failures:
        print(f"FAILED: {failure.reason}", file=sys.stderr)
    if as_json:
        print(summary.model_dump_json())
    return EXIT_OK if summary.ok else EXIT_FAILED


def cmd_generate(args: argparse.Namespace) -> int:
    from prefect_gptimage.schemas import parse_request

    try:
        request = parse_request(request_fields(args))
    except InvalidRequestError as exc:
        return _fail_usage(str(exc))
    from prefect_gptimage.flows.generate import generate_flow

    state = generate_flow(
        request,
        output_dir=args.output_dir,
        timeout=args.timeout,
        refresh=args.refresh,
        return_state=True,
    )
    return _emit(state.result(raise_on_failure=False), args.json)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "emulator":
        from prefect_gptimage.testing.emulator import serve_forever_cli

        return serve_forever_cli(args.args)
    commands = {"generate": cmd_generate}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
