"""Fuzz every input surface for a while (the properties of tests/fuzz/, with random seeds instead of CI's fixed
ones) and print the cases tried and the failures found per surface.

    .venv/bin/python benchmarks/fuzz.py --minutes 30            # every surface, 30 minutes in all
    .venv/bin/python benchmarks/fuzz.py --minutes 5 --only "serve request bodies"

A failure is a property that did not hold: exit 4 or an unexpected exit code, a message that names no file or key,
an HTTP 5xx or an answer not in OpenAI's shape, a file written outside the example's folder, or an example over
30 s. Each is printed with hypothesis's shrunk example; the exit status is the number of failing surfaces.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "fuzz"), str(ROOT / "tests")]


def workspace(root: Path):
    from surfaces import Workspace

    from qvlc.checkpoint.tiny import tiny_checkpoint
    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import config_from_dict

    parts = {}
    for part, export in (("llm", {"prefill_len": 64, "max_context": 96}), ("visual", {"max_patches": 64})):
        raw = {"name": f"fuzz_{part}", "part": part, "export": export, "validate": {"enabled": False},
               "output": {"dir": str(root / "build")}}
        parts[part] = compile_artifact(config_from_dict(raw)).folder
    return Workspace.make(root / "ws", tiny_checkpoint(), parts["llm"], parts["visual"])


def fuzz(name: str, prop, ws, seconds: float) -> tuple[int, list[str]]:
    """Run ``prop`` with fresh random seeds until ``seconds`` pass: (examples tried, failures)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tried, failures = Counter(), []

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(st.data())
    def run(data):
        tried["n"] += 1
        try:
            prop(ws, data.draw)
        finally:
            ws.restore()

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            run()
        except Exception as exc:  # noqa: BLE001 — a property that failed: recorded, the search goes on
            failures.append(f"{type(exc).__name__}: {str(exc)[:2000]}")
    return tried["n"], failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time for all surfaces together")
    ap.add_argument("--only", action="append", default=[], help="a surface's name (repeatable)")
    args = ap.parse_args()
    os.environ.setdefault("QVLC_CACHE", str(ROOT / ".cache" / "qvlc"))
    from properties import SURFACES
    from serve_properties import SERVE_SURFACES, close_clients

    surfaces = {**SURFACES, **SERVE_SURFACES}
    names = args.only or list(surfaces)
    unknown = [n for n in names if n not in surfaces]
    if unknown:
        ap.error(f"unknown surface(s) {unknown}; choose from {list(surfaces)}")
    with tempfile.TemporaryDirectory(prefix="qvlc-fuzz-") as tmp:
        ws = workspace(Path(tmp))
        each = args.minutes * 60 / len(names)
        print(f"{'surface':<28} {'cases':>8} {'failures':>9}   ({each:.0f} s each)")
        failing = 0
        for name in names:
            tried, failures = fuzz(name, surfaces[name], ws, each)
            failing += bool(failures)
            print(f"{name:<28} {tried:>8} {len(failures):>9}", flush=True)
            for f in failures[:3]:
                print("    " + f.replace("\n", "\n    ")[:3000])
        close_clients()
    return failing


if __name__ == "__main__":
    sys.exit(main())
