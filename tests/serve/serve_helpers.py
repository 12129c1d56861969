"""Helpers of the serve tests: a real `qvlc serve` process (port 0), images as data URLs."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

S, C, N = 256, 320, 512


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "qvlc", "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env or os.environ.copy())
        self.url = self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if "ready on " in line:
                return line.split("ready on ", 1)[1].split()[0]
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"qvlc serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
        raise TimeoutError("qvlc serve did not print its ready line")

    def stop(self, sig: int = 15) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err


def png_bytes(h: int = 150, w: int = 230, seed: int = 7) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"
