"""One generation at a time behind a bounded FIFO queue.

The graphs are batch 1 and the pipeline holds one KV cache, so a single worker thread runs every generation, in
arrival order. A full queue is refused at once (429 with ``Retry-After``); a request whose client has gone is
dropped before it starts, and a streamed one whose client leaves stops at its next token. Everything a request can
be refused for — its length, an image too large for the visual graph — is checked before the first byte of the
answer, so a streamed request can still get its 400.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qvlc.errors import QvlcError
from qvlc.runtime.vlm import VlmPipeline
from qvlc.serve.errors import ApiError
from qvlc.serve.protocol import ChatRequest, StopMatcher, usage
from qvlc.system.crash_log import write_log


@dataclass
class Job:
    """A request in the queue; the worker reports through ``events``: ("ready"|"text"|"done"|"error", value)."""

    request: ChatRequest
    disconnected: Callable[[], Awaitable[bool]]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    release: Callable[[], None] | None = None  # frees the job's queue slot (the engine's), once

    def put(self, kind: str, value=None) -> None:
        """From the worker thread: hand an event to the request's coroutine. The last one ("done", "error") frees
        the queue slot first, so a client that sends its next request on the answer never finds its own finished
        request still counted (that raced into spurious 429s under load)."""
        if kind in ("done", "error") and self.release is not None:
            self.loop.call_soon_threadsafe(self.release)
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def _internal_error() -> ApiError:
    """A bug met while serving one request: its traceback to a log file, a 500 in OpenAI's shape to the client."""
    path = write_log(traceback.format_exc())
    return ApiError(f"internal error in qvlc (a bug); the traceback is in {path}", status=500, code="internal_error",
                    kind="server_error")


@dataclass(frozen=True)
class Outcome:
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_tokens or the KV room)
    usage: dict


class Engine:
    def __init__(self, pipe: VlmPipeline, max_queue: int) -> None:
        self.pipe, self.max_queue = pipe, max_queue
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="qvlc-generate")
        self.queue: asyncio.Queue[Job] | None = None
        self.worker: asyncio.Task | None = None
        self.served = self.dropped = self.pending = 0  # pending: queued or running

    @property
    def room(self) -> int:
        """New tokens the KV cache holds after a full prefill window."""
        return self.pipe.spec.max_context - self.pipe.spec.prefill_len

    async def start(self) -> None:
        self.queue = asyncio.Queue()  # bounded by ``pending`` (queued + running) in ``submit``
        self.worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: ChatRequest, disconnected: Callable[[], Awaitable[bool]]) -> Job:
        """Queue a request; ApiError 429 when ``max_queue`` requests are already waiting or running."""
        if self.pending >= self.max_queue:
            raise ApiError(f"the server is busy: {self.pending} requests are queued or running (--max-queue "
                           f"{self.max_queue}); retry later", code="rate_limit_exceeded", status=429,
                           kind="rate_limit_error", headers={"Retry-After": "1"})
        job = Job(request, disconnected, asyncio.get_running_loop())
        released = []

        def release() -> None:  # in the event loop; idempotent
            if not released:
                released.append(True)
                self.pending -= 1

        job.release = release
        self.queue.put_nowait(job)
        self.pending += 1
        return job

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            try:
                if job.cancelled.is_set() or await job.disconnected():
                    self.dropped += 1
                    job.put("error", ApiError("the client went away before its request started", status=499))
                    continue
                try:
                    await loop.run_in_executor(self.executor, self._generate, job)
                except Exception:  # noqa: BLE001 — a bug: this request gets a 500, the queue keeps serving
                    job.put("error", _internal_error())
                self.served += 1
            finally:
                job.release()
                self.queue.task_done()

    def _prepare(self, request: ChatRequest):
        """Template, tokenize and preprocess; every refusal before the answer starts."""
        pipe = self.pipe
        try:
            prepared = pipe.prepare_chat(request.messages, request.images)
        except QvlcError as exc:
            raise ApiError(str(exc).replace("\n", " "), code="invalid_prompt") from None
        n, S = len(prepared.input_ids), pipe.spec.prefill_len
        if n > S:
            raise ApiError(f"This model's maximum context length is {S} tokens. However, your messages resulted in "
                           f"{n} tokens ({prepared.image_tokens} of them image tokens). Please reduce the length of "
                           "the messages or the images.", code="context_length_exceeded", param="messages")
        try:
            pipe.check_media(prepared)
        except QvlcError as exc:
            raise ApiError(str(exc).replace("\n", " "), code="image_too_large", param="messages") from None
        return prepared

    def _generate(self, job: Job) -> None:
        """In the worker thread: prepare, then generate greedily, streaming text events."""
        request = job.request
        try:
            prepared = self._prepare(request)
        except ApiError as exc:
            job.put("error", exc)
            return
        job.put("ready")
        matcher = StopMatcher(request.stop)

        def on_token(_tok: int, piece: str) -> bool:
            if job.cancelled.is_set():
                return True
            if text := matcher.push(piece):
                job.put("text", text)
            return matcher.stopped

        try:
            limit = min(request.max_tokens or self.room, self.room)
            result = self.pipe.generate_prepared(prepared, limit, on_token=on_token)
        except Exception:  # noqa: BLE001 — a bug: the client gets a 500 in OpenAI's shape, the log the traceback
            job.put("error", _internal_error())
            return
        if rest := matcher.flush():
            job.put("text", rest)
        finish = "stop" if result.stopped_at_eos or matcher.stopped else "length"
        job.put("done", Outcome(finish, usage(result.prompt_tokens, len(result.tokens))))
