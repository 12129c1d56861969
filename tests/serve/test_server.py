"""`qvlc serve` driven as its users drive it: the real `openai` client (plain, streamed, four threads at once), the
exact payload VLMEvalKit's OpenAI wrapper posts, and every bad input answered 400 in OpenAI's error shape."""

from __future__ import annotations

import io
import json
import signal
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from PIL import Image
from serve_helpers import C, S, ServerProcess, data_url, png_bytes

from qvlc.runtime.vlm import VlmPipeline

PROMPT = "Describe this image."
NEW = 12


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="EMPTY", max_retries=0, timeout=120)


def post(server, payload, raw: bytes | None = None, headers: dict | None = None):
    """A plain POST to /v1/chat/completions: (status, parsed body, headers)."""
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(server.url + "/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


def image_message(url: str, text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def expected(serve_artifacts) -> dict[str, str]:
    """What `qvlc run` (its pipeline) answers, in this process, for the prompts the tests send."""
    pipe = VlmPipeline(*serve_artifacts)
    im = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    return {"image": pipe.generate([im], PROMPT, max_new_tokens=NEW).text,
            "text": pipe.generate([], PROMPT, max_new_tokens=NEW).text}


def test_health_and_models(server):
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health") as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    assert [m.id for m in client(server).models.list().data] == ["serve_llm"]


@pytest.mark.parametrize("case", ["image", "text"])
def test_answers_equal_qvlc_run(server, expected, case):
    messages = image_message(data_url(png_bytes())) if case == "image" else \
        [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    r = client(server).chat.completions.create(model="any", messages=messages, max_tokens=NEW, temperature=0.7,
                                               extra_body={"top_k": 20, "repetition_penalty": 1.05})
    assert r.choices[0].message.content == expected[case]
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= NEW
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "serve_llm"


def test_streamed_equals_plain_with_a_usage_chunk(server, expected):
    stream = client(server).chat.completions.create(
        model="any", messages=image_message(data_url(png_bytes())), max_tokens=NEW, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["image"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens >= 1


def test_four_clients_at_once_get_the_serial_answers(server, expected):
    def ask(i: int) -> str:
        messages = image_message(data_url(png_bytes())) if i % 2 else [{"role": "user", "content": PROMPT}]
        r = client(server).chat.completions.create(model="m", messages=messages, max_tokens=NEW)
        return r.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert answers == [expected["text"], expected["image"]] * 2


def test_vlmevalkit_payload(server, expected):
    """VLMEvalKit's OpenAIWrapper (CustomAPIModel route): a plain POST, bearer EMPTY, n=1, image with detail."""
    payload = {"model": "Qwen2-VL", "n": 1, "temperature": 0, "max_tokens": NEW,
               "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": data_url(png_bytes(), "image/jpeg"), "detail": "low"}},
                   {"type": "text", "text": PROMPT}]}]}
    status, body, _ = post(server, payload, headers={"Authorization": "Bearer EMPTY"})
    assert status == 200 and body["choices"][0]["message"]["content"].strip() == expected["image"].strip()


def test_system_message_and_turns_go_through_the_chat_template(server):
    """The system message and every turn reach the prompt: a longer system message or one more turn makes the
    prompt longer by what they add, and the default system turn is replaced, not kept beside it."""
    def prompt_tokens(system: str | None, turns: list[dict]) -> int:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + turns
        r = client(server).chat.completions.create(model="m", messages=messages, max_tokens=1)
        assert r.choices[0].message.content is not None
        return r.usage.prompt_tokens

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": PROMPT}]
    terse = prompt_tokens("You are terse.", turns)
    longer = prompt_tokens("You are terse. You answer in one word, always, whatever the question.", turns)
    assert longer > terse
    assert prompt_tokens("You are terse.", turns[2:]) < terse  # the earlier turns were in the prompt
    assert prompt_tokens(None, turns) != terse  # no system message: the template's default one instead


def test_max_tokens_is_capped_at_the_kv_room(server):
    r = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                               max_completion_tokens=10_000)
    assert r.choices[0].finish_reason == "length" or r.usage.completion_tokens < C - S
    assert r.usage.completion_tokens <= C - S


def test_stop_strings_cut_the_answer(server, expected):
    word = expected["text"].split()[1]
    r = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=NEW, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == expected["text"][:expected["text"].index(word)]


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h and whose data is one tiny chunk: decoding it would need w*h*3 bytes."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


BAD = {
    "malformed_json": (None, b'{"messages": [', "invalid_json"),
    "no_messages": ({"messages": []}, None, "invalid_request"),
    "bad_role": ({"messages": [{"role": "tool", "content": "x"}]}, None, "invalid_request"),
    "undecodable_base64": ({"messages": image_message("data:image/png;base64,@@not base64@@")}, None,
                           "invalid_base64"),
    "not_an_image": ({"messages": image_message(data_url(b"hello, I am text", "image/png"))}, None, "invalid_image"),
    "beyond_pixel_limit": ({"messages": image_message(data_url(_png_header_only(20000, 20000)))}, None,
                           "image_too_large"),
    "http_url": ({"messages": image_message("http://example.com/cat.png")}, None, "unsupported_url"),
    "https_url": ({"messages": image_message("https://example.com/cat.png")}, None, "unsupported_url"),
    "file_url_outside_media_dir": ({"messages": image_message("file:///etc/hostname")}, None, "unsupported_url"),
    "audio_part": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, None,
                   "unsupported_content"),
    "max_tokens_zero": ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, None, "invalid_value"),
    "two_choices": ({"messages": [{"role": "user", "content": "x"}], "n": 2}, None, "invalid_value"),
    "bad_stop": ({"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}, None, "invalid_value"),
    "too_long": ({"messages": [{"role": "user", "content": "word " * (2 * S)}]}, None, "context_length_exceeded"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_400_in_openai_shape(server, case):
    payload, raw, code = BAD[case]
    status, body, _ = post(server, payload, raw)
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
    if case == "too_long":
        assert "maximum context length" in body["error"]["message"]


def test_openai_client_sees_context_length_exceeded(server):
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * (2 * S)}])
    assert info.value.code == "context_length_exceeded"


def test_mime_type_is_sniffed_not_trusted(server, expected):
    for mime in ("image/jpeg", "image", "application/octet-stream"):
        status, body, _ = post(server, {"messages": image_message(data_url(png_bytes(), mime)), "max_tokens": NEW})
        assert status == 200 and body["choices"][0]["message"]["content"] == expected["image"], mime


def test_file_url_inside_media_dir(server, expected):
    (server.media / "a.png").write_bytes(png_bytes())
    status, body, _ = post(server, {"messages": image_message(f"file://{server.media / 'a.png'}"), "max_tokens": NEW})
    assert status == 200 and body["choices"][0]["message"]["content"] == expected["image"]
    (server.media / "link.png").symlink_to("/etc/hostname")
    status, body, _ = post(server, {"messages": image_message(f"file://{server.media / 'link.png'}")})
    assert status == 400 and body["error"]["code"] == "unsupported_url"


@pytest.fixture(scope="module")
def small_queue(serve_artifacts):
    srv = ServerProcess([str(serve_artifacts[0]), str(serve_artifacts[1]), "--max-queue", "1"])
    yield srv
    srv.stop()


def test_a_full_queue_answers_429_and_a_gone_client_is_dropped(small_queue):
    srv = small_queue
    long = client(srv).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=C - S, stream=True)
    first = next(iter(long))  # the long request is running: the queue (1) is full
    status, body, headers = post(srv, {"messages": [{"role": "user", "content": "x"}]})
    assert status == 429 and headers.get("retry-after") == "1" and body["error"]["code"] == "rate_limit_exceeded"
    assert first.choices[0].delta.role == "assistant"
    long.close()  # the client leaves mid-stream: the generation stops at its next token
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(srv.url.removesuffix("/v1") + "/health") as r:
            if json.loads(r.read())["pending"] == 0:
                break
        time.sleep(0.2)
    r = client(srv).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 0)])
def test_signals_stop_it_cleanly(serve_artifacts, sig, code):
    srv = ServerProcess([str(serve_artifacts[0]), str(serve_artifacts[1])])
    threading.Thread(target=lambda: post(srv, {"messages": [{"role": "user", "content": "Hi"}]}), daemon=True).start()
    time.sleep(0.5)
    rc, _out, err = srv.stop(sig)
    assert rc == code and "Traceback" not in err, err


def _health(srv) -> dict:
    with urllib.request.urlopen(srv.url.removesuffix("/v1") + "/health") as r:
        return json.loads(r.read())


def test_a_request_whose_client_left_is_dropped_before_it_starts(server):
    import socket
    from urllib.parse import urlparse

    before = _health(server)
    long = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=C - S, stream=True)
    next(iter(long))  # running: the next request waits in the queue
    u = urlparse(server.url)
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).encode()
    with socket.create_connection((u.hostname, u.port)) as s:  # posts, then leaves without reading the answer
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while _health(server)["pending"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    list(long)  # let the long one finish
    deadline = time.monotonic() + 30
    while _health(server)["pending"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = _health(server)
    assert after["dropped"] == before["dropped"] + 1 and after["served"] == before["served"] + 1
