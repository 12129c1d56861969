"""OpenAI chat completions, as evalscope, VLMEvalKit and the ``openai`` client send them: the request checked into a
typed ``ChatRequest`` (every refusal an ``ApiError`` in OpenAI's error shape, status 400 — never a 422), and the
response and stream-chunk bodies.

Sampling fields (``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``, …) and any field this
module does not know are accepted and ignored: decoding is greedy.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from qvlc.serve.errors import ApiError
from qvlc.serve.media import MediaLimits, decode_image_url

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # OpenAI's limit on stop sequences


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat request: messages in transformers' chat format, the images in the order their parts appear."""

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    max_tokens: int | None = None  # None: as many as the KV cache holds
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _int_at_least_1(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(f"'{name}' must be a positive integer, got {_short(value)}", param=name,
                       code="invalid_value")
    return value


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _short(value: Any, limit: int = 80) -> str:
    """A client's value in a message: bounded in depth and length (a body may nest a thousand lists deep)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them, got {_short(stop)}",
                       param="stop", code="invalid_value")
    return tuple(stops)


def _content(content: Any, where: str, limits: MediaLimits, images: list[Image.Image]) -> str | list[dict]:
    """One message's content → transformers' format; image parts decoded (bounded) into ``images``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    parts: list[dict] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(f"{at}.image_url.url must be a string", param=f"{at}.image_url")
            images.append(decode_image_url(url, limits, at))
            parts.append({"type": "image"})
        else:
            raise ApiError(f"{at} has type {_short(kind)}: qvlc serve takes parts of type 'text' (with a string "
                           "'text') and 'image_url'", param=at, code="unsupported_content")
    return parts


def parse_chat_request(raw: bytes, limits: MediaLimits) -> ChatRequest:
    """The request body → ChatRequest; ApiError (400) naming the field for anything malformed."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise ApiError("the request body is JSON nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_json")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    messages, images = [], []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(f"messages[{i}].role is {_short(role)}: use system, user or assistant",
                           param=f"messages[{i}].role")
        messages.append({"role": ROLES[role], "content": _content(m.get("content"), f"messages[{i}]", limits,
                                                                  images)})
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(f"'n' is {_short(n)}: qvlc serve returns one choice (greedy decoding)", param="n",
                       code="invalid_value")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    max_tokens = _int_at_least_1(body, "max_completion_tokens") or _int_at_least_1(body, "max_tokens")
    return ChatRequest(messages, images, max_tokens, _stop(body), body.get("stream") is True, include_usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, created: int, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def chunk(rid: str, created: int, model: str, delta: dict | None = None, finish: str | None = None,
          use: dict | None = None) -> str:
    """One server-sent event: ``data: {chunk}``. A usage chunk (``use``) has no choices, as OpenAI's."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if use is not None else
                            [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        body["usage"] = use
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class StopMatcher:
    """Stop strings over streamed text: ``push(piece)`` returns the text safe to emit (holding back a tail that may
    begin a stop string) and whether a stop string was reached; the text never includes the stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.pending, self.stopped = stops, "", False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
