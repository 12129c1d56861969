"""Benchmark: compile the LLM part of a random-weight Qwen2-VL-2B (real shapes) in fp16, with validation.

    .venv/bin/python benchmarks/bench_llm_2b.py [--workdir bench_out] [--prefill-len 512] [--max-context 1024]
                                                [--tp 1] [--no-validate] [--simplify] [--cases all]
                                                [--weights int8|int4] [--group-size 128] [--dequantize blocked]
                                                [--method rtn|gptq] [--nsamples 128] [--seqlen 512]

Shares the random checkpoint <workdir>/qwen2_vl_2b_random with bench_visual.py (streamed once, bf16 like the
released weights). Prints wall time per stage, peak RSS, bytes written and the write rate they imply; with
validation, every stage (and validation phase) beside its floor on this machine (benchmarks/_floor.py).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

from _common import (
    ARTIFACTS,
    PrintProgress,
    add_weights_args,
    ensure_checkpoint,
    print_parity,
    print_quant_error,
    rss_gb,
    weights_export,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--generate-tokens", type=int, default=16)
    ap.add_argument("--simplify", action="store_true")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--cases", nargs="+", default=["all"], help="validate.cases")
    ap.add_argument("--no-floor", action="store_true", help="skip measuring this machine's rates and the floors")
    ap.add_argument("--seed", type=int, default=0)
    add_weights_args(ap)
    args = ap.parse_args()

    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import config_from_dict

    checkpoint = ensure_checkpoint(args.workdir, args.seed)
    quant, weights = weights_export(args)
    name = f"bench_llm_2b_{args.prefill_len}_{args.max_context}_tp{args.tp}_{args.dtype}{quant}"
    out = args.workdir / ARTIFACTS
    shutil.rmtree(out / name, ignore_errors=True)
    cfg = config_from_dict({
        "name": name, "part": "llm", "model": {"checkpoint": str(checkpoint)},
        "export": {"dtype": args.dtype, "prefill_len": args.prefill_len, "max_context": args.max_context,
                   "tp": args.tp, "simplify": args.simplify, **weights},
        "validate": {"enabled": not args.no_validate, "decode_steps": args.decode_steps,
                     "generate_tokens": args.generate_tokens, "cases": args.cases},
        "output": {"dir": str(out)},
    })
    progress = PrintProgress()
    print(f"compiling {name} from {checkpoint}")
    t0 = time.perf_counter()
    result = compile_artifact(cfg, force=True, progress=progress)
    wall = time.perf_counter() - t0
    written = result.export.bytes_written
    export_s = sum(v for k, v in result.timings.items() if k.startswith("export"))
    print("\n== qwen2-vl-2b LLM part (random weights, real shapes) ==")
    print(f"config: S={args.prefill_len} C={args.max_context} tp={args.tp} {args.dtype} "
          f"simplify={args.simplify} validate={not args.no_validate}")
    for stage, seconds in result.timings.items():
        print(f"  {stage:<20} {seconds:8.1f} s")
    print(f"  {'total':<20} {wall:8.1f} s")
    print(f"peak RSS: {rss_gb(resource.RUSAGE_SELF):.2f} GB")
    print(f"bytes written: {written / 1e9:.3f} GB (weights file {result.export.weights_unshared_bytes / 1e9:.3f} GB "
          f"if prefill and decode each kept their own copy)")
    ws = result.export.write_seconds
    print(f"disk writes: {ws:.1f} s of the {export_s:.1f} s export stage ({written / 1e6 / max(ws, 1e-9):.0f} MB/s "
          f"while writing, fsync included; {written / 1e6 / export_s:.0f} MB/s over the whole export stage)")
    print_parity(result.report)
    print_quant_error(result.report)
    if not args.no_validate and not args.no_floor:
        from _floor import print_llm_floors

        print("\n== each stage beside what this machine allows for it ==")
        print_llm_floors(result, checkpoint, args.workdir, max(args.decode_steps, args.generate_tokens - 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
