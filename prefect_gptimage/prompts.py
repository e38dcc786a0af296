"""Prompt files: JSONL or CSV, one request per row, any schema field as a column.

Every row is validated against fal's schema before anything is submitted; all bad rows are
reported at once, each with its line number and field. A row with ``image_urls`` goes to the
edit endpoint. Besides the schema fields, a ``variant`` column (integer) asks for a fresh image of
an otherwise identical request; it is part of the cache key, never sent to fal.

CSV cells are text: empty cells mean "fal's default", ``num_images`` and ``sync_mode`` are read
as numbers and booleans, and ``image_urls`` holds a JSON list or URLs separated by ``|``.

Example:
    >>> rows = load_prompt_file("prompts.csv")        # prompt,quality,image_size
    >>> rows[0].request.quality, rows[0].line
    ('low', 2)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect_gptimage.errors import InvalidPromptFile, InvalidRequestError
from prefect_gptimage.schemas import AnyRequest, parse_request

EXTRA_COLUMNS = ("variant",)


@dataclass(frozen=True)
class PromptRow:
    """One validated row: where it came from, the request, its variant."""

    line: int
    request: AnyRequest
    variant: int = 0


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            cells = {
                k.strip(): v for k, v in row.items() if k and v is not None and v.strip() != ""
            }
            if cells:
                yield reader.line_num, cells


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidPromptFile(
                    str(path), [(number, "json", f"not JSON ({exc.msg})")]
                ) from None
            if not isinstance(data, dict):
                raise InvalidPromptFile(
                    str(path), [(number, "json", "each line must be an object")]
                )
            yield number, data


def _image_urls(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [u.strip() for u in text.split("|") if u.strip()]
    return value


def row_to_request(
    cells: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> PromptRow:
    """Validate one row (``defaults`` fill the cells it leaves empty)."""
    fields = {**(defaults or {}), **cells}
    variant = int(fields.pop("variant", 0) or 0)
    if "image_urls" in fields:
        fields["image_urls"] = _image_urls(fields["image_urls"])
    return PromptRow(line=0, request=parse_request(fields), variant=variant)


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
    for line, cells in reader(path):
        try:
            row = row_to_request(cells, defaults)
        except InvalidRequestError as exc:
            problems.append((line, exc.field, str(exc)))
        except (ValueError, TypeError) as exc:
            problems.append((line, "variant", f"variant: {exc}"))
        else:
            rows.append(PromptRow(line=line, request=row.request, variant=row.variant))
    if problems:
        raise InvalidPromptFile(str(path), problems)
    if not rows:
        raise InvalidRequestError("prompt_file", f"{path} has no prompts")
    return rows
