"""The OpenAI images API's request, checked: a JSON body in, a :class:`GenerationRequest` or an :class:`ApiError`
(OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``) out. Pure functions, no server."""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass

MAX_SEED = 2**63 - 1


@dataclass
class ServeLimits:
    max_prompt_chars: int = 1000  # prompt and negative prompt, each
    max_n: int = 4  # images per request
    max_steps: int = 100
    max_body_bytes: int = 64 * 1024


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    prompt: str
    n: int
    width: int
    height: int
    response_format: str  # b64_json | url
    steps: int | None
    guidance: float | None
    sampler: str | None
    seed: int
    negative_prompt: str | None


FIELDS = {"prompt", "n", "size", "response_format", "model", "user", "quality", "style", "steps", "guidance",
          "seed", "negative_prompt", "sampler"}


def parse_json(body: bytes, limits: ServeLimits) -> dict:
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {len(body)} bytes is over the limit of {limits.max_body_bytes}")
    try:
        data = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _text(data: dict, name: str, limits: ServeLimits, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ApiError(400, f"'{name}' must be a non-empty string" if required else f"'{name}' must be a string",
                       param=name)
    if len(value) > limits.max_prompt_chars:
        raise ApiError(400, f"'{name}' is {len(value)} characters; the limit is {limits.max_prompt_chars}", param=name)
    return value


def _int(data: dict, name: str, lo: int, hi: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be an integer from {lo} to {hi}, got {value!r}", param=name)
    return value


def _size(data: dict, sizes: list[str]) -> tuple[int, int]:
    size = data.get("size") or sizes[0]
    if size == "auto":
        size = sizes[0]
    if size not in sizes:
        raise ApiError(400, f"size {size!r} is not served by this model; use one of {sizes}", param="size")
    width, height = (int(v) for v in size.split("x"))
    return width, height


def _guidance(data: dict) -> float | None:
    value = data.get("guidance")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ApiError(400, f"'guidance' must be a finite number >= 0, got {value!r}", param="guidance")
    return float(value)


def parse_generation_request(body: bytes, *, model: str, sizes: list[str], samplers: list[str],
                             limits: ServeLimits) -> GenerationRequest:
    """The checked request, or an ApiError naming the field and what it accepts."""
    data = parse_json(body, limits)
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}", param=unknown[0])
    if data.get("model") not in (None, model):
        raise ApiError(404, f"model {data['model']!r} is not served here; this server serves {model!r}",
                       param="model", code="model_not_found")
    fmt = data.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise ApiError(400, f"response_format must be b64_json or url, got {fmt!r}", param="response_format")
    sampler = data.get("sampler")
    if sampler is not None and sampler not in samplers:
        raise ApiError(400, f"unknown sampler {sampler!r}; use one of {samplers}", param="sampler")
    seed = _int(data, "seed", 0, MAX_SEED - limits.max_n)
    width, height = _size(data, sizes)
    return GenerationRequest(
        prompt=_text(data, "prompt", limits, required=True), n=_int(data, "n", 1, limits.max_n) or 1,
        width=width, height=height, response_format=fmt, steps=_int(data, "steps", 1, limits.max_steps),
        guidance=_guidance(data), sampler=sampler, seed=secrets.randbelow(2**31) if seed is None else seed,
        negative_prompt=_text(data, "negative_prompt", limits))
