"""Benchmark: compile the visual part of a random-weight Qwen2-VL-2B (real shapes) in fp16 at N = 5120.

    .venv/bin/python benchmarks/bench_visual_2b.py [--workdir bench_out] [--max-patches 5120] [--no-validate]

The checkpoint (bf16, like the released one) is built once into <workdir>/qwen2_vl_2b_random by a child process
and reused whenever its config.json exists (bench_llm_2b.py shares it). Prints wall time per stage, peak RSS,
bytes written and the write rate.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from _common import ARTIFACTS, PrintProgress, ensure_checkpoint, rss_gb


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
        "output": {"dir": str(args.workdir.resolve() / ARTIFACTS)},
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
    print(f"peak RSS: compile (self) {rss_gb(resource.RUSAGE_SELF):.2f} GB, "
          f"children {rss_gb(resource.RUSAGE_CHILDREN):.2f} GB")
    if written is not None:
        export_s = next(v for k, v in progress.timings.items() if k.startswith("export"))
        print(f"bytes written: {written / 1e6:.1f} MB in the export stage ({export_s:.1f} s): "
              f"{written / 1e6 / export_s:.1f} MB/s overall")
    return status


if __name__ == "__main__":
    sys.exit(main())
