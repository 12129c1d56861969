"""``qvlc serve``: load the artifacts, bind the socket, run uvicorn until SIGINT (exit 0) or SIGTERM (exit 143).

The socket is bound here, before uvicorn starts, so a port in use is one clear error rather than uvicorn's exit;
one line with the URL is printed once the server accepts connections.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qvlc.artifact.trust import Trust
from qvlc.errors import Interrupted, QvlcError
from qvlc.serve.media import MediaLimits


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # default: the LLM artifact's name
    max_queue: int = 16
    limits: MediaLimits = MediaLimits()
    checkpoint: Path | None = None
    trust: Trust = Trust()  # how far the artifacts are checked before serving (--verify-hashes, --expect-digest)


def bind(host: str, port: int) -> socket.socket:
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        what = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise QvlcError(f"{host}:{port} {what}", fix="pick another --port (or --host)", key="--port") from None
    sock.set_inheritable(True)
    return sock


def serve(llm_dir: Path, visual_dir: Path, options: ServeOptions, ready: Callable[[str], None]) -> None:
    """Blocks until the server stops: SIGINT ends it normally, SIGTERM with ``Interrupted`` (exit 143)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise QvlcError(f"qvlc serve needs FastAPI and uvicorn ({exc.name} is not installed)",
                        fix='pip install "qvlc[serve]" (scripts/setup.sh installs it)', key="qvlc serve") from None

    from qvlc.runtime.vlm import VlmPipeline
    from qvlc.serve.app import create_app
    from qvlc.serve.engine import Engine

    if not 1 <= options.max_queue <= 4096:
        raise QvlcError(f"--max-queue is {options.max_queue}", fix="use 1 <= --max-queue <= 4096", key="--max-queue")
    pipe = VlmPipeline(llm_dir, visual_dir, checkpoint=options.checkpoint, trust=options.trust)
    name = options.model_name or Path(llm_dir).resolve().name
    sock = bind(options.host, options.port)
    app = create_app(Engine(pipe, options.max_queue), name, options.limits)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started or not self.should_exit:
                h, p = sock.getsockname()[:2]
                ready(f"http://{h if ':' not in h else f'[{h}]'}:{p}/v1")

        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's, without re-raising the signal after the graceful shutdown: the command decides the exit
            (SIGINT 0, SIGTERM 143)."""
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=3)
    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if signal.SIGTERM in server._captured_signals:
        raise Interrupted(signal.SIGTERM)
