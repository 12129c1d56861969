"""`qvlc serve`'s request bodies and headers, as properties: every answer is a 200, a 4xx in OpenAI's error shape
or a 429 — never a 5xx — and a 200 is a completion. The app runs in-process (Starlette's test client) on the
tiny artifacts, with the engine that `qvlc serve` runs."""

from __future__ import annotations

import base64
import json
import string
from typing import Any

from hypothesis import strategies as st
from surfaces import Workspace, json_bytes, png_bytes

BASE = {"model": "m", "max_tokens": 2, "stream": False, "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()}},
        {"type": "text", "text": "What is this?"}]}]}
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
TRANSPORT = {"content-length", "host", "transfer-encoding", "connection", "expect", "upgrade", "te", "trailer"}
_CLIENTS: dict[str, Any] = {}


def client(ws: Workspace):
    """One app per workspace: the engine `qvlc serve` runs, over the unedited tiny artifacts."""
    key = str(ws.serve_llm)
    if key not in _CLIENTS:
        from starlette.testclient import TestClient

        from qvlc.runtime.vlm import VlmPipeline
        from qvlc.serve.app import create_app
        from qvlc.serve.engine import Engine
        from qvlc.serve.media import MediaLimits

        app = create_app(Engine(VlmPipeline(ws.serve_llm, ws.serve_visual), 8), "m", MediaLimits())
        _CLIENTS[key] = TestClient(app, raise_server_exceptions=False).__enter__()
    return _CLIENTS[key]


def close_clients() -> None:
    for c in _CLIENTS.values():
        c.__exit__(None, None, None)
    _CLIENTS.clear()


def check_answer(r) -> None:
    assert r.status_code < 500, f"HTTP {r.status_code}: {r.text[:600]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"] and "code" in err, r.text[:300]
    elif r.headers.get("content-type", "").startswith("application/json"):
        assert r.json()["choices"][0]["message"]["role"] == "assistant", r.text[:300]
    else:
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]


def serve_body(ws: Workspace, draw) -> None:
    body = draw(json_bytes(BASE))
    check_answer(client(ws).post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}))


def serve_headers(ws: Workspace, draw) -> None:
    names = st.text(alphabet=TOKEN, min_size=1, max_size=24).filter(lambda n: n.lower() not in TRANSPORT)
    values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=60).map(str.strip)
    headers = draw(st.dictionaries(names, values, max_size=6))
    body = dict(BASE, stream=draw(st.booleans()), messages=[{"role": "user", "content": "Hi"}])
    raw = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]  # as bytes: latin-1 is what HTTP carries
    check_answer(client(ws).post("/v1/chat/completions", content=json.dumps(body).encode(), headers=raw))


SERVE_SURFACES = {"serve request bodies": serve_body, "serve request headers": serve_headers}
