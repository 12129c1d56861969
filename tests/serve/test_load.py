"""`qvlc serve` under concurrent load (a short run of benchmarks/bench_serve_load.py on the tiny artifacts): no
request lost, every 200 equal to its serial answer, malformed bodies answered 4xx, memory flat, and a client
trickling its headers does not hold up the others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve_load.py"


def test_serve_under_concurrent_load(serve_artifacts):
    llm, visual = serve_artifacts
    res = subprocess.run([sys.executable, str(BENCH), "--clients", "8", "--requests", "64", "--llm", str(llm),
                          "--visual", str(visual)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    for check in ("no request lost", "every 200 equals its serial answer", "malformed bodies answered 4xx",
                  "/health under 1 s while a client trickles"):
        assert f"PASS  {check}" in res.stdout, res.stdout
