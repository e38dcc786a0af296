"""Malformed prompt files are refused as input errors (exit 2), never with a traceback.

Each case writes a file the way a broken export or a hostile user would, and checks that
``load_prompt_file`` raises :class:`InvalidPromptFile` / :class:`InvalidRequestError` naming the
line, before anything could be submitted.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli_process

from prefect_gptimage.errors import InvalidPromptFile, InvalidRequestError
from prefect_gptimage.prompts import CSV_FIELD_LIMIT, load_prompt_file, row_to_request
from prefect_gptimage.schemas import GptImageEditRequest, parse_request

GOOD = '{"prompt": "a lighthouse", "quality": "low"}\n'


def refused(path: Path, *fragments: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        load_prompt_file(path)
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, text
    return info.value


# -- encodings ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_latin1_is_refused_with_its_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"p{suffix}"
    if suffix == ".csv":
        path.write_bytes(b"prompt\na lighthouse\ncaf\xe9 at night\n")
        line = "line 3"
    else:
        path.write_bytes(GOOD.encode() + '{"prompt": "café at night"}\n'.encode("latin-1"))
        line = "line 2"
    exc = refused(path, line, "not UTF-8", "0xe9")
    assert isinstance(exc, InvalidPromptFile)


@pytest.mark.parametrize(
    ("codec", "name"), [("utf-16", "UTF-16"), ("utf-16-be", None), ("utf-32", "UTF-32")]
)
def test_utf16_and_utf32_are_refused(tmp_path: Path, codec: str, name: str | None) -> None:
    path = tmp_path / "p.jsonl"
    data = GOOD.encode(codec)
    if codec == "utf-16-be":  # no byte-order mark: still not UTF-8
        assert not data.startswith(codecs.BOM_UTF16_BE)
    path.write_bytes(data)
    exc = refused(path, "line 1")
    assert (name or "NUL byte") in str(exc)


def test_an_invalid_byte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(GOOD.encode() * 3 + b'{"prompt": "bad \xff\xfe byte"}\n')
    refused(path, "line 4", "0xff")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_bom_is_accepted_in_both_formats(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"p{suffix}"
    body = "prompt,quality\na lighthouse,low\n" if suffix == ".csv" else GOOD
    path.write_bytes(codecs.BOM_UTF8 + body.encode())
    rows = load_prompt_file(path)
    assert [(r.line, r.request.prompt, r.request.quality) for r in rows] == [
        (2 if suffix == ".csv" else 1, "a lighthouse", "low")
    ]


# -- JSON that Python reads but fal never would --------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"prompt": "a kite", "num_images": ' + "1" * 5000 + "}", "line 2"),
        ('{"prompt": "a kite", "variant": ' + "9" * 4301 + "}", "line 2"),
        ('{"prompt": "a kite", "num_images": Infinity}', "Infinity"),
        ('{"prompt": "a kite", "num_images": -Infinity}', "Infinity"),
        ('{"prompt": "a kite", "variant": NaN}', "NaN"),
        ('{"prompt": "a kite", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
        ('{"prompt": "a kite", "x": ' + "[" * 100_000 + "}", "nested"),
        ("[" * 100_000, "nested"),
        ('["a list"]', "JSON object"),
        ('{"prompt": "a kite"', "not JSON"),
    ],
)
def test_hostile_json_is_refused(tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(GOOD + line + "\n")
    exc = refused(path, "line 2", fragment)
    assert isinstance(exc, InvalidPromptFile)


def test_nesting_inside_strings_is_just_text(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    prompt = "brackets [[[[{{{{ " * 20 + 'and a quote \\" inside'
    path.write_text(json.dumps({"prompt": prompt.replace('\\"', '"')}) + "\n")
    assert load_prompt_file(path)[0].request.prompt.startswith("brackets [[[[{{{{")


@pytest.mark.parametrize("value", ["-1", "1.5", "²", "abc", "1e3"])
def test_bad_variants_name_the_variant(tmp_path: Path, value: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(f"prompt,variant\na kite,{value}\n")
    refused(path, "line 2", "variant")


@pytest.mark.parametrize("value", [-1, 1.5, True, 1e400, "x"])
def test_bad_json_variants_name_the_variant(tmp_path: Path, value: Any) -> None:
    path = tmp_path / "p.jsonl"
    text = json.dumps({"prompt": "a kite", "variant": value}).replace("Infinity", "1e400")
    path.write_text(text + "\n")
    refused(path, "line 1", "variant")


def test_whole_number_variants_are_read(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a kite", "variant": 2.0}\n{"prompt": "a kite", "variant": "3"}\n')
    assert [r.variant for r in load_prompt_file(path)] == [2, 3]


# -- CSV ------------------------------------------------------------------------------------------


def test_a_csv_field_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(f'prompt\na kite\n"{"x" * (CSV_FIELD_LIMIT + 1)}"\n')
    refused(path, "line 3", "not valid CSV", "field larger than field limit")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_nul_byte_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"p{suffix}"
    path.write_bytes(b"prompt\na kite\x00 at sea\n" if suffix == ".csv" else b'{"prompt": "a\x00"}')
    refused(path, "line 2" if suffix == ".csv" else "line 1", "NUL byte")


def test_csv_image_urls_that_are_not_a_list_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        'prompt,image_urls\nnight,notalist\nnight,"[""https://a/b.png"""\n'
        'night,"' + "[" * 50_000 + '"\nfine,"https://a/b.png|data:image/png;base64,AAAA"\n'
    )
    exc = refused(path, "line 2: image_urls", "line 3: image_urls", "line 4: image_urls")
    assert isinstance(exc, InvalidPromptFile) and len(exc.problems) == 3


# -- values that pass a type check but fal refuses -----------------------------------------------


@pytest.mark.parametrize("prompt", ["   ", "\t\n", "\u3000\u3000", " \u00a0 "])
def test_whitespace_only_prompts_are_refused(tmp_path: Path, prompt: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": prompt})
    assert info.value.field == "prompt"
    path = tmp_path / "p.jsonl"
    path.write_text(GOOD + json.dumps({"prompt": prompt}) + "\n")
    refused(path, "line 2: prompt", "whitespace")


@pytest.mark.parametrize(
    "urls",
    [
        "notalist",
        ["notalist"],
        ["javascript:alert(1)"],
        ["file:///etc/passwd"],
        ["ftp://example.com/a.png"],
        ["https://"],
        ["http:/a.png"],
        ["//example.com/a.png"],
        ["data:image/png;base64"],
        ["https://example.com/a.png", "JavaScript:alert(1)"],
        {"url": "https://example.com/a.png"},
        [42],
    ],
)
def test_image_urls_must_be_a_list_of_http_or_data_urls(tmp_path: Path, urls: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": "make it night", "image_urls": urls})
    assert info.value.field.startswith("image_urls")
    with pytest.raises(ValueError):  # the model itself refuses them, for every caller
        GptImageEditRequest.model_validate({"prompt": "make it night", "image_urls": urls})
    path = tmp_path / "p.jsonl"
    path.write_text(GOOD + json.dumps({"prompt": "make it night", "image_urls": urls}) + "\n")
    refused(path, "line 2: image_urls")


@pytest.mark.parametrize("mask", ["javascript:alert(1)", "file:///m.png", "m.png"])
def test_mask_image_url_is_checked_too(mask: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(
            {"prompt": "night", "image_urls": ["https://a/b.png"], "mask_image_url": mask}
        )
    assert info.value.field == "mask_image_url"


def test_good_input_urls_pass() -> None:
    urls = [
        "https://v3.fal.media/files/a.png",
        "http://127.0.0.1:9000/bucket/k.png?X-Amz-Signature=abc",
        "HTTPS://Example.com/a.png",
        "https://user@example.com/a.png",
        "data:image/png;base64,iVBORw0KGgo=",
    ]
    row = row_to_request({"prompt": "night", "image_urls": "|".join(urls)})
    assert isinstance(row.request, GptImageEditRequest) and row.request.image_urls == urls


# -- the CLI: exit 2, one line, no traceback, nothing submitted --------------------------------


def test_cli_refuses_a_malformed_file_with_exit_2(tmp_path: Path, fal_emulator: Any) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(GOOD.encode() + '{"prompt": "café"}\n'.encode("latin-1"))
    before = fal_emulator.stats["submit"]
    out = run_cli_process(["batch", str(path), "--bucket", "some-bucket"], dict(os.environ))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "line 2" in out.stderr and "UTF-8" in out.stderr
    assert fal_emulator.stats["submit"] == before


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_misspelt_column_says_which_it_probably_is(tmp_path: Path, suffix: str) -> None:
    """`qualty`, `varaint`: each bad row is named with its line, and the column it is closest
    to (`variant` too, which is the file's, not fal's), before anything is submitted."""
    path = tmp_path / f"typos{suffix}"
    if suffix == ".csv":
        path.write_text("prompt,qualty,varaint\na lighthouse,low,\nanother one,,2\n")
        lines = (2, 3)
    else:
        path.write_text(
            '{"prompt": "a lighthouse", "qualty": "low"}\n{"prompt": "another", "varaint": 2}\n'
        )
        lines = (1, 2)
    error = refused(
        path,
        f"line {lines[0]}: qualty: Extra inputs are not permitted; did you mean 'quality'?",
        f"line {lines[1]}: varaint: Extra inputs are not permitted; did you mean 'variant'?",
    )
    assert isinstance(error, InvalidPromptFile) and "\n" not in str(error)
