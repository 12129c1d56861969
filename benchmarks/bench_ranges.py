"""Benchmark: what recording the fp16 ranges costs the oracle, on random Qwen2-VL-2B weights at the real shapes.

    .venv/bin/python benchmarks/bench_ranges.py [--workdir bench_out] [--repeats 3] [--tokens 1024]
                                                [--patches 2048]

Runs the streamed oracles (one layer / block in memory at a time) with the range recorder on and off, each run in
a fresh spawned process (so its peak RSS is its own), alternating on/off, and prints the median wall time and peak
RSS of each mode and their ratio: the LLM oracle on two text prompts of --tokens tokens, the vision oracle on
images totalling --patches patches.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

from _common import ensure_checkpoint


def _run(part: str, checkpoint: str, tokens: int, patches: int, record: bool, queue) -> None:
    import numpy as np
    import torch

    from qvlc.checkpoint.inspect import inspect_checkpoint
    from qvlc.validate.ranges import RangeRecorder

    torch.manual_seed(0)
    family, dims = inspect_checkpoint(Path(checkpoint))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if part == "llm":
        from qvlc.validate.oracle import OracleInput, StreamedOracle

        seqs = [OracleInput(rng.integers(0, dims.text.vocab, tokens).astype(np.int64), {}, None, None, None, tokens - 8,
                            f"text{i}") for i in range(2)]
        ranges = RangeRecorder(enabled=record)
        StreamedOracle(family, Path(checkpoint), dims).run(seqs, ranges)
    else:
        from qvlc.validate.vision_oracle import StreamedVisionOracle

        side = int((patches // 2) ** 0.5) // 2 * 2
        grid = np.array([[1, side, side]])
        cases = [(rng.standard_normal((side * side, dims.vision.patch_dim)).astype(np.float32), grid)
                 for _ in range(2)]
        ranges = RangeRecorder(attn_name="attn", enabled=record) if record else None
        StreamedVisionOracle(family, Path(checkpoint), dims).run(cases, ["a", "b"], ranges)
    queue.put((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
               len(ranges.stats) if ranges is not None else 0))


def measure(part: str, checkpoint: Path, args) -> None:
    ctx = multiprocessing.get_context("spawn")
    results: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for record in (False, True):
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(part, str(checkpoint), args.tokens, args.patches, record, queue))
            proc.start()
            results[record].append(queue.get())
            proc.join()
    off_t = statistics.median(r[0] for r in results[False])
    on_t = statistics.median(r[0] for r in results[True])
    off_m = statistics.median(r[1] for r in results[False])
    on_m = statistics.median(r[1] for r in results[True])
    what = f"2 prompts x {args.tokens} tokens" if part == "llm" else f"2 images, {args.patches} patches"
    print(f"{part} oracle ({what}), median of {args.repeats}: off {off_t:.1f} s / {off_m:.2f} GB peak RSS; "
          f"on {on_t:.1f} s / {on_m:.2f} GB ({results[True][0][2]} tensors recorded); "
          f"time x{on_t / off_t:.3f}, memory x{on_m / off_m:.3f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--patches", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", choices=("llm", "visual", "both"), default="both")
    args = ap.parse_args()
    checkpoint = ensure_checkpoint(args.workdir.resolve(), args.seed)
    for part in ("llm", "visual") if args.part == "both" else (args.part,):
        measure(part, checkpoint, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
