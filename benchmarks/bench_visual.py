"""Benchmark: compile the visual part of a random-weight model at its real shapes, in fp16 at N = 5120.

    .venv/bin/python benchmarks/bench_visual.py [--model qwen2_vl_2b|qwen2_5_vl_7b|qwen2_5_vl_3b|qwen2_vl_7b]
                                                [--workdir bench_out] [--max-patches 5120] [--no-validate]
                                                [--attention-block 1024]

qwen2_vl_2b (the default) compiles the random 2B checkpoint bench_llm_2b.py shares (built once by a child process).
Every other model gets a streamed random checkpoint of its vision tower alone (bf16, like the released weights;
all a visual compile reads), written once into <workdir>/<model>_vision_random. Prints wall time per stage, peak
RSS, bytes written and the write rate.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from _common import ARTIFACTS, PrintProgress, ensure_checkpoint, rss_gb

FAMILY_OF = {"qwen2_vl_2b": "qwen2_vl", "qwen2_vl_7b": "qwen2_vl", "qwen2_5_vl_3b": "qwen2_5_vl",
             "qwen2_5_vl_7b": "qwen2_5_vl", "qwen3_vl_2b": "qwen3_vl", "qwen3_vl_8b": "qwen3_vl"}


def ensure_vision_checkpoint(workdir: Path, model: str, seed: int) -> Path:
    from qvlc.checkpoint.tiny import write_random_checkpoint_streaming
    from qvlc.models import family

    folder = workdir / f"{model}_vision_random"
    if (folder / "config.json").is_file():
        print(f"checkpoint: reusing {folder}")
        return folder
    t0 = time.perf_counter()
    fam = family(FAMILY_OF[model])
    write_random_checkpoint_streaming(fam.shipped_config(model), folder, seed, family=fam, vision_only=True)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"checkpoint: wrote {folder} (vision tower, {size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(FAMILY_OF), default="qwen2_vl_2b")
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--max-patches", type=int, default=5120)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--chunk-width", type=int, default=640)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--simplify", action="store_true")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--attention-block", type=int, default=None, help="export.attention_block (default: qvlc's)")
    args = ap.parse_args()

    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import config_from_dict
    from qvlc.errors import ParityError

    if args.model == "qwen2_vl_2b":
        checkpoint = ensure_checkpoint(args.workdir.resolve(), args.seed)
    else:
        checkpoint = ensure_vision_checkpoint(args.workdir.resolve(), args.model, args.seed)
    cfg = config_from_dict({
        "name": f"{args.model}_visual_{args.max_patches}_{args.dtype}",
        "part": "visual",
        "model": {"checkpoint": str(checkpoint)},
        "export": {"dtype": args.dtype, "max_patches": args.max_patches, "chunk_width": args.chunk_width,
                   "simplify": args.simplify,
                   **({} if args.attention_block is None else {"attention_block": args.attention_block})},
        "validate": {"enabled": not args.no_validate},
        "output": {"dir": str(args.workdir.resolve() / ARTIFACTS)},
    })
    print(f"compile {cfg.name} (N={args.max_patches}, {args.dtype}, attention_block={cfg.export.attention_block}, "
          f"validate={not args.no_validate})")
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
