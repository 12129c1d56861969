"""Benchmark: compile the visual part of a random-weight Qwen2-VL-2B (real shapes) in fp16 at N = 5120.

    .venv/bin/python benchmarks/bench_visual_2b.py [--workdir bench_out] [--max-patches 5120] [--no-validate]

The checkpoint (bf16, like the released one) is built once into <workdir>/qwen2_vl_2b_random by a child process
and reused whenever its config.json exists (bench_llm_2b.py shares it). Prints wall time per stage, peak RSS,
bytes written and the write rate.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

CHECKPOINT_DIR = "qwen2_vl_2b_random"


def _build(folder: str, seed: int) -> None:
    import torch

    from qvlc.models.qwen2_vl.tiny import build_random_checkpoint, shipped_config

    build_random_checkpoint(shipped_config("qwen2_vl_2b"), Path(folder), seed, dtype=torch.bfloat16)


def ensure_checkpoint(workdir: Path, seed: int) -> Path:
    """The shared random 2B checkpoint, built under a lock (so a concurrent benchmark waits, then reuses it)."""
    folder = workdir / CHECKPOINT_DIR
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / f".{CHECKPOINT_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").is_file():
            print(f"checkpoint: reusing {folder}")
            return folder
        t0 = time.perf_counter()
        # A child process, so the build's memory is not counted in the compile's peak RSS.
        proc = multiprocessing.get_context("spawn").Process(target=_build, args=(str(folder), seed))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            sys.exit(f"building the random checkpoint failed (exit code {proc.exitcode})")
        print(f"checkpoint: built {folder} in {time.perf_counter() - t0:.1f} s "
              f"(peak RSS of the build {_rss_gb(resource.RUSAGE_CHILDREN):.2f} GB)")
        return folder


def _rss_gb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


class PrintProgress:
    """Prints each stage as it ends and keeps its wall time, also when a later stage fails."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        print(f"  {name} ...", flush=True)
        t0 = time.perf_counter()
        yield {}
        self.timings[name] = time.perf_counter() - t0
        print(f"  {name}: {self.timings[name]:.1f} s (peak RSS so far {_rss_gb(resource.RUSAGE_SELF):.2f} GB)",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--max-patches", type=int, default=5120)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--chunk-width", type=int, default=640)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--simplify", action="store_true")
    ap.add_argument("--no-validate", action="store_true")
    args = ap.parse_args()

    from qvlc.config import config_from_dict
    from qvlc.errors import ParityError
    from qvlc.pipeline import compile_artifact

    checkpoint = ensure_checkpoint(args.workdir.resolve(), args.seed)
    cfg = config_from_dict({
        "name": f"qwen2_vl_2b_visual_{args.max_patches}_{args.dtype}",
        "part": "visual",
        "model": {"checkpoint": str(checkpoint)},
        "export": {"dtype": args.dtype, "max_patches": args.max_patches, "chunk_width": args.chunk_width,
                   "simplify": args.simplify},
        "validate": {"enabled": not args.no_validate},
        "output": {"dir": str(args.workdir.resolve() / "build")},
    })
    print(f"compile {cfg.name} (N={args.max_patches}, {args.dtype}, validate={not args.no_validate})")
    progress = PrintProgress()
    t0 = time.perf_counter()
    status, written = 0, None
    try:
        result = compile_artifact(cfg, force=True, progress=progress)
        written = result.export.bytes_written
        if result.report is not None:
            print(result.report.to_markdown())
    except ParityError as exc:
        print(f"PARITY FAILED:\n{exc}")
        status = 1
    total = time.perf_counter() - t0
    print("\n| stage | wall s |\n|---|---|")
    for name, secs in progress.timings.items():
        print(f"| {name} | {secs:.1f} |")
    print(f"| total | {total:.1f} |")
    print(f"peak RSS: compile (self) {_rss_gb(resource.RUSAGE_SELF):.2f} GB, "
          f"children {_rss_gb(resource.RUSAGE_CHILDREN):.2f} GB")
    if written is not None:
        export_s = next(v for k, v in progress.timings.items() if k.startswith("export"))
        print(f"bytes written: {written / 1e6:.1f} MB in the export stage ({export_s:.1f} s): "
              f"{written / 1e6 / export_s:.1f} MB/s overall")
    return status


if __name__ == "__main__":
    sys.exit(main())
