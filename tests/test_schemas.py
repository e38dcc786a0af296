"""Every schema rule of fal's two endpoints, enforced before any network call."""

from __future__ import annotations

import json
import pickle
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from prefect_gptimage.errors import (
    DuplicateRequestId,
    FalError,
    ImageCountMismatch,
    InvalidRequestError,
)
from prefect_gptimage.ledger import RequestIdLedger, claim_request_id, use_request_id_ledger
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.schemas import (
    EDIT_ENDPOINT,
    TEXT_TO_IMAGE_ENDPOINT,
    DownloadedImage,
    GenerationResult,
    GptImageEditRequest,
    GptImageOutput,
    GptImageRequest,
    ImageFile,
    RequestHandle,
    check_image_count,
    parse_request,
    request_for_endpoint,
)


def test_text_to_image_defaults_are_fals() -> None:
    args = GptImageRequest(prompt="a lighthouse").to_arguments()
    assert args == {
        "prompt": "a lighthouse",
        "image_size": "1024x1024",
        "background": "auto",
        "quality": "high",
        "num_images": 1,
        "output_format": "png",
        "sync_mode": False,
    }


def test_edit_defaults_are_fals() -> None:
    req = GptImageEditRequest(prompt="make it night", image_urls=["https://a/b.png"])
    args = req.to_arguments()
    assert args["image_size"] == "auto"
    assert args["input_fidelity"] == "high"
    assert args["quality"] == "high"
    assert "mask_image_url" not in args
    assert req.endpoint == EDIT_ENDPOINT


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x"}, "prompt"),
        ({"prompt": "x" * 32001}, "prompt"),
        ({"prompt": "ok", "num_images": 0}, "num_images"),
        ({"prompt": "ok", "num_images": 5}, "num_images"),
        ({"prompt": "ok", "quality": "ultra"}, "quality"),
        ({"prompt": "ok", "image_size": "auto"}, "image_size"),
        ({"prompt": "ok", "image_size": "512x512"}, "image_size"),
        ({"prompt": "ok", "background": "green"}, "background"),
        ({"prompt": "ok", "output_format": "gif"}, "output_format"),
        ({"prompt": "ok", "qualty": "low"}, "qualty"),
        ({"prompt": "ok", "input_fidelity": "high"}, "input_fidelity"),
        ({"prompt": "ok", "mask_image_url": "https://a/m.png"}, "mask_image_url"),
        (
            {"prompt": "ok", "image_urls": ["https://a/b.png"], "input_fidelity": "max"},
            "input_fidelity",
        ),
        (
            {"prompt": "ok", "image_urls": ["https://a/b.png"], "image_size": "2048x2048"},
            "image_size",
        ),
    ],
)
def test_invalid_input_names_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(fields)
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("fields", "typo", "meant"),
    [
        ({"prompt": "ok", "qualty": "low"}, "qualty", "quality"),
        ({"prompt": "ok", "num_image": 2}, "num_image", "num_images"),
        ({"prompt": "ok", "image_urls": ["https://a/b.png"], "mask": "x"}, "mask", None),
        (
            {"prompt": "ok", "image_urls": ["https://a/b.png"], "mask_url": "x"},
            "mask_url",
            "mask_image_url",
        ),
        ({"prompt": "ok", "colour": "red"}, "colour", None),
    ],
)
def test_a_misspelt_field_says_which_it_probably_is(
    fields: dict[str, Any], typo: str, meant: str | None
) -> None:
    """One line, before anything is paid: the unknown field and the known one it is closest to."""
    with pytest.raises(InvalidRequestError) as info:
        parse_request(fields)
    text = str(info.value)
    assert info.value.field == typo and "\n" not in text
    if meant is None:
        assert text == f"{typo}: Extra inputs are not permitted", text
    else:
        assert text == f"{typo}: Extra inputs are not permitted; did you mean '{meant}'?", text


def test_the_suggestion_rides_along_with_other_errors_and_on_the_models() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": "ok", "num_images": 9, "image_sise": "1024x1024"})
    assert str(info.value) == (
        "num_images: Input should be less than or equal to 4; "
        "image_sise: Extra inputs are not permitted; did you mean 'image_size'?"
    )
    with pytest.raises(ValidationError, match="did you mean 'output_format'"):
        GptImageRequest(prompt="ok", output_fromat="png")  # type: ignore[call-arg]
    with pytest.raises(InvalidRequestError, match="did you mean 'input_fidelity'"):
        request_for_endpoint(
            EDIT_ENDPOINT, {"prompt": "ok", "image_urls": ["https://a/b.png"], "input_fidelty": 1}
        )


def test_limits_are_inclusive() -> None:
    assert parse_request({"prompt": "ab"}).prompt == "ab"
    assert len(parse_request({"prompt": "x" * 32000}).prompt) == 32000
    assert parse_request({"prompt": "ok", "num_images": 4}).num_images == 4


def test_edit_requires_image_urls() -> None:
    with pytest.raises(InvalidRequestError) as info:
        request_for_endpoint(EDIT_ENDPOINT, {"prompt": "make it blue"})
    assert info.value.field == "image_urls"
    with pytest.raises(InvalidRequestError):
        request_for_endpoint(EDIT_ENDPOINT, {"prompt": "make it blue", "image_urls": []})


def test_edit_accepts_auto_and_mask() -> None:
    req = parse_request(
        {
            "prompt": "swap the sky",
            "image_urls": ["https://a/b.png"],
            "image_size": "auto",
            "mask_image_url": "https://a/m.png",
            "input_fidelity": "low",
        }
    )
    assert isinstance(req, GptImageEditRequest)
    assert req.to_arguments()["mask_image_url"] == "https://a/m.png"


def test_unknown_endpoint_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        request_for_endpoint("fal-ai/flux", {"prompt": "hi"})
    assert info.value.field == "endpoint"
    assert request_for_endpoint(TEXT_TO_IMAGE_ENDPOINT, {"prompt": "hi"}).prompt == "hi"


def test_cost_estimate_follows_the_price_table() -> None:
    assert estimate_cost(GptImageRequest(prompt="hi")) == pytest.approx(0.133)
    assert estimate_cost(
        GptImageRequest(prompt="hi", quality="low", image_size="1536x1024", num_images=4)
    ) == pytest.approx(0.052)
    assert estimate_cost(
        GptImageRequest(prompt="hi", quality="medium", image_size="1024x1536")
    ) == pytest.approx(0.051)


@pytest.mark.parametrize(
    "request_",
    [
        GptImageRequest(prompt="a lighthouse", quality="low", image_size="1536x1024"),
        GptImageEditRequest(prompt="make it night", image_urls=["https://a/b.png"]),
        GptImageEditRequest(
            prompt="swap the sky",
            image_urls=["https://a/b.png"],
            image_size="1024x1024",
            mask_image_url="https://a/m.png",
        ),
    ],
)
def test_generation_result_round_trip_keeps_the_request_class(
    request_: GptImageRequest | GptImageEditRequest,
) -> None:
    """Prefect persists results as JSON: the request must come back as the same model."""
    result = GenerationResult(
        handle=RequestHandle(endpoint=request_.endpoint, request_id=str(uuid.uuid4())),
        request=request_,
        output=GptImageOutput(images=[]),
        images=[],
    )
    back = GenerationResult.model_validate_json(result.model_dump_json())
    assert type(back.request) is type(request_)
    assert back.request == request_
    assert back.request.endpoint == request_.endpoint
    stored = json.loads(result.model_dump_json())["request"]
    assert {k: v for k, v in stored.items() if v is not None} == request_.to_arguments()


# -- counts must add up (issue 12, item 7) -------------------------------------------------------


def _output(n: int) -> GptImageOutput:
    return GptImageOutput(images=[ImageFile(url=f"https://v3.fal.media/{i}.png") for i in range(n)])


@pytest.mark.parametrize(("asked", "got"), [(1, 1), (4, 4)])
def test_a_full_result_passes(asked: int, got: int) -> None:
    check_image_count(GptImageRequest(prompt="kites", num_images=asked), _output(got))


@pytest.mark.parametrize(
    ("asked", "got", "text"), [(1, 0, "1 missing"), (4, 1, "3 missing"), (4, 13, "9 extra")]
)
def test_a_result_with_another_count_is_an_error(asked: int, got: int, text: str) -> None:
    request = GptImageRequest(prompt="kites", num_images=asked)
    with pytest.raises(ImageCountMismatch) as info:
        check_image_count(request, _output(got), request_id="rid-1")
    exc = info.value
    assert isinstance(exc, FalError) and not exc.transient
    assert (exc.expected, exc.delivered, exc.request_id) == (asked, got, "rid-1")
    assert exc.error_type == "image_count_mismatch"
    assert text in str(exc) and f"num_images={asked}" in str(exc) and "rid-1" in str(exc)
    back = pickle.loads(pickle.dumps(exc))  # Prefect persists failed states
    assert type(back) is ImageCountMismatch and str(back) == str(exc)
    assert (back.expected, back.delivered, back.error_type) == (asked, got, "image_count_mismatch")


def test_a_short_result_names_the_kept_images(tmp_path: Any) -> None:
    image = DownloadedImage(
        path=str(tmp_path / "rid-1-0.png"),
        source_url="https://v3.fal.media/0.png",
        request_id="rid-1",
        endpoint=TEXT_TO_IMAGE_ENDPOINT,
        index=0,
        content_type="image/png",
        format="png",
        width=1024,
        height=1024,
        bytes=10,
        sha256="0" * 64,
    )
    with pytest.raises(ImageCountMismatch, match="1 delivered image") as info:
        check_image_count(GptImageRequest(prompt="kites", num_images=2), _output(1), images=[image])
    assert str(tmp_path) in str(info.value)


def test_one_request_id_for_two_requests_is_refused() -> None:
    a = GptImageRequest(prompt="a tram", quality="low")
    b = GptImageRequest(prompt="a canal", quality="low")
    claim_request_id("rid", a)  # outside a ledger: nothing to compare with
    claim_request_id("rid", b)
    with use_request_id_ledger(RequestIdLedger()) as ledger:
        claim_request_id("rid", a)
        claim_request_id("rid", a)  # the same request again (a retry, a cache hit): fine
        claim_request_id("other", b)
        assert not ledger.conflicts()
        with pytest.raises(DuplicateRequestId) as info:
            claim_request_id("rid", b)
        assert info.value.error_type == "duplicate_request_id" and "'a tram'" in str(info.value)
        with pytest.raises(DuplicateRequestId):
            claim_request_id("rid", a, variant=1)  # another variant is another request
        assert ledger.conflicted("rid") and not ledger.conflicted("other")
        assert ledger.conflicts() == {"rid": ["a tram", "a canal", "a tram"]}
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is DuplicateRequestId and back.request_id == "rid"
