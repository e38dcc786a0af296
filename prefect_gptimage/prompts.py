"""Prompt files: JSONL or CSV, one request per row, any schema field as a column.

Every row is validated against fal's schema before anything is submitted; all bad rows are
reported at once, each with its line number and field (a misspelt column with the one it
probably is: ``qualty: Extra inputs are not permitted; did you mean 'quality'?``). A row with
``image_urls`` goes to the edit endpoint. Besides the schema fields, a ``variant`` column
(integer) asks for a fresh image of an otherwise identical request; it is part of the cache key,
never sent to fal.

CSV cells are text: empty cells mean "fal's default", ``num_images`` and ``sync_mode`` are read
as numbers and booleans, and ``image_urls`` holds a JSON list or URLs separated by ``|``.

An edit row's inputs (``image_urls``, ``mask_image_url``) may be URLs, ``s3://bucket/key`` URIs
or local paths: a relative path is read relative to the prompt file's folder, and a local input
that does not exist is a bad row (line and field), reported with the others before anything is
paid. (Reading and checking the images is the flows' job: :mod:`prefect_gptimage.inputs`.)

Files must be UTF-8 (a byte-order mark is accepted in both formats). A malformed file, whatever
is wrong with it (another encoding, ``NaN``/``Infinity`` or a 5000-digit integer in JSON, absurdly
deep nesting, a CSV field over 131,072 characters), raises :class:`InvalidPromptFile` naming the
line, never a bare ``UnicodeDecodeError``, ``RecursionError`` or ``csv.Error``.

Example:
    >>> rows = load_prompt_file("prompts.csv")        # prompt,quality,image_size
    >>> rows[0].request.quality, rows[0].line
    ('low', 2)
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect_gptimage.errors import InvalidPromptFile, InvalidRequestError
from prefect_gptimage.s3.keys import slugify
from prefect_gptimage.schemas import (
    AnyRequest,
    GptImageEditRequest,
    input_kind,
    parse_request,
    request_fingerprint,
)

EXTRA_COLUMNS = ("variant",)


@dataclass(frozen=True)
class PromptRow:
    """One validated row: where it came from, the request, its variant."""

    line: int
    request: AnyRequest
    variant: int = 0


#: csv's own limit on one field (the module default); a longer field is a malformed file.
CSV_FIELD_LIMIT = 131_072
#: Deepest JSON nesting read from a prompt file (a request is two levels deep).
MAX_JSON_DEPTH = 32

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)


class _Malformed(Exception):
    """A problem with the file itself at ``line``: turned into :class:`InvalidPromptFile`."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number fal accepts (JSON has no NaN or Infinity)")


def _json_value(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity and excessive nesting with a ``ValueError``."""
    if _nesting(text) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:  # pragma: no cover - _nesting catches it first
        raise ValueError("nested too deeply") from None


def _nesting(text: str) -> int:
    """The deepest bracket nesting in ``text`` outside strings (cheap, linear, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _check_encoding(path: Path) -> None:
    """Refuse anything but UTF-8 up front, naming the line (UTF-16/32 by their byte-order mark).

    Read line by line in binary, so memory stays flat and the line number is exact (a text
    reader decodes in blocks and would fail lines before the bad byte).
    """
    with path.open("rb") as fh:
        head = fh.read(4)
        if head.startswith(_UTF32_BOMS):
            raise _Malformed(1, "the file is UTF-32 encoded: save it as UTF-8")
        if head.startswith(_UTF16_BOMS):
            raise _Malformed(1, "the file is UTF-16 encoded: save it as UTF-8")
        fh.seek(0)
        for number, raw in enumerate(fh, start=1):
            if b"\x00" in raw:
                raise _Malformed(
                    number, "contains a NUL byte (UTF-16 without a byte-order mark?): save as UTF-8"
                )
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = raw[exc.start : exc.start + 1].hex()
                raise _Malformed(
                    number,
                    f"not UTF-8 text (byte 0x{byte}, column {exc.start + 1}): save it as UTF-8",
                ) from None


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        line = 1
        try:
            for row in reader:
                line = reader.line_num
                cells = {
                    k.strip(): v
                    for k, v in row.items()
                    if isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() != ""
                }
                if cells:
                    yield line, cells
        except csv.Error as exc:
            # csv counts a line once it is parsed: the record that failed starts on the next one
            raise _Malformed(reader.line_num + 1, f"not valid CSV ({exc})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                data = _json_value(text)
            except ValueError as exc:  # also: integers over Python's 4300-digit limit
                raise _Malformed(number, str(exc)) from None
            if not isinstance(data, dict):
                raise _Malformed(number, "each line must be a JSON object")
            yield number, data


def _image_urls(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return _json_value(text)
            except ValueError as exc:
                raise InvalidRequestError("image_urls", f"not a JSON list of URLs: {exc}") from None
        return [u.strip() for u in text.split("|") if u.strip()]
    return value


def _variant(value: Any) -> int:
    """The ``variant`` column: a whole number >= 0 (text in CSV, a number in JSON)."""
    if value is None or value == "":
        return 0
    number: Any = value
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise InvalidRequestError("variant", f"must be a whole number >= 0, got {value!r}")
        number = int(text)
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 10**18:
        raise InvalidRequestError("variant", f"must be a whole number >= 0, got {value!r}")
    return number


def _relative_path(ref: Any) -> bool:
    """Whether ``ref`` is a relative local path (no scheme, not absolute)."""
    if not isinstance(ref, str) or not ref.strip() or os.path.isabs(ref.strip()):
        return False
    head = ref.strip().split("/", 1)[0]
    return ":" not in head


def _anchored(ref: Any, base_dir: Path | None) -> Any:
    """A relative local path made absolute against ``base_dir`` (the prompt file's folder)."""
    if base_dir is None or not _relative_path(ref):
        return ref
    return os.path.normpath(os.path.join(base_dir, ref.strip()))


def check_local_inputs(request: AnyRequest) -> None:
    """An edit's local input that is not a file: :class:`InvalidRequestError` (field and item),
    found before anything is read or paid (a prompt file's row, the CLI's arguments)."""
    if not isinstance(request, GptImageEditRequest):
        return
    named = [("image_urls", f"item {i}: ", ref) for i, ref in enumerate(request.image_urls)]
    if request.mask_image_url:
        named.append(("mask_image_url", "", request.mask_image_url))
    for field, item, ref in named:
        if input_kind(ref) == "local" and not os.path.isfile(ref):
            raise InvalidRequestError(field, f"{item}{ref}: no such file")


def row_to_request(
    cells: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> PromptRow:
    """Validate one row (``defaults`` fill the cells it leaves empty; ``base_dir``: the folder
    relative input paths are read from, the prompt file's)."""
    fields = {**(defaults or {}), **cells}
    variant = _variant(fields.pop("variant", 0))
    if "image_urls" in fields:
        fields["image_urls"] = _image_urls(fields["image_urls"])
        if isinstance(fields["image_urls"], list):
            fields["image_urls"] = [_anchored(u, base_dir) for u in fields["image_urls"]]
    if "mask_image_url" in fields:
        fields["mask_image_url"] = _anchored(fields["mask_image_url"], base_dir)
    # a misspelt column is named with the column it probably is, ``variant`` included
    request = parse_request(fields, known_names=EXTRA_COLUMNS)
    if base_dir is not None:
        check_local_inputs(request)
    return PromptRow(line=0, request=request, variant=variant)


def load_prompt_file(
    path: str | Path, defaults: Mapping[str, Any] | None = None
) -> list[PromptRow]:
    """Read and validate a ``.jsonl``/``.json`` or ``.csv`` prompt file.

    Raises :class:`InvalidPromptFile` listing every bad row (line number and field).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError("prompt_file", f"{path} does not exist")
    reader = _csv_rows if path.suffix.lower() == ".csv" else _jsonl_rows
    rows: list[PromptRow] = []
    problems: list[tuple[int, str, str]] = []
    line = 0
    try:
        _check_encoding(path)
        for line, cells in reader(path):
            try:
                row = row_to_request(cells, defaults, path.parent.absolute())
            except InvalidRequestError as exc:
                problems.append((line, exc.field, str(exc)))
            except (ValueError, TypeError, ArithmeticError) as exc:
                problems.append((line, "request", f"request: {exc}"))
            else:
                rows.append(PromptRow(line=line, request=row.request, variant=row.variant))
    except _Malformed as exc:
        problems.append((exc.line, "file", exc.message))
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start : exc.start + 1].hex()
        problems.append((line + 1, "file", f"not UTF-8 text (byte 0x{byte}): save it as UTF-8"))
    except OSError as exc:
        raise InvalidRequestError("prompt_file", f"{path}: cannot read it ({exc})") from None
    if problems:
        raise InvalidPromptFile(str(path), problems)
    if not rows:
        raise InvalidRequestError("prompt_file", f"{path} has no prompts")
    return rows


#: Edit inputs read, checked and staged at once by :func:`resolve_row_inputs` (I/O bound).
RESOLVE_THREADS = 8


def resolve_row_inputs(rows: list[PromptRow], resolver: Any, where: str) -> list[PromptRow]:
    """``rows`` with their edits' inputs resolved by ``resolver`` (an
    :class:`~prefect_gptimage.inputs.InputResolver`), a few at a time, in row order.

    Every bad input of every row is reported at once, as :class:`InvalidPromptFile` naming
    ``where`` (the file, the folder) and each row's line: ``line 3: image_urls: <input>: no
    such S3 object``. Rows without local, ``s3://`` or ``data:`` inputs are returned as they are.
    """
    from concurrent.futures import ThreadPoolExecutor

    def resolved(row: PromptRow) -> PromptRow | tuple[int, str, str]:
        try:
            request = resolver.resolve(row.request)
        except InvalidRequestError as exc:
            return (row.line, exc.field, str(exc))
        return PromptRow(line=row.line, request=request, variant=row.variant)

    with ThreadPoolExecutor(RESOLVE_THREADS, thread_name_prefix="gptimage-inputs") as pool:
        outcomes = list(pool.map(resolved, rows))
    problems = [o for o in outcomes if not isinstance(o, PromptRow)]
    if problems:
        raise InvalidPromptFile(where, problems)
    return [o for o in outcomes if isinstance(o, PromptRow)]


def reads_inputs(rows: list[PromptRow]) -> bool:
    """Whether any row is an edit with an input the package reads (local, ``s3://``, ``data:``)."""
    return any(
        input_kind(ref) in ("local", "s3", "data")
        for row in rows
        if isinstance(row.request, GptImageEditRequest)
        for ref in (*row.request.image_urls, row.request.mask_image_url or "")
    )


def run_key_for(prompt_file: str | Path, defaults: dict[str, Any] | None = None) -> str:
    """A deterministic name for a batch: the file's stem and a hash of its content and defaults."""
    path = Path(prompt_file)
    digest = hashlib.sha256(path.read_bytes())
    digest.update(json.dumps(defaults or {}, sort_keys=True).encode())
    return f"batch-{slugify(path.stem, 40, default='prompts')}-{digest.hexdigest()[:10]}"


def unique_rows(rows: list[PromptRow]) -> list[PromptRow]:
    """Drop rows identical to an earlier one (same request, same variant): they'd pay twice."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = request_fingerprint(row.request, row.variant)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept
