"""Peak memory of `qvlc run` on small files that decode huge: a 600-frame 1280x720 clip sampled at --fps 0.2, and a
PNG whose header claims 13000 x 13000 pixels — against a small image, the baseline, measured in the same sitting.

    python benchmarks/bench_hostile_media.py --workdir /work/bench/hostile [--source /path/to/other/checkout]

Each run goes through ``../shared/tools/memcap`` (a memory cgroup; the peak includes page cache) when it exists, and
reports the cgroup's peak; ``--source`` runs another checkout's qvlc (PYTHONPATH) on the same inputs, for a
before/after comparison. The tiny artifacts are compiled once into the workdir.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

MEMCAP = Path(__file__).resolve().parents[2] / "shared" / "tools" / "memcap"


def make_inputs(work: Path) -> dict[str, tuple[str, ...]]:
    import av
    import numpy as np
    from PIL import Image

    clip, big, small = work / "clip600.mp4", work / "big13000.png", work / "small.png"
    if not clip.exists():
        with av.open(str(clip), "w") as c:
            s = c.add_stream("mpeg4", rate=30)
            s.width, s.height, s.pix_fmt, s.bit_rate = 1280, 720, "yuv420p", 20000
            frame = np.zeros((720, 1280, 3), dtype=np.uint8)
            for i in range(600):
                frame[:8, :8] = i % 255
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    if not big.exists():
        Image.new("1", (13000, 13000)).save(big, optimize=True)
    if not small.exists():
        Image.radial_gradient("L").resize((160, 120)).convert("RGB").save(small)
    for p in (clip, big, small):
        print(f"input: {p.name} {p.stat().st_size / 1e3:.0f} KB")
    return {"small image (baseline)": ("--image", str(small)), "13000x13000 PNG": ("--image", str(big)),
            "600-frame 720p clip, --fps 0.2": ("--video", str(clip), "--fps", "0.2")}


def artifacts(work: Path, env: dict) -> tuple[Path, Path]:
    out = work / "artifacts"
    for part in ("llm", "visual"):
        if not (out / f"tiny_{part}" / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "qvlc", "compile", f"configs/tiny_{part}.yaml", "-o", str(out)],
                           check=True, env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    return out / "tiny_llm", out / "tiny_visual"


def measure(cmd: list[str], env: dict, cwd: Path) -> tuple[str, int, str]:
    """(peak, exit code, last line of output) of one command, in a memory cgroup when memcap is there. It runs in
    ``cwd`` (not a checkout: `python -m` puts the working folder first on the path)."""
    full = ([str(MEMCAP), "24"] if MEMCAP.exists() else []) + cmd
    proc = subprocess.run(full, capture_output=True, text=True, env=env, cwd=cwd)
    m = re.search(r"peak ([0-9.]+ GiB)", proc.stderr)
    last = [x for x in (proc.stdout + proc.stderr).strip().splitlines() if x and not x.startswith(("memcap:", "  fix"))]
    return (m.group(1) if m else "n/a (no memcap)"), proc.returncode, (last[-1] if last else "")[:120]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench/hostile"))
    ap.add_argument("--source", type=Path, default=None, help="another checkout whose qvlc runs the same inputs")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    inputs = make_inputs(args.workdir)
    llm, visual = artifacts(args.workdir, env)
    sources = [("this checkout", None)] + ([(str(args.source), args.source)] if args.source else [])
    for label, src in sources:
        run_env = {**env, "PYTHONPATH": str(src)} if src else env
        for name, extra in inputs.items():
            cmd = [sys.executable, "-m", "qvlc", "run", str(llm), str(visual), *extra, "--prompt", "What is it?",
                   "-n", "4"]
            peak, code, last = measure(cmd, run_env, args.workdir)
            print(f"{label:>16} | {name:<32} | peak {peak:>10} | exit {code} | {last}")


if __name__ == "__main__":
    main()
