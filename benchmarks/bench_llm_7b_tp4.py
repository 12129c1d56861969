"""Benchmark: compile and prove a random-weight Qwen2-VL-7B LLM part (real shapes) at tp = 4, fp16 (or with
int8/int4 weights: --weights, as bench_llm_2b.py takes it).

    ../shared/tools/memcap 16 .venv/bin/python benchmarks/bench_llm_7b_tp4.py [--workdir bench_out]
        [--workers 1] [--prefill-len 2048] [--max-context 4096] [--no-validate | --validate-only]
        [--cases all] [--weights int8] [--kv-cache int8] ...

By default the same compile runs twice in one sitting, without validation and then with it, and the ratio of
their wall times is printed, then every stage of the validated compile beside its floor on this machine
(benchmarks/_floor.py: measured GEMM, memory, disk and hash rates).

The checkpoint (bf16, 16.6 GB, sharded like the released one) is written once by a streaming writer that never
holds the model. Each rank is exported from only its own slices read from the checkpoint files (in this process,
or in --workers spawned processes); validation (on unless --no-validate) runs the rank graphs with their AllReduce
points summed and the streamed fp32 oracle, one decoder layer in memory at a time. Prints time per stage, peak
RSS (this process and the largest worker), bytes per rank and the parity verdict; run it under memcap for the
memory cgroup's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from _common import (
    ARTIFACTS,
    PrintProgress,
    add_weights_args,
    print_cache,
    print_parity,
    print_quant_error,
    rss_gb,
    weights_export,
)

MODELS = {"qwen2_vl_7b": "qwen2_vl", "qwen3_vl_8b": "qwen3_vl"}  # shipped config → its family


def ensure_7b(workdir: Path, seed: int, model: str = "qwen2_vl_7b") -> Path:
    from qvlc.checkpoint.tiny import write_random_checkpoint_streaming
    from qvlc.models import family

    folder = workdir / f"{model}_random"
    if (folder / "config.json").is_file():
        print(f"checkpoint: reusing {folder}")
        return folder
    t0 = time.perf_counter()
    fam = family(MODELS[model])
    write_random_checkpoint_streaming(fam.shipped_config(model), folder, seed, family=fam)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"checkpoint: wrote {folder} ({size / 1e9:.1f} GB) in {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {rss_gb(resource.RUSAGE_SELF):.2f} GB")
    return folder


def disk_read_gb() -> float:
    """Bytes read from storage by this process and its ended children (the export workers), in GB."""
    return sum(resource.getrusage(w).ru_inblock for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) * 512 / 1e9


def compile_once(args, checkpoint: Path, validate: bool):
    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import config_from_dict

    quant, weights = weights_export(args)
    kv = "" if args.kv_cache == "fp" else f"_kv{args.kv_cache}"
    name = f"bench_llm_{args.model}_{args.prefill_len}_{args.max_context}_tp4_fp16{quant}{kv}_w{args.workers}"
    out = args.workdir / ARTIFACTS
    shutil.rmtree(out / name, ignore_errors=True)
    cfg = config_from_dict({
        "name": name, "part": "llm", "model": {"checkpoint": str(checkpoint)},
        "export": {"dtype": "fp16", "prefill_len": args.prefill_len, "max_context": args.max_context, "tp": 4,
                   "workers": args.workers, "kv_cache": args.kv_cache, **weights},
        "validate": {"enabled": validate, "cases": args.cases}, "output": {"dir": str(out)},
    })
    rss_before, read_before = rss_gb(resource.RUSAGE_SELF), disk_read_gb()
    print(f"\n== compile {'with' if validate else 'without'} validation ==")
    t0 = time.perf_counter()
    result = compile_artifact(cfg, force=True, progress=PrintProgress())
    wall = time.perf_counter() - t0
    m = json.loads((result.folder / "manifest.json").read_text())
    print(f"\n== {args.model} LLM part, tp = 4 (random weights, real shapes), validate={validate} ==")
    print(f"config: S={args.prefill_len} C={args.max_context} fp16{quant} kv_cache={args.kv_cache} "
          f"workers={args.workers}")
    for stage, seconds in result.timings.items():
        print(f"  {stage:<20} {seconds:8.1f} s")
    print(f"  {'total':<20} {wall:8.1f} s; {disk_read_gb() - read_before:.1f} GB read from storage")
    print(f"peak RSS: this process {rss_gb(resource.RUSAGE_SELF):.2f} GB (before compile {rss_before:.2f} GB); "
          f"largest worker {result.export.worker_peak_rss_mb / 1024:.2f} GB")
    files = {f["path"]: f["bytes"] for f in m["files"]}
    for r in range(4):
        rank = {p: b for p, b in files.items() if p.startswith(f"rank{r}/")}
        print(f"  rank{r}: {sum(rank.values()) / 1e9:.3f} GB "
              f"({', '.join(f'{Path(p).name} {b / 1e6:.1f} MB' for p, b in sorted(rank.items()))})")
    print(f"  embed_tokens.bin: {files['embed_tokens.bin'] / 1e9:.3f} GB")
    ws = result.export.write_seconds
    print(f"bytes written: {result.export.bytes_written / 1e9:.2f} GB; {ws:.1f} s spent writing "
          f"({result.export.bytes_written / 1e6 / max(ws, 1e-9):.0f} MB/s while writing)")
    print_parity(result.report)
    print_quant_error(result.report)
    print_cache(result.report, result.folder)
    return result, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2_vl_7b")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", nargs="+", default=["all"], help="validate.cases")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--no-validate", action="store_true", help="only the compile without validation")
    which.add_argument("--validate-only", action="store_true", help="only the compile with validation")
    add_weights_args(ap)
    ap.add_argument("--kv-cache", choices=["fp", "int8"], default="fp", help="export.kv_cache")
    args = ap.parse_args()

    checkpoint = ensure_7b(args.workdir, args.seed, args.model)
    walls = {}
    for validate in (False, True):
        if (validate and args.no_validate) or (not validate and args.validate_only):
            continue
        result, walls[validate] = compile_once(args, checkpoint, validate)
    if True in walls:
        from _floor import print_llm_floors

        print("\n== each stage beside what this machine allows for it ==")
        print_llm_floors(result, checkpoint, args.workdir, 15)
    if len(walls) == 2:
        print(f"\ncompile with validation / without: {walls[True]:.1f} s / {walls[False]:.1f} s = "
              f"{walls[True] / walls[False]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
