"""`qvlc serve` under load: concurrent clients sending a mix of text-only and image requests, streamed and plain,
clients that leave mid-stream, malformed bodies, and a client that trickles its headers; then the checks.

    .venv/bin/python benchmarks/bench_serve_load.py                     # tiny artifacts, 16 clients, 400 requests
    .venv/bin/python benchmarks/bench_serve_load.py --clients 16 --requests 400 --llm L --visual V

Checks (the exit status is the number that failed): no request lost (every one answered 200, 4xx or 429, or
left by its own client); every 200 equal to the same request's serial answer; the server's resident memory
after the run within 10 % of after its warm-up; the trickling client does not hold up the others (`/health`
answers in under a second while it trickles). Prints p50/p99 latency per kind and requests per minute.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("What is in the picture?", "Describe the colours.", "Say hello.", "Count to three.")
KINDS = ("text", "text_stream", "image", "image_stream", "leave", "malformed")
WEIGHTS = (30, 20, 20, 15, 8, 7)  # percent of the requests


def png(seed: int) -> str:
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (56 + 14 * seed, 84, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = [png(i) for i in range(3)]


def body(kind: str, i: int, max_tokens: int) -> bytes:
    if kind == "malformed":
        return random.Random(i).choice([b"{not json", b'{"messages": 3}', b'{"messages": [{"role": []}]}',
                                        b"[" * 3000 + b"]" * 3000, json.dumps({"messages": [], "n": 2}).encode()])
    content: object = PROMPTS[i % len(PROMPTS)]
    if kind.startswith("image"):
        content = [{"type": "image_url", "image_url": {"url": IMAGES[i % len(IMAGES)]}}, {"type": "text",
                                                                                          "text": content}]
    return json.dumps({"model": "m", "max_tokens": max_tokens, "stream": kind.endswith("stream") or kind == "leave",
                       "messages": [{"role": "user", "content": content}]}).encode()


def key(kind: str, i: int) -> tuple[str, int]:
    """Requests with the same key must get the same answer (greedy decoding)."""
    return ("image" if kind.startswith("image") else "text", i % (len(PROMPTS) * len(IMAGES)))


def post(url: str, data: bytes, leave: bool = False, timeout: float = 300) -> tuple[int, str, float]:
    """(status, answer text, seconds). Streamed answers are assembled from their deltas; ``leave`` closes the
    connection after the first chunk."""
    u = urlparse(url)
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path.rstrip("/") + "/chat/completions", body=data,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200 or not r.getheader("Content-Type", "").startswith("text/event-stream"):
            raw = r.read()
            text = json.loads(raw)["choices"][0]["message"]["content"] if r.status == 200 else raw.decode()
            return r.status, text, time.monotonic() - t0
        parts = []
        for line in r:
            line = line.decode().strip()
            if leave and line.startswith("data:"):
                return -1, "", time.monotonic() - t0  # the client left mid-stream
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                parts.append(delta[0]["delta"].get("content") or "" if delta else "")
        return 200, "".join(parts), time.monotonic() - t0
    finally:
        conn.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def trickle(url: str, stop: threading.Event) -> None:
    """A client that sends its request headers one byte every half second, forever."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port)) as s:
        for b in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" * 100:
            if stop.is_set():
                return
            try:
                s.send(bytes([b]))
            except OSError:
                return
            stop.wait(0.5)


def health_seconds(url: str) -> float:
    u = urlparse(url)
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/health")
    conn.getresponse().read()
    conn.close()
    return time.monotonic() - t0


def artifacts(workdir: Path) -> tuple[Path, Path]:
    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import config_from_dict

    out = []
    for part, export in (("llm", {"prefill_len": 256, "max_context": 320}), ("visual", {"max_patches": 512})):
        folder = workdir / f"load_{part}"
        if not (folder / "manifest.json").is_file():
            compile_artifact(config_from_dict({"name": folder.name, "part": part, "export": export,
                                               "validate": {"enabled": False}, "output": {"dir": str(workdir)}}))
        out.append(folder)
    return out[0], out[1]


def start(llm: Path, visual: Path, max_queue: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "qvlc", "serve", str(llm), str(visual), "--port", "0",
                             "--max-queue", str(max_queue)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    while True:
        line = proc.stdout.readline()
        if "ready on " in line:
            return proc, line.split("ready on ", 1)[1].split()[0]
        if not line and proc.poll() is not None:
            raise SystemExit(f"qvlc serve exited {proc.returncode}: {proc.stderr.read()}")


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--llm", type=Path)
    ap.add_argument("--visual", type=Path)
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench_serve_load")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("QVLC_CACHE", str(ROOT / ".cache" / "qvlc"))
    from qvlc.system.library_noise import quiet_libraries

    quiet_libraries()
    args.workdir.mkdir(parents=True, exist_ok=True)
    llm, visual = (args.llm, args.visual) if args.llm else artifacts(args.workdir)
    rng = random.Random(args.seed)
    plan = [(rng.choices(KINDS, WEIGHTS)[0], i) for i in range(args.requests)]
    proc, url = start(llm, visual, args.max_queue)
    try:
        serial = {}  # the serial answer of every distinct request (also the warm-up)
        for kind in ("text", "image"):
            for i in range(len(PROMPTS) * len(IMAGES)):
                status, text, _ = post(url, body(kind, i, args.max_tokens))
                assert status == 200, (status, text)
                serial[key(kind, i)] = text
        warm_rss = rss_kb(proc.pid)
        stop = threading.Event()
        trickler = threading.Thread(target=trickle, args=(url, stop), daemon=True)
        trickler.start()
        results: list[tuple[str, int, str, float, tuple]] = []
        lock = threading.Lock()
        health: list[float] = []

        retried = Counter()

        def one(item: tuple[str, int]) -> None:
            kind, i = item
            for _ in range(10):  # a 429 is retried after its Retry-After (1 s), as OpenAI's clients do
                status, text, seconds = post(url, body(kind, i, args.max_tokens), leave=kind == "leave")
                if status != 429:
                    break
                with lock:
                    retried["429"] += 1
                time.sleep(1.0)
            with lock:
                results.append((kind, status, text, seconds, key(kind, i)))

        def probe() -> None:  # /health every half second while the load and the trickler run
            while not stop.wait(0.5):
                health.append(health_seconds(url))

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, plan))
        wall = time.monotonic() - t0
        stop.set()
        prober.join()
        time.sleep(1.0)  # the cancelled streams finish their current token
        after_rss = rss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"429 answers (each retried after its Retry-After): {retried['429']}")
    return report(args, results, serial, wall, warm_rss, after_rss, health)


def report(args, results, serial, wall, warm_rss, after_rss, health) -> int:
    by_status = Counter(status for _, status, *_ in results)
    lost = [r for r in results if not (r[1] in (200, 429, -1) or 400 <= r[1] < 500)]
    wrong = [r for r in results if r[1] == 200 and r[2] != serial[r[4]]]
    malformed_ok = all(400 <= s < 500 for k, s, *_ in results if k == "malformed")
    latency = defaultdict(list)
    for kind, status, _, seconds, _ in results:
        if status == 200:
            latency[kind].append(seconds)
    every = [s for v in latency.values() for s in v]
    print(f"{len(results)} requests from {args.clients} clients in {wall:.1f} s: "
          f"{len(results) / wall * 60:.0f} requests/min; statuses {dict(sorted(by_status.items()))} (-1: left)")
    for kind in KINDS:
        xs = latency.get(kind, [])
        if xs:
            print(f"  {kind:<13} {len(xs):>4} × 200   p50 {percentile(xs, 50):6.2f} s   p99 {percentile(xs, 99):6.2f} s")
    print(f"  all 200s      p50 {percentile(every, 50):.2f} s   p99 {percentile(every, 99):.2f} s")
    growth = (after_rss - warm_rss) / warm_rss
    print(f"server RSS: {warm_rss / 1024:.0f} MiB after warm-up, {after_rss / 1024:.0f} MiB after the run "
          f"({growth:+.1%})")
    print(f"/health while a client trickled its headers: max {max(health, default=0):.2f} s over {len(health)} probes")
    checks = {"no request lost": not lost, "every 200 equals its serial answer": not wrong,
              "malformed bodies answered 4xx": malformed_ok, "RSS within 10 % of after warm-up": abs(growth) <= 0.10,
              "/health under 1 s while a client trickles": bool(health) and max(health) < 1.0}
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    for r in (lost + wrong)[:5]:
        print(f"    {r[0]} {r[1]} {r[2][:200]!r}")
    return sum(not ok for ok in checks.values())


if __name__ == "__main__":
    sys.exit(main())
