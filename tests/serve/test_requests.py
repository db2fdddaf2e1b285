"""The images API request checks: every bad input is an ApiError with OpenAI's error shape, never a crash."""

import json

import pytest

from pocketdiff.serve.requests import ApiError, ServeLimits, parse_generation_request

SAMPLERS = ["ddim", "dpmpp_2m", "lcm"]

# body -> (status, param); the table the live-server test sends over HTTP too
BAD_REQUESTS = {
    "not-json": (b"{nope", 400, None),
    "a-list": (b"[1, 2]", 400, None),
    "missing-prompt": (b'{"n": 1}', 400, "prompt"),
    "empty-prompt": (b'{"prompt": "  "}', 400, "prompt"),
    "prompt-not-text": (b'{"prompt": 3}', 400, "prompt"),
    "prompt-too-long": (json.dumps({"prompt": "a" * 1001}).encode(), 400, "prompt"),
    "unknown-size": (b'{"prompt": "a", "size": "512x512"}', 400, "size"),
    "unknown-sampler": (b'{"prompt": "a", "sampler": "heun"}', 400, "sampler"),
    "n-zero": (b'{"prompt": "a", "n": 0}', 400, "n"),
    "n-over-limit": (b'{"prompt": "a", "n": 5}', 400, "n"),
    "n-not-int": (b'{"prompt": "a", "n": "2"}', 400, "n"),
    "guidance-nan": (b'{"prompt": "a", "guidance": NaN}', 400, "guidance"),
    "guidance-inf": (b'{"prompt": "a", "guidance": Infinity}', 400, "guidance"),
    "steps-over-limit": (b'{"prompt": "a", "steps": 101}', 400, "steps"),
    "seed-negative": (b'{"prompt": "a", "seed": -1}', 400, "seed"),
    "bad-format": (b'{"prompt": "a", "response_format": "png"}', 400, "response_format"),
    "unknown-field": (b'{"prompt": "a", "colour": "red"}', 400, "colour"),
    "other-model": (b'{"prompt": "a", "model": "dall-e-3"}', 404, "model"),
}


def parse(body: bytes, **limits):
    return parse_generation_request(body, model="tiny", sizes=["16x16"], samplers=SAMPLERS,
                                    limits=ServeLimits(**limits))


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests_are_api_errors_naming_the_field(name):
    body, status, param = BAD_REQUESTS[name]
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == status and e.value.param == param
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_a_good_request_takes_the_defaults_and_the_pocketdiff_extensions():
    r = parse(b'{"prompt": "a red circle"}')
    assert (r.n, r.width, r.height, r.response_format, r.steps, r.sampler) == (1, 16, 16, "b64_json", None, None)
    assert 0 <= r.seed < 2**31
    r = parse(json.dumps({"prompt": "a", "n": 4, "size": "16x16", "model": "tiny", "response_format": "url",
                          "steps": 3, "guidance": 2, "seed": 7, "negative_prompt": "blue", "sampler": "ddim"}).encode())
    assert (r.n, r.steps, r.guidance, r.seed, r.negative_prompt, r.sampler) == (4, 3, 2.0, 7, "blue", "ddim")


def test_a_body_over_the_limit_is_413():
    with pytest.raises(ApiError) as e:
        parse(json.dumps({"prompt": "a" * 200}).encode(), max_body_bytes=100)
    assert e.value.status == 413
