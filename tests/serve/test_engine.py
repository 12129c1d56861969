"""The generation queue on its own (a stand-in pipeline, no graphs): a bug met while preparing one request is that
request's 500 and the next request is still served."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from qvlc.serve.engine import Engine
from qvlc.serve.protocol import ChatRequest


class Pipe:
    spec = SimpleNamespace(prefill_len=8, max_context=16)

    def prepare_chat(self, messages, images):
        if messages[0]["content"] == "boom":
            raise RuntimeError("a bug")
        return SimpleNamespace(input_ids=[1, 2, 3], image_tokens=0)

    def check_media(self, prepared):
        pass

    def generate_prepared(self, prepared, limit, on_token=None):
        on_token(7, "hi")
        return SimpleNamespace(stopped_at_eos=True, prompt_tokens=3, tokens=[7])


async def _ask(engine: Engine, content: str) -> list:
    async def gone() -> bool:
        return False

    job = engine.submit(ChatRequest([{"role": "user", "content": content}]), gone)
    events = []
    while True:
        kind, value = await job.events.get()
        events.append((kind, value))
        if kind in ("done", "error"):
            return events


def test_a_bug_in_one_request_is_its_500_and_the_queue_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("QVLC_CACHE", str(tmp_path))  # the traceback's log goes here

    async def main():
        engine = Engine(Pipe(), max_queue=4)
        await engine.start()
        try:
            bad = await asyncio.wait_for(_ask(engine, "boom"), 10)
            good = await asyncio.wait_for(_ask(engine, "hello"), 10)
        finally:
            await engine.stop()
        return bad, good

    bad, good = asyncio.run(main())
    assert bad[-1][0] == "error" and bad[-1][1].status == 500 and bad[-1][1].code == "internal_error"
    assert [k for k, _ in good] == ["ready", "text", "done"] and good[-1][1].finish_reason == "stop"
    assert list(tmp_path.glob("logs/qvlc-*.log"))
