"""Every schema rule of fal's two endpoints, enforced before any network call."""

from __future__ import annotations

import json
from typing import Any

import pytest

from prefect_gptimage.errors import InvalidRequestError
from prefect_gptimage.pricing import estimate_cost
from prefect_gptimage.schemas import (
    EDIT_ENDPOINT,
    TEXT_TO_IMAGE_ENDPOINT,
    GenerationResult,
    GptImageEditRequest,
    GptImageOutput,
    GptImageRequest,
    RequestHandle,
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
        handle=RequestHandle(endpoint=request_.endpoint, request_id="rid"),
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
